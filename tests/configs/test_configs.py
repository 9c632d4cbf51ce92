"""Every config in conf/ composes and instantiates (datamodule, model, strategy, callbacks, loggers, Trainer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lightning_gossip  # noqa: F401  (registers the strategies)
from lightning_gossip.app.fit import instantiate_callbacks, instantiate_loggers

CONF = Path(__file__).resolve().parents[2] / "conf"
try:
    import tensorboard  # noqa: F401

    HAS_TENSORBOARD = True
except ImportError:
    HAS_TENSORBOARD = False


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(tmp_path: Path, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...}
    return cfg


def instantiate_all(cfg: DictConfig) -> dict:
    strategy = instantiate(cfg.strategy)
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=instantiate_callbacks(cfg.get("callbacks")),
                          logger=instantiate_loggers(cfg.get("logger")) or False)
    return {"data": instantiate(cfg.data), "model": instantiate(cfg.model), "strategy": strategy, "trainer": trainer}


def test_groups_exist():
    for group in ("data", "model", "strategy", "trainer", "logger", "callbacks", "experiment", "hydra", "paths"):
        assert options(group), f"conf/{group}/ is empty"
    assert {"digits", "synthetic", "image_folder"} <= set(options("data"))
    assert {"mlp", "cnn", "resnet20"} <= set(options("model"))
    assert {"gossip", "gossip_async", "gossip_spawn", "ddp", "local_sgd", "single"} <= set(options("strategy"))


def test_default_config(tmp_path):
    cfg = compose_train(tmp_path, [])
    assert cfg.strategy._target_ == "lightning_gossip.GossipStrategy"
    assert cfg.trainer.devices == 4 and cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.use_distributed_sampler is False  # the datamodules shard themselves
    assert cfg.strategy.seed == cfg.seed and cfg.data.seed == cfg.seed
    objs = instantiate_all(cfg)
    assert isinstance(objs["strategy"], lightning_gossip.GossipStrategy)
    assert objs["strategy"].p == pytest.approx(0.1)
    assert objs["trainer"].strategy is objs["strategy"]
    assert objs["trainer"].max_epochs == cfg.trainer.max_epochs
    expected = {"CSVLogger", "TensorBoardLogger"} if HAS_TENSORBOARD else {"CSVLogger"}
    assert {type(lg).__name__ for lg in objs["trainer"].loggers} == expected
    assert any(type(cb).__name__ == "ModelCheckpoint" for cb in objs["trainer"].callbacks)
    # paths resolve into the run folder
    assert str(tmp_path) in OmegaConf.to_container(cfg.callbacks, resolve=True)["model_checkpoint"]["dirpath"]


@pytest.mark.parametrize("name", options("data"))
def test_data_configs(tmp_path, name):
    cfg = compose_train(tmp_path, [f"data={name}"])
    dm = instantiate(cfg.data)
    assert dm.batch_size == cfg.data.batch_size and dm.split == "iid"
    if name == "image_folder":  # needs a user-given local path; the default one does not exist here
        with pytest.raises(FileNotFoundError, match="data.path"):
            dm.setup("fit")
        return
    dm.setup("fit")
    x, y = dm.train_set[0]
    assert tuple(x.shape) == tuple(cfg.data.input_shape)
    assert 0 <= int(y) < cfg.data.num_classes


@pytest.mark.parametrize("name", options("model"))
@pytest.mark.parametrize("data", ["digits", "synthetic"])
def test_model_configs(tmp_path, name, data):
    overrides = [f"model={name}", f"data={data}"]
    if data == "synthetic" and name != "mlp":
        overrides.append("data.input_shape=[1,8,8]")  # convolutions need an image shape
    cfg = compose_train(tmp_path, overrides)
    model = instantiate(cfg.model)
    x = torch.randn(3, *cfg.data.input_shape)
    assert model(x).shape == (3, cfg.data.num_classes)
    optim = model.configure_optimizers()
    optimizer = optim["optimizer"] if isinstance(optim, dict) else optim
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.model.optimizer.lr)


@pytest.mark.parametrize("name", options("strategy"))
def test_strategy_configs(tmp_path, name):
    cfg = compose_train(tmp_path, [f"strategy={name}"])
    objs = instantiate_all(cfg)
    strategy = objs["trainer"].strategy
    if name == "single":
        assert objs["trainer"].num_devices == 1
        assert type(strategy).__name__ == "SingleDeviceStrategy"
    elif name == "ddp":
        assert type(strategy).__name__ == "DDPStrategy" and objs["trainer"].num_devices == 4
    else:
        assert isinstance(strategy, lightning_gossip.GossipStrategy)
        assert strategy._start_method == ("spawn" if name == "gossip_spawn" else "popen")
        asynchronous = name in ("gossip_async", "gossip_outer_async")
        assert strategy.options.asynchronous is asynchronous
        # the app shards the data itself, except in asynchronous mode, where the strategy shares it out
        assert objs["trainer"]._accelerator_connector.use_distributed_sampler is asynchronous
        if name == "local_sgd":
            assert strategy.p == 0.0 and strategy.options.average_every == cfg.strategy.average_every > 0
        if name.startswith("gossip_outer"):  # the registered names' settings, written once more for Hydra: in step
            from lightning_gossip.gossip.outer import OUTER_STRATEGIES

            settings = OUTER_STRATEGIES[name][1]
            assert {key: getattr(strategy.options, key) for key in settings} == settings
        else:
            assert strategy.options.outer_every is None


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_configs(tmp_path, name):
    if name == "gpu" and not torch.cuda.is_available():
        cfg = compose_train(tmp_path, [f"trainer={name}"])
        assert cfg.trainer.accelerator == "gpu"
        return
    cfg = compose_train(tmp_path, [f"trainer={name}"])
    trainer = instantiate_all(cfg)["trainer"]
    assert trainer.num_devices == cfg.trainer.devices


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_logger_and_callback_configs(tmp_path, group):
    for name in options(group):
        cfg = compose_train(tmp_path, [f"{group}={name}"])
        objs = instantiate_all(cfg)
        if name == "none":
            assert not cfg.get(group)
        if group == "logger" and name == "tensorboard" and not HAS_TENSORBOARD:
            assert not objs["trainer"].loggers
        elif group == "logger" and name in ("csv", "tensorboard"):
            assert [type(lg).__name__ for lg in objs["trainer"].loggers] == \
                [{"csv": "CSVLogger", "tensorboard": "TensorBoardLogger"}[name]]


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_configs(tmp_path, name):
    cfg = compose_train(tmp_path, [f"experiment={name}"])
    assert cfg.task_name == name
    objs = instantiate_all(cfg)
    assert objs["data"].batch_size == 16
    # the large-batch baseline of the equivalence claim composes with the same preset
    single = compose_train(tmp_path, [f"experiment={name}", "strategy=single", "data.batch_size=64"])
    assert instantiate_all(single)["trainer"].num_devices == 1


def test_label_skew_and_launcher_switch_compose(tmp_path):
    cfg = compose_train(tmp_path, ["data.split=label_skew", "data.classes_per_worker=3", "strategy.start_method=spawn",
                                   "strategy.topology=ring", "strategy.p=0.5"])
    objs = instantiate_all(cfg)
    assert objs["data"].split == "label_skew" and objs["data"].classes_per_worker == 3
    assert objs["strategy"]._start_method == "spawn" and objs["strategy"].p == 0.5


def test_bad_values_fail_at_instantiation(tmp_path):
    cfg = compose_train(tmp_path, ["strategy.p=1.5"])
    with pytest.raises(Exception, match="p"):
        instantiate(cfg.strategy)
    cfg = compose_train(tmp_path, ["data.split=bogus"])
    with pytest.raises(Exception, match="split"):
        instantiate(cfg.data)


def test_tensorboard_is_skipped_with_a_warning_when_not_installed(tmp_path, monkeypatch):
    import lightning.fabric.loggers.tensorboard as tb

    monkeypatch.setattr(tb, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(tb, "_TENSORBOARDX_AVAILABLE", False)
    cfg = compose_train(tmp_path, ["logger=default"])
    with pytest.warns(UserWarning, match="logger 'tensorboard' skipped"):
        loggers = instantiate_loggers(cfg.logger)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]


# -- the asynchronous mode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [["strategy=gossip_async"], ["strategy.asynchronous=true"],
                                       ["strategy=gossip_spawn", "strategy.asynchronous=true"]])
def test_asynchronous_mode_composes_and_shares_the_data_out(tmp_path, overrides):
    """strategy=gossip_async, or a plain override of the schema's strategy.asynchronous (no `+`), on any gossip
    config; the trainer then lets the strategy share the training data out (use_distributed_sampler follows)."""
    from lightning_gossip.app.checks import check_config

    cfg = compose_train(tmp_path, overrides)
    assert cfg.strategy.asynchronous is True and cfg.trainer.use_distributed_sampler is True
    check_config(cfg)
    objs = instantiate_all(cfg)
    assert objs["strategy"].options.asynchronous is True
    assert objs["trainer"]._accelerator_connector.use_distributed_sampler is True
    # and back: asynchronous=false is lock-step with the app's own equal shards
    lock_step = compose_train(tmp_path, [*overrides, "strategy.asynchronous=false"])
    assert lock_step.trainer.use_distributed_sampler is False
    assert instantiate_all(lock_step)["strategy"].options.asynchronous is False


def test_asynchronous_mode_with_static_shards_is_an_explicit_choice(tmp_path):
    """trainer.use_distributed_sampler=false keeps each rank's (label-skewed) part: allowed, and nothing shares."""
    from lightning_gossip.app.checks import check_config

    cfg = compose_train(tmp_path, ["strategy=gossip_async", "trainer.use_distributed_sampler=false",
                                   "data.split=label_skew"])
    check_config(cfg)
    assert instantiate_all(cfg)["trainer"]._accelerator_connector.use_distributed_sampler is False
    # the configs without a strategy.asynchronous key keep the app's own shards
    for name in ("ddp", "single"):
        assert compose_train(tmp_path, [f"strategy={name}"]).trainer.use_distributed_sampler is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+trainer.max_steps=10"], "trainer.max_steps=10: ranks count their own steps"),
        (["+trainer.min_steps=5"], "trainer.min_steps=5: use trainer.min_epochs"),
        (["+trainer.val_check_interval=0.5"], "trainer.val_check_interval=0.5: validation inside an epoch"),
        (["+trainer.val_check_interval=20"], "trainer.val_check_interval=20: validation inside an epoch"),
        (["trainer.check_val_every_n_epoch=null"], "trainer.check_val_every_n_epoch=null validates every N"),
        (["+callbacks.model_checkpoint.every_n_train_steps=50"], "callbacks.model_checkpoint saves inside an epoch"),
        (["+trainer.limit_train_batches=0.5"], "trainer.limit_train_batches=0.5: the training data is shared out"),
        (["data.split=label_skew"], "data.split=label_skew: the training data is shared out dynamically"),
    ],
)
def test_asynchronous_mode_refuses_what_it_cannot_do_before_any_worker(tmp_path, overrides, message):
    from lightning_gossip.app.checks import ConfigError, check_config

    for mode in (["strategy=gossip_async"], ["strategy.asynchronous=true"]):
        cfg = compose_train(tmp_path, [*mode, *overrides])
        with pytest.raises(ConfigError, match="Invalid config for asynchronous gossip") as info:
            check_config(cfg)
        assert message in str(info.value), str(info.value)
    # the same settings are fine in lock-step
    check_config(compose_train(tmp_path, overrides))


def test_asynchronous_mode_allows_epoch_based_settings(tmp_path):
    from lightning_gossip.app.checks import check_config

    check_config(compose_train(tmp_path, ["strategy=gossip_async", "+trainer.fast_dev_run=true"]))  # the same batches
    check_config(compose_train(tmp_path, ["strategy=gossip_async", "trainer=debug", "+trainer.max_time=00:00:01:00",
                                          "+trainer.val_check_interval=1.0", "trainer.check_val_every_n_epoch=2",
                                          "trainer.limit_train_batches=1.0", "+trainer.max_steps=-1"]))


def test_asynchronous_switch_must_be_a_bool(tmp_path):
    from lightning_gossip.app.checks import ConfigError, check_config

    with pytest.raises(ConfigError, match="strategy.asynchronous must be true or false, got 'yes'"):
        check_config(compose_train(tmp_path, ["strategy.asynchronous='yes'"]))
