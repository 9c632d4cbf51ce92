"""The package's import contract, checked in fresh interpreters: the plain-torch core imports no Lightning, and
``import lightning_gossip`` registers the strategy names whichever of Lightning and the package comes first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

NO_LIGHTNING = """
import sys
import lightning_gossip.gossip
from lightning_gossip import GossipAverager, GossipOptions
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "hydra"))
assert not loaded, loaded
print("ok")
"""

REGISTERED = {
    "package first": "import lightning_gossip\nimport lightning",
    "lightning first": "import lightning\nimport lightning_gossip",
    "strategy class first": "from lightning_gossip import GossipStrategy",
    # a module of the package imports Lightning half-way through its own import: registration waits for it
    "an adapter module first": "import lightning_gossip.checkpoint_io",
}


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_algorithm_imports_without_lightning() -> None:
    assert _run(NO_LIGHTNING).strip() == "ok"


@pytest.mark.parametrize("imports", list(REGISTERED.values()), ids=list(REGISTERED))
def test_import_registers_the_strategy_names(imports: str) -> None:
    code = imports + """
import json
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry
from lightning_gossip import GossipStrategy
from lightning_gossip.fabric import GossipFabricStrategy
print(json.dumps({
    "trainer": sorted(name for name in StrategyRegistry if name.startswith("gossip")),
    "fabric": sorted(name for name in STRATEGY_REGISTRY if name.startswith("gossip")),
    "classes": [StrategyRegistry["gossip"]["strategy"] is GossipStrategy,
                STRATEGY_REGISTRY["gossip"]["strategy"] is GossipFabricStrategy],
}))
"""
    found = json.loads(_run(code).strip().splitlines()[-1])
    assert {"gossip", "gossip_async", "gossip_fork", "gossip_spawn"} <= set(found["trainer"])
    assert {"gossip", "gossip_async"} <= set(found["fabric"])
    assert found["classes"] == [True, True]
