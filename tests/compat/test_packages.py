"""Both Lightning packages: the unified ``lightning`` and the standalone ``pytorch_lightning`` (the same adapter code,
renamed the way Lightning builds that package).

A real 2-process fit, per-rank checkpoint and exact resume with each package's Trainer (the subset CI also runs on
the lowest supported Lightning); and the renaming itself (every adapter module loads for pytorch_lightning and
reaches no class of the unified package).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import run_script

pytestmark = pytest.mark.lightning_compat

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "scripts" / "fit_resume.py"
STEPS_PER_EPOCH = 5  # 80 samples, 2 ranks, batch 8


def _unified_adapters() -> set[str]:
    import lightning_gossip.standalone as standalone

    return {f"lightning_gossip.{name}" for name in standalone.ADAPTER_MODULES}


_UNIFIED_ADAPTERS = _unified_adapters()


def test_adapter_modules_are_built_for_pytorch_lightning_only():
    pl = pytest.importorskip("pytorch_lightning")

    import lightning_gossip.standalone as standalone
    from lightning_gossip.standalone import GossipMonitor, GossipStrategy

    assert issubclass(GossipStrategy, pl.strategies.DDPStrategy)
    assert issubclass(GossipMonitor, pl.Callback)
    assert pl.strategies.StrategyRegistry["gossip"]["strategy"] is GossipStrategy
    assert pl.strategies.StrategyRegistry["gossip_spawn"]["init_params"] == {"start_method": "spawn"}
    loaded = [name for name in standalone.ADAPTER_MODULES if f"lightning_gossip.standalone.{name}" in sys.modules
              or (REPO / "lightning_gossip" / f"{name}.py").exists()]
    for name in loaded:
        module = __import__(f"lightning_gossip.standalone.{name}", fromlist=["_"])
        assert module.__file__ == str(REPO / "lightning_gossip" / f"{name}.py")  # tracebacks show the real file
        unified = sorted({getattr(v, "__module__", "") for v in vars(module).values()
                          if str(getattr(v, "__module__", "")).startswith("lightning.")})
        assert not unified, f"lightning_gossip.standalone.{name} reaches the unified package: {unified}"
        # module objects too (`import lightning.pytorch as pl`, or an adapter module of the unified side)
        modules = sorted(v.__name__ for v in vars(module).values() if isinstance(v, types.ModuleType)
                         and (v.__name__.split(".")[0] == "lightning" or v.__name__ in _UNIFIED_ADAPTERS))
        assert not modules, f"lightning_gossip.standalone.{name} holds modules of the unified side: {modules}"
    # the shipped strategy and the renamed one share the algorithm, not a copy of it
    import lightning_gossip.strategy as unified_strategy
    import lightning_gossip.standalone.strategy as renamed_strategy

    assert renamed_strategy.GossipAverager is unified_strategy.GossipAverager
    assert GossipStrategy is not unified_strategy.GossipStrategy


def test_renaming_refuses_a_bare_lightning_import():
    pytest.importorskip("pytorch_lightning")
    from lightning_gossip.standalone import translate

    assert translate("from lightning.pytorch.strategies import DDPStrategy\nimport lightning.fabric as F\n") == (
        "from pytorch_lightning.strategies import DDPStrategy\nimport lightning_fabric as F\n")
    assert "lightning_gossip.standalone.callbacks" in translate("from lightning_gossip.callbacks import GossipMonitor")
    assert translate("from lightning_gossip.gossip import GossipAverager") == (
        "from lightning_gossip.gossip import GossipAverager")  # the algorithm is shared, not renamed
    with pytest.raises(ImportError, match="unified `lightning` package"):
        translate("import lightning as L\n", "x.py")
    with pytest.raises(ImportError, match="x.py:2"):
        translate("import os\nfrom lightning import Trainer\n", "x.py")


@pytest.mark.parametrize("package", [pytest.param("lightning", marks=pytest.mark.slow), "pytorch_lightning"])
def test_fit_checkpoint_and_exact_resume(tmp_path, package):
    """The popen launcher, per-rank checkpoints and an exact resume, with either package's Trainer."""
    pytest.importorskip(package)
    run = run_script(SCRIPT, [str(tmp_path), "--package", package, "--devices", "2"], timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.output[-6000:]
    assert not run.survivors, f"processes left behind: {run.survivors}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    base = "pytorch_lightning" if package == "pytorch_lightning" else "lightning.pytorch"
    adapter = "lightning_gossip.standalone" if package == "pytorch_lightning" else "lightning_gossip"
    for rank in ranks:
        assert rank["strategy_mro"][1] == f"{base}.strategies.ddp.DDPStrategy"
        assert rank["monitor_callbacks"] == [f"{adapter}.callbacks"]
        assert "gossip/weight" in rank["logged"]
        assert rank["first_steps"] == STEPS_PER_EPOCH
        assert rank["counters"]["messages_sent"] + rank["counters"]["messages_received"] > 0
        assert rank["resumed_steps"] == 2 * STEPS_PER_EPOCH
        assert rank["resumed_gossip_step"] == 2 * STEPS_PER_EPOCH  # the schedule went on from the checkpoint
        # exact resume: the second epoch after the resume is the second epoch of the straight run, bit for bit
        assert torch.equal(rank["resumed_local"], rank["straight_local"][STEPS_PER_EPOCH:])
        assert torch.equal(rank["resumed_final"], rank["straight_final"])
    # the ranks trained different models, and every fit ended on the exact consensus
    assert not torch.equal(ranks[0]["first_local"][-1], ranks[1]["first_local"][-1])
    for key in ("first_final", "resumed_final", "straight_final"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # the checkpoint: the consensus model under state_dict (loadable without gossip), each rank's own state too
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    saved = torch.cat([v.flatten() for v in checkpoint["state_dict"].values()])
    torch.testing.assert_close(saved, ranks[0]["first_final"], rtol=0, atol=1e-6)
    from lightning_gossip.checkpoint_io import part_path

    gossip = checkpoint["gossip"]
    assert gossip["world_size"] == 2 and gossip["step"] == STEPS_PER_EPOCH
    for r in range(2):  # every rank's own part, beside the main file
        part = torch.load(part_path(str(tmp_path / "ckpt" / "last.ckpt"), gossip["parts"], r), weights_only=False)
        assert torch.equal(torch.cat([v.flatten() for v in part["model"].values()]), ranks[r]["first_local"][-1])
