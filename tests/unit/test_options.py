"""GossipOptions: every option checked once, with errors naming the value and the range, and held resolved."""

import pytest
import torch

from lightning_gossip.gossip import GossipOptions, Ring
from lightning_gossip.gossip.options import resolve_staleness, resolve_transfer_dtype


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p=2.0), r"p must be in \[0, 1\], got 2.0"),
        (dict(topology="mesh"), "Unknown gossip topology 'mesh'"),
        (dict(average_every=0), "average_every must be None or an integer >= 1.*got 0"),
        (dict(transfer_dtype="int8"), "transfer_dtype must be None .* got 'int8'"),
        (dict(on_nonfinite="ignore"), "on_nonfinite must be 'warn' or 'error', got 'ignore'"),
        (dict(staleness=-1), "staleness must be None or an integer >= 0.*got -1"),
    ],
)
def test_option_errors_name_the_bad_value(kwargs, match):
    options = dict(p=0.1, topology="random", average_every=None, transfer_dtype=None, on_nonfinite="warn")
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GossipOptions(**options)


def test_staleness_follows_overlap_unless_given():
    assert resolve_staleness(False, None) == 0  # blocking
    assert resolve_staleness(True, None) == 1  # overlap is one step of staleness
    assert resolve_staleness(False, 8) == 8
    assert resolve_staleness(True, 8) == 8
    assert resolve_staleness(False, 0) == 0


def test_transfer_dtype_names():
    assert resolve_transfer_dtype("bfloat16") is torch.bfloat16
    assert resolve_transfer_dtype(None) is None
    assert resolve_transfer_dtype(torch.float16) is torch.float16



def test_options_are_held_resolved():
    options = GossipOptions(topology="ring", overlap=True, transfer_dtype="bfloat16")
    assert isinstance(options.topology, Ring)
    assert options.staleness == 1 and options.overlap is True
    assert options.transfer_dtype is torch.bfloat16
    assert GossipOptions(staleness=4).overlap is True
    assert GossipOptions().staleness == 0 and GossipOptions().overlap is False


def test_replace_checks_again_and_staleness_alone_wins():
    options = GossipOptions(overlap=True)
    assert options.replace(staleness=0).staleness == 0  # staleness given alone: overlap follows it
    assert options.replace(seed=7).seed == 7 and options.replace(seed=7).staleness == 1
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 3"):
        options.replace(p=3)


@pytest.mark.parametrize("name", ["mix_buffers", "final_consensus", "overlap", "asynchronous"])
@pytest.mark.parametrize("value", ["false", "no", "True", None, 2])
def test_flags_take_only_booleans(name, value):
    # "false" is truthy in Python: it must be refused, never read as True.
    with pytest.raises(TypeError, match=f"{name} must be True or False, got {value!r}"):
        GossipOptions(**{name: value})


def test_asynchronous_refuses_staleness():
    with pytest.raises(ValueError, match="asynchronous=True mixes messages in as they arrive"):
        GossipOptions(asynchronous=True, staleness=2)


def test_schedule_seed_falls_back_only_when_unset():
    assert GossipOptions().schedule_seed(fallback=42) == 42
    assert GossipOptions(seed=3).schedule_seed(fallback=42) == 3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"outer_every": 0}, ValueError, r"outer_every must be None or an integer >= 1 \(steps\), got 0"),
        ({"outer_every": 2.5}, ValueError, r"outer_every must be None or an integer >= 1 \(steps\), got 2.5"),
        ({"outer_lr": 0.0}, ValueError, r"outer_lr must be a finite number > 0, got 0.0"),
        ({"outer_lr": float("inf")}, ValueError, r"outer_lr must be a finite number > 0, got inf"),
        ({"outer_lr": "0.7"}, ValueError, r"outer_lr must be a finite number > 0, got '0.7'"),
        ({"outer_momentum": 1.0}, ValueError, r"outer_momentum must be a number in \[0, 1\), got 1.0"),
        ({"outer_momentum": -0.1}, ValueError, r"outer_momentum must be a number in \[0, 1\), got -0.1"),
        ({"outer_nesterov": "false"}, TypeError, "outer_nesterov must be True or False, got 'false'"),
    ],
)
def test_outer_option_errors_name_the_value_and_range(kwargs, error, match):
    with pytest.raises(error, match=match):
        GossipOptions(**kwargs)


def test_outer_options_are_held_resolved():
    options = GossipOptions(p=0, outer_every=16, outer_lr=1, outer_momentum=0, outer_nesterov=False)
    assert (options.outer_every, options.outer_lr, options.outer_momentum, options.outer_nesterov) == (16, 1.0, 0.0,
                                                                                                      False)
    assert isinstance(options.outer_lr, float) and options.replace(outer_every=None).outer_every is None
    assert GossipOptions(outer_every=8, overlap=True).staleness == 1  # pairings may land later (docs/outer.md)
    assert GossipOptions(outer_every=8, asynchronous=True).mode == "asynchronous"


def test_asynchronous_refuses_a_periodic_global_average():
    # Each asynchronous rank would call the global average at its own step count and wait for the others until the
    # process-group timeout: refused once, here, for the averager, the Trainer and the Fabric strategy alike.
    with pytest.raises(ValueError, match=r"asynchronous=True cannot take average_every=4"):
        GossipOptions(asynchronous=True, average_every=4)
    assert GossipOptions(average_every=4).mode == "lock-step"
    assert GossipOptions(asynchronous=True).mode == "asynchronous"


def test_verify_follows_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("LIGHTNING_GOSSIP_VERIFY", "1")
    assert GossipOptions().verify is True and GossipOptions(verify=False).verify is False
    monkeypatch.setenv("LIGHTNING_GOSSIP_VERIFY", "0")
    assert GossipOptions().verify is False and GossipOptions(verify=True).verify is True
    monkeypatch.delenv("LIGHTNING_GOSSIP_VERIFY")
    assert GossipOptions().verify is False
    monkeypatch.setenv("LIGHTNING_GOSSIP_VERIFY", "maybe")
    with pytest.raises(ValueError, match="LIGHTNING_GOSSIP_VERIFY must be one of .* got 'maybe'"):
        GossipOptions()
    with pytest.raises(TypeError, match="verify must be True or False, got 'yes'"):
        GossipOptions(verify="yes")
