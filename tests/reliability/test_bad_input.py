"""Bad input fails early with an error that names the bad value and what is allowed.

Before any worker process exists: GossipStrategy's constructor (every option), ``Trainer(...)`` construction (a
topology that does not fit the world size), ``trainer.fit`` before the launch (a model with nothing to gossip), Hydra
overrides with wrong values. At setup, on real processes: models that differ between ranks. A checkpoint of another
model is tested with a real resume in test_resume.py.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_gossip import GossipStrategy
from lightning_gossip.gossip import GossipAverager
from lightning_gossip.checkpoint_io import check_checkpoint_fits
from tests.helpers.distributed import run_distributed

TOPOLOGY_NAMES = "['exponential', 'random', 'ring']"
DTYPES = "['float32', 'bfloat16', 'float16']"

BAD_OPTIONS = [
    # (keyword arguments, exception, substrings the message must contain)
    ({"p": 1.5}, ValueError, ["Gossip probability p must be in [0, 1]", "got 1.5"]),
    ({"p": -0.1}, ValueError, ["must be in [0, 1]", "got -0.1"]),
    ({"p": math.nan}, ValueError, ["must be in [0, 1]", "got nan"]),
    ({"p": math.inf}, ValueError, ["must be in [0, 1]", "got inf"]),
    ({"p": "0.5"}, TypeError, ["must be a number in [0, 1]", "got '0.5' (str)"]),
    ({"p": None}, TypeError, ["must be a number in [0, 1]", "got None"]),
    ({"p": True}, TypeError, ["must be a number in [0, 1]", "got True (bool)"]),
    ({"p": [0.1]}, TypeError, ["must be a number in [0, 1]", "got [0.1] (list)"]),
    ({"topology": "star"}, ValueError, ["Unknown gossip topology 'star'", TOPOLOGY_NAMES, "peer(rank, world_size"]),
    ({"topology": 42}, TypeError, ["got 42", TOPOLOGY_NAMES, "peer(rank, world_size"]),
    ({"average_every": 0}, ValueError, ["average_every must be None or an integer >= 1", "got 0"]),
    ({"average_every": -3}, ValueError, ["integer >= 1", "got -3"]),
    ({"average_every": 2.5}, ValueError, ["integer >= 1", "got 2.5"]),
    ({"average_every": "8"}, ValueError, ["integer >= 1", "got '8'"]),
    ({"average_every": True}, ValueError, ["integer >= 1", "got True"]),
    ({"staleness": -1}, ValueError, ["staleness must be None or an integer >= 0", "got -1"]),
    ({"staleness": 2.5}, ValueError, ["integer >= 0", "got 2.5"]),
    ({"staleness": "4"}, ValueError, ["integer >= 0", "got '4'"]),
    ({"staleness": True}, ValueError, ["integer >= 0", "got True"]),
    ({"overlap": True, "staleness": 0}, ValueError, ["overlap=True means staleness=1", "staleness=0"]),
    ({"overlap": "yes"}, TypeError, ["overlap must be True or False", "got 'yes'"]),
    ({"transfer_dtype": "int8"}, ValueError, ["transfer_dtype must be None", DTYPES, "got 'int8'"]),
    ({"transfer_dtype": "fp8"}, ValueError, [DTYPES, "got 'fp8'"]),
    ({"transfer_dtype": torch.int32}, ValueError, [DTYPES, "got torch.int32"]),
    ({"transfer_dtype": [1]}, ValueError, [DTYPES, "got [1]"]),
    ({"on_nonfinite": "ignore"}, ValueError, ["on_nonfinite must be 'warn' or 'error'", "got 'ignore'"]),
    ({"eval_mode": "avg"}, ValueError, ["eval_mode must be one of ('consensus', 'local')", "got 'avg'"]),
    ({"seed": "1"}, TypeError, ["seed must be None or an int", "got '1'"]),
    ({"seed": 1.5}, TypeError, ["seed must be None or an int", "got 1.5"]),
    ({"final_consensus": "false"}, TypeError, ["final_consensus must be True or False", "got 'false' (str)"]),
    ({"mix_buffers": "no"}, TypeError, ["mix_buffers must be True or False", "got 'no' (str)"]),
    ({"monitor": "yes"}, TypeError, ["monitor must be True or False", "got 'yes' (str)"]),
    ({"sigterm_sync_every": 0}, ValueError, ["sigterm_sync_every must be None or an integer >= 1", "got 0"]),
    ({"timeout": 30}, TypeError, ["timeout must be None or a positive datetime.timedelta", "got 30"]),
    ({"timeout": timedelta(0)}, TypeError, ["positive datetime.timedelta", "got datetime.timedelta(0)"]),
]


@pytest.mark.parametrize("kwargs, error, parts", BAD_OPTIONS, ids=[repr(k) for k, _, _ in BAD_OPTIONS])
def test_constructor_rejects_bad_options(kwargs, error, parts) -> None:
    with pytest.raises(error) as info:
        GossipStrategy(**kwargs)
    for part in parts:
        assert part in str(info.value), str(info.value)


@pytest.mark.parametrize("kwargs", [{"p": np.float32(0.25)}, {"p": np.float64(1.0)}, {"p": 0}, {"p": 1},
                                    {"average_every": np.int64(4)}, {"transfer_dtype": torch.bfloat16},
                                    {"staleness": np.int64(3)}, {"overlap": True, "staleness": 4},
                                    {"timeout": None}, {"timeout": timedelta(seconds=5)}])
def test_constructor_accepts_good_options_of_other_types(kwargs) -> None:
    GossipStrategy(**kwargs)


# -- topologies that do not fit the world size: rejected when the Trainer is built, before any process starts -------
class PairsOnly:
    """Ranks pair up (0-1, 2-3, ...): needs an even number of workers, and says so in ``validate``."""

    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        return rank ^ 1

    def validate(self, world_size: int) -> None:
        if world_size % 2:
            raise ValueError(f"PairsOnly needs an even number of workers, got {world_size}.")


class SendsToItself:
    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        return rank if step == 3 else (rank + 1) % world_size


class NoWrapAround:
    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        return rank + 1


class FloatPeer:
    def peer(self, rank: int, world_size: int, step: int, u: float) -> float:
        return float((rank + 1) % world_size)


@pytest.mark.parametrize(
    "topology, error, parts",
    [
        (PairsOnly(), ValueError, ["PairsOnly needs an even number of workers, got 3"]),
        (SendsToItself(), ValueError, ["does not fit world size 3", "rank 0 at step 3 would send to 0",
                                       "a peer must be in [0, 2] and differ from the sender"]),
        (NoWrapAround(), ValueError, ["does not fit world size 3", "rank 2 at step 0 would send to 3", "[0, 2]"]),
        (FloatPeer(), TypeError, ["returned 1.0 (not an int) for rank 0, step 0"]),
    ],
    ids=["validate", "self", "out_of_range", "float"],
)
def test_topology_that_does_not_fit_the_world_size(topology, error, parts, no_spawn) -> None:
    with pytest.raises(error) as info:
        L.Trainer(accelerator="cpu", devices=3, strategy=GossipStrategy(topology=topology), logger=False)
    for part in parts:
        assert part in str(info.value), str(info.value)
    # The same topologies are fine where they fit.
    L.Trainer(accelerator="cpu", devices=2, strategy=GossipStrategy(topology=PairsOnly()), logger=False)


# -- a model with nothing to gossip: rejected by trainer.fit before the launcher starts any worker -------------------
class IntegerOnly(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.zeros(3, dtype=torch.long))

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None


class BuffersOnly(IntegerOnly):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(3))


@pytest.fixture
def no_spawn(monkeypatch):
    """Fail the test (instead of starting copies of pytest) if Lightning tries to launch worker processes."""
    from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher as FabricLauncher
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    def refuse(self) -> None:
        raise AssertionError("a worker process would have been started")

    monkeypatch.setattr(_SubprocessScriptLauncher, "_call_children_scripts", refuse)
    monkeypatch.setattr(FabricLauncher, "_call_children_scripts", refuse)


@pytest.mark.parametrize("model, mix_buffers", [(IntegerOnly, True), (BuffersOnly, False)])
def test_model_without_floating_point_tensors_fails_before_launch(model, mix_buffers, no_spawn, tmp_path) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=GossipStrategy(mix_buffers=mix_buffers),
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError) as info:
        trainer.fit(model(), [0])
    assert "Gossip needs at least one floating-point parameter" in str(info.value)
    assert f"(model: {model.__name__})" in str(info.value)


# -- models that differ between ranks: detected at setup, on real processes, naming the first difference -------------
def _build_averager(rank: int, world_size: int, variant: str) -> str:
    torch.manual_seed(0)
    odd = rank == world_size - 1  # the last rank has the different model
    if variant == "shape":
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5 if odd else 4))
    elif variant == "extra":
        model = nn.Sequential(nn.Linear(4, 4), *([nn.Linear(4, 4)] if odd else []))
    else:
        model = nn.Sequential(nn.Linear(4, 4)).to(torch.float64 if odd else torch.float32)
    try:
        GossipAverager(model, p=0.5)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize(
    "variant, world_size, expected",
    [
        ("shape", 3, "tensor #2 is ('1.weight', (4, 4), 'torch.float32') on rank 0 and ('1.weight', (5, 4), "
                     "'torch.float32') on rank 2"),
        ("extra", 2, "tensor #2 is None on rank 0 and ('1.weight', (4, 4), 'torch.float32') on rank 1"),
        ("dtype", 2, "tensor #0 is ('0.weight', (4, 4), 'torch.float32') on rank 0 and ('0.weight', (4, 4), "
                     "'torch.float64') on rank 1"),
    ],
)
def test_models_that_differ_between_ranks(variant: str, world_size: int, expected: str) -> None:
    messages = run_distributed(_build_averager, world_size, variant, timeout=60)
    for message in messages:  # every rank stops with the same error; none hangs
        assert message.startswith("Gossip needs the same model on every rank"), message
        assert expected in message, message


# -- a checkpoint written for another model ------------------------------------------------------------------------
def test_checkpoint_fit_check_names_keys_and_shapes() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 3))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    check_checkpoint_fits(model, good, strict=True)
    bigger = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 3)).state_dict()
    with pytest.raises(RuntimeError) as info:
        check_checkpoint_fits(model, bigger, strict=True)
    text = str(info.value)
    assert "does not fit the model Sequential" in text
    assert "0.weight has shape (32, 8) in the checkpoint but (16, 8) in the model" in text
    missing = {k: v for k, v in good.items() if k != "1.bias"}
    with pytest.raises(RuntimeError, match=r"missing from the checkpoint: \['1.bias'\]"):
        check_checkpoint_fits(model, missing, strict=True)
    check_checkpoint_fits(model, missing, strict=False)  # Lightning's strict_loading=False allows it
    with pytest.raises(RuntimeError, match=r"not in the model: \['2.weight'\]"):
        check_checkpoint_fits(model, {**good, "2.weight": torch.zeros(1)}, strict=True)


# -- Hydra overrides with wrong values: Hydra's error (naming the config key) around ours, before anything runs ------
CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.skipif(not (CONF / "strategy" / "gossip.yaml").exists(), reason="no Hydra configs")
@pytest.mark.parametrize(
    "override, parts",
    [
        ("strategy.p=abc", ["must be a number in [0, 1]", "got 'abc'"]),
        ("strategy.p=1.5", ["must be in [0, 1]", "got 1.5"]),
        ("strategy.p=[0.1]", ["must be a number in [0, 1]"]),
        ("strategy.topology=star", ["Unknown gossip topology 'star'"]),
        ("strategy.average_every=0.5", ["average_every must be None or an integer >= 1", "got 0.5"]),
        ("strategy.staleness=-2", ["staleness must be None or an integer >= 0", "got -2"]),
        ("strategy.transfer_dtype=int8", ["got 'int8'"]),
        ("strategy.on_nonfinite=ignore", ["got 'ignore'"]),
        ("strategy.eval_mode=avg", ["got 'avg'"]),
        ("strategy.seed=abc", ["seed must be None or an int", "got 'abc'"]),
        ("strategy.timeout=30", ["positive datetime.timedelta", "got 30"]),
        ("strategy.timeout.seconds=abc", ["timedelta", "str"]),
    ],
)
def test_hydra_overrides_with_wrong_values(override: str, parts: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[override])
        with pytest.raises(InstantiationException) as info:
            instantiate(cfg.strategy)
    finally:
        GlobalHydra.instance().clear()
    text = str(info.value)
    assert "lightning_gossip" in text or "timedelta" in text, text  # Hydra names the target it could not build
    for part in parts:
        assert part in text, text


@pytest.mark.skipif(not (CONF / "strategy" / "gossip.yaml").exists(), reason="no Hydra configs")
def test_hydra_override_of_an_unknown_key() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            with pytest.raises(ConfigCompositionException, match="strategy.probability"):
                compose("train", overrides=["strategy.probability=0.5"])
    finally:
        GlobalHydra.instance().clear()

