"""The standalone ``pytorch_lightning`` package: the same adapter code, renamed the way Lightning builds that package.

A real 2-process ``pytorch_lightning.Trainer(strategy="gossip")`` fit, checkpoint and resume; and the renaming
itself (every adapter module loads for pytorch_lightning and reaches no class of the unified package).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.lightning_compat

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).parent / "scripts" / "pl_fit.py"
STEPS_PER_EPOCH = 5  # 80 samples, 2 ranks, batch 8


def test_adapter_modules_are_built_for_pytorch_lightning_only():
    import pytorch_lightning as pl

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
    # the shipped strategy and the renamed one share the algorithm, not a copy of it
    import lightning_gossip.strategy as unified_strategy
    import lightning_gossip.standalone.strategy as renamed_strategy

    assert renamed_strategy.GossipAverager is unified_strategy.GossipAverager
    assert GossipStrategy is not unified_strategy.GossipStrategy


def test_renaming_refuses_a_bare_lightning_import():
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


def test_pytorch_lightning_trainer_fits_checkpoints_and_resumes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "RANK"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--devices", "2"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for rank in ranks:
        assert rank["strategy_mro"][1] == "pytorch_lightning.strategies.ddp.DDPStrategy"
        assert rank["monitor_callbacks"] == ["lightning_gossip.standalone.callbacks"]
        assert "gossip/weight" in rank["logged"]
        assert rank["steps"] == 2 * STEPS_PER_EPOCH
        assert rank["counters"]["messages_sent"] + rank["counters"]["messages_received"] > 0
        assert rank["resumed_steps"] == 3 * STEPS_PER_EPOCH
        assert rank["resumed_gossip_step"] == 3 * STEPS_PER_EPOCH  # the schedule went on from the checkpoint
    # the ranks trained different models and ended on the exact consensus
    assert not torch.equal(ranks[0]["local_params"][3], ranks[1]["local_params"][3])
    assert torch.equal(ranks[0]["final_params"], ranks[1]["final_params"])
    assert torch.equal(ranks[0]["resumed_final_params"], ranks[1]["resumed_final_params"])
    # the checkpoint: the consensus model under state_dict, every rank's own state under "gossip"
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved = torch.cat([v.flatten() for k, v in checkpoint["state_dict"].items()])
    torch.testing.assert_close(saved, ranks[0]["resumed_final_params"], rtol=0, atol=1e-6)  # last.ckpt: after resume
    assert checkpoint["gossip"]["world_size"] == 2 and len(checkpoint["gossip"]["ranks"]) == 2
