"""Every private Lightning name lightning_gossip relies on (they are imported in lightning_gossip/_lightning_compat.py),
checked so that a Lightning release that removes or changes one fails here, loudly, instead of a feature turning
itself off. CI runs this file on the newest Lightning and on the lowest that pyproject.toml allows.

- Private imports: the package's source is scanned for ``from lightning... import _name``; each name found must have
  an entry in ``EXPECTED`` below (a new private import without a check fails the scan; an entry no longer imported
  fails too), and each entry checks that the name exists with the shape the code uses (signature, attributes,
  behaviour).
- Overrides: every method the adapter classes mark ``@override`` must exist in a Lightning base class (a renamed
  Lightning hook would otherwise never be called).
- Private attributes read at run time (``DDPStrategy._launcher``, ``._start_method``, ``._checkpoint_io`` ...).
- SIGTERM: where Lightning runs a per-step SIGTERM broadcast, a real 2-process fit shows the strategy replaced it by
  its agreement every ``sigterm_sync_every`` steps; where Lightning has none (< 2.5), the agreement runs all the same.
- The patches of the fit loop and of ModelCheckpoint's file names, on a real fit.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.helpers.processes import run_script

pytestmark = pytest.mark.lightning_compat

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lightning_gossip"


def has_params(function: Callable, *names: str) -> None:
    params = inspect.signature(function).parameters
    missing = [n for n in names if n not in params]
    assert not missing, f"{function.__qualname__}{inspect.signature(function)} lacks parameters {missing}"


def check_child_observer(observer: Any) -> None:
    assert issubclass(observer, threading.Thread)
    has_params(observer.__init__, "main_pid", "child_processes")
    assert "_run" in vars(observer) and "self._run()" in inspect.getsource(observer.run)
    assert "self._child_processes" in inspect.getsource(observer.__init__)


def check_is_local_file_protocol(function: Any) -> None:
    assert function("/tmp/x.ckpt") is True and function("s3://bucket/x.ckpt") is False


def check_multiprocessing_launcher(launcher: Any) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    has_params(launcher.__init__, "strategy", "start_method")
    has_params(launcher.launch, "function", "args", "trainer", "kwargs")
    has_params(launcher._collect_rank_zero_results, "trainer", "results")
    strategy = DDPStrategy(start_method="spawn")
    assert launcher(strategy, start_method="spawn")._strategy is strategy


def check_subprocess_launcher(launcher: Any) -> None:
    from lightning.fabric.plugins.environments import LightningEnvironment

    has_params(launcher.launch, "function", "args", "trainer", "kwargs")
    has_params(launcher.kill, "signum")
    assert callable(launcher._call_children_scripts)
    instance = launcher(LightningEnvironment(), 2, 1)
    assert instance.procs == [] and instance.num_processes == 2 and instance.num_nodes == 1
    assert isinstance(instance.cluster_environment, LightningEnvironment)


def check_sigkill_signal(function: Any) -> None:
    assert function() == getattr(signal, "SIGKILL", signal.SIGTERM)


def check_training_epoch_loop(loop: Any) -> None:
    from lightning.pytorch import Trainer

    from lightning_gossip._lightning_compat import LIGHTNING_BROADCASTS_SIGTERM, SIGTERM_BROADCAST_METHOD

    assert isinstance(Trainer(logger=False).fit_loop.epoch_loop, loop)
    has_method = hasattr(loop, SIGTERM_BROADCAST_METHOD)
    if LIGHTNING_BROADCASTS_SIGTERM:
        assert has_method, f"Lightning >= 2.6 is expected to have {loop.__name__}.{SIGTERM_BROADCAST_METHOD}"
    if has_method:
        assert f"self.{SIGTERM_BROADCAST_METHOD}()" in inspect.getsource(loop.advance), \
            f"{loop.__name__}.advance no longer calls {SIGTERM_BROADCAST_METHOD}: the throttle would replace nothing"


def check_update_dataloader(function: Any) -> None:
    # modes.py: the training DataLoader rebuilt with the work-sharing sampler, as Lightning and Fabric do for theirs,
    # keeping a DataLoader subclass and its arguments.
    from torch.utils.data import DataLoader, SequentialSampler

    class MyLoader(DataLoader):
        pass

    has_params(function, "dataloader", "sampler")
    loader = MyLoader(list(range(8)), batch_size=2, drop_last=True)
    sampler = SequentialSampler(range(4))
    rebuilt = function(loader, sampler)
    assert rebuilt.sampler is sampler and type(rebuilt) is MyLoader and rebuilt.drop_last and rebuilt.batch_size == 2


# (module, private name) -> the check of the shape the code relies on
EXPECTED: dict[tuple[str, str], Callable[[Any], None]] = {
    ("lightning.fabric.strategies.launchers.subprocess_script", "_ChildProcessObserver"): check_child_observer,
    ("lightning.fabric.utilities.cloud_io", "_is_local_file_protocol"): check_is_local_file_protocol,
    ("lightning.pytorch.loops.training_epoch_loop", "_TrainingEpochLoop"): check_training_epoch_loop,
    ("lightning.pytorch.strategies.launchers", "_MultiProcessingLauncher"): check_multiprocessing_launcher,
    ("lightning.pytorch.strategies.launchers", "_SubprocessScriptLauncher"): check_subprocess_launcher,
    ("lightning.pytorch.trainer.connectors.signal_connector", "_get_sigkill_signal"): check_sigkill_signal,
    ("lightning.fabric.utilities.data", "_update_dataloader"): check_update_dataloader,
}


def private_lightning_imports() -> set[tuple[str, str]]:
    """``from lightning[.x] import _name`` anywhere in the package (its standalone renaming aside)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if "standalone" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightning":
                found |= {(node.module, a.name) for a in node.names if a.name.startswith("_")}
    return found


def test_every_private_import_has_a_check():
    found = private_lightning_imports()
    unchecked = found - set(EXPECTED)
    assert not unchecked, f"private Lightning names imported without a check in EXPECTED: {sorted(unchecked)}"
    assert found, "the scan found no private import at all: is it still looking in the right place?"
    unused = set(EXPECTED) - found
    assert not unused, f"checked in EXPECTED but no longer imported by the package (remove them): {sorted(unused)}"


@pytest.mark.parametrize("module, name", sorted(EXPECTED), ids=lambda v: v)
def test_private_name_has_the_shape_the_code_uses(module, name):
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"Lightning no longer has {module}.{name}, which lightning_gossip relies on: {error}")
    EXPECTED[(module, name)](obj)


def _adapter_classes() -> list[type]:
    modules = []
    for name in ("strategy", "callbacks", "launchers", "checkpoint_io", "fabric", "_lightning_compat", "modes",
                 "trainer_modes"):
        if (PACKAGE / f"{name}.py").exists():
            modules.append(importlib.import_module(f"lightning_gossip.{name}"))
    return [cls for module in modules for cls in vars(module).values()
            if inspect.isclass(cls) and cls.__module__ == module.__name__]


def test_every_override_overrides_something():
    checked = 0
    for cls in _adapter_classes():
        for attr, value in vars(cls).items():
            function = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
            if not getattr(function, "__override__", False):
                continue
            checked += 1
            bases = [base for base in cls.__mro__[1:] if attr in vars(base)]
            assert bases, f"{cls.__qualname__}.{attr} is marked @override but no base class has {attr!r}: " \
                          "Lightning renamed or removed it, so it would never be called"
    assert checked >= 10


def test_private_attributes_read_at_run_time():
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.connectors import accelerator_connector

    strategy = DDPStrategy(start_method="spawn")
    assert strategy._start_method == "spawn"
    assert "_launcher" in vars(strategy) and "_checkpoint_io" in vars(strategy)
    # GossipStrategy wraps DDPStrategy.checkpoint_io's getter and sets _checkpoint_io
    assert "self._checkpoint_io" in inspect.getsource(DDPStrategy.checkpoint_io.fget)
    # GossipStrategy overrides _configure_launcher: Lightning must still call it
    assert "strategy._configure_launcher()" in inspect.getsource(accelerator_connector)
    # GossipFabricStrategy sets Fabric's _backward_sync_control (no gradient sync to skip) and _checkpoint_io
    from lightning.fabric import fabric as fabric_module
    from lightning.fabric.strategies import DDPStrategy as FabricDDPStrategy

    fabric_ddp = FabricDDPStrategy()
    assert "_backward_sync_control" in vars(fabric_ddp) and "_checkpoint_io" in vars(fabric_ddp)
    assert "self._strategy._backward_sync_control.no_backward_sync(" in inspect.getsource(fabric_module)
    assert "self._checkpoint_io" in inspect.getsource(FabricDDPStrategy.checkpoint_io.fget)
    # _lightning_compat.make_sigterm_handler_local replaces the signal connector's SIGTERM handler before Lightning
    # registers it, and sets the flag Lightning checks at step boundaries
    from lightning.pytorch.trainer.connectors import signal_connector

    connector_class = signal_connector._SignalConnector
    assert callable(getattr(connector_class, "_sigterm_notifier_fn", None))
    assert "self._sigterm_notifier_fn" in inspect.getsource(connector_class.register_signal_handlers)
    # lightning_gossip.app.data reads whether Lightning adds its DistributedSampler
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, use_distributed_sampler=False, logger=False)
    assert trainer._accelerator_connector.use_distributed_sampler is False
    connector = trainer._signal_connector
    assert isinstance(connector, connector_class) and connector.received_sigterm is False
    connector.received_sigterm = True
    assert trainer.received_sigterm is True  # the flag the fit loop checks is the connector's
    # lightning_gossip.trainer_modes refuses step- and time-based ModelCheckpoint in asynchronous mode, reads the
    # Timer's duration for max_time, and replaces the Timer's per-batch broadcast of rank 0's decision by its flag
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint, Timer

    by_steps, by_time = ModelCheckpoint(every_n_train_steps=5), ModelCheckpoint(train_time_interval=timedelta(seconds=3))
    assert by_steps._every_n_train_steps == 5 and by_steps._train_time_interval is None
    assert by_time._train_time_interval == timedelta(seconds=3) and not by_time._every_n_train_steps
    assert Timer(duration=timedelta(seconds=7))._duration == 7.0
    per_batch = inspect.getsource(Timer.on_train_batch_end)
    if "_check_time_remaining" in per_batch:  # newer Lightning: the broadcast moved into a helper
        per_batch = inspect.getsource(Timer._check_time_remaining)
    assert "strategy.broadcast(" in per_batch
    # ... and torch's default store, which its stop flag and the work-sharing sampler use
    import torch.distributed as dist

    assert callable(dist.distributed_c10d._get_default_store)


def test_sigterm_agreement_replaces_lightnings_per_step_broadcast_on_every_version(tmp_path):
    from lightning.pytorch.loops import training_epoch_loop

    per_step_broadcast = "broadcast(" in inspect.getsource(training_epoch_loop)
    script = REPO / "tests" / "compat" / "scripts" / "sigterm_fit.py"
    run = run_script(script, [str(tmp_path)], timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.output[-6000:]
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["steps"] == 10
        assert record["sigterm_broadcasts"] == 0  # Lightning's own (rank 0's flag, every step) never ran
        # before steps 0, 3, 6, 9 of 10, and at the epoch's last batch: on every Lightning version
        assert record["sigterm_agreements"] == 5, record
        if per_step_broadcast:
            assert record["loop_has_method"], "Lightning broadcasts SIGTERM per step under a new name: " \
                                              "gossip no longer finds _broadcast_sigterm_tensor to replace"
            assert record["replaced_on_instance"]
        else:
            assert not record["loop_has_method"] and not record["replaced_on_instance"]


class _Unsized(__import__("torch").utils.data.IterableDataset):
    """12 batches an epoch, with no length: what Lightning sees of the asynchronous mode's work-sharing loader."""

    def __iter__(self):
        import torch

        for i in range(12):
            yield torch.full((2, 4), float(i))


def test_patches_of_the_fit_loop_and_checkpoint_names_work_on_this_lightning(tmp_path):
    """_lightning_compat's patches, on a real fit: Lightning counts the expected batches (estimated_stepping_batches,
    the progress bar's total) but the epoch still ends where the data does; ModelCheckpoint names its files after
    the agreed step. Fails on a Lightning release where one of them stops working."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_gossip._lightning_compat import (
        agree_on_checkpoint_step,
        expect_batches_per_epoch,
        last_batch_of_epoch,
    )

    seen = {"estimate": None, "batches": [], "last": [], "total": None}

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            seen["batches"].append(batch_idx)
            return self.layer(batch).sum()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen["last"].append(last_batch_of_epoch(self.trainer))

        def on_train_epoch_start(self):
            seen["total"] = self.trainer.num_training_batches

        def configure_optimizers(self):
            seen["estimate"] = self.trainer.estimated_stepping_batches
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(_Unsized(), batch_size=None)

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{step}")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[checkpoint])
    expect_batches_per_epoch(trainer, lambda: 5)
    agree_on_checkpoint_step(checkpoint, lambda: 99)
    trainer.fit(Model())
    assert seen["estimate"] == 10  # 5 expected batches x 2 epochs (unpatched: -1)
    assert seen["total"] == 5  # the progress bar's total
    assert seen["batches"] == list(range(12)) * 2  # ... yet every epoch ran to the end of its data
    assert seen["last"] == ([False] * 11 + [True]) * 2
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=1-step=99.ckpt"]
