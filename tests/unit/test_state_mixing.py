"""The sum-weight mixing rule on flat buffers, in one process against hand-computed values."""

import pytest
import torch
from torch import nn

from lightning_gossip.gossip.state import HEADER_BYTES, GossipState, gossiped_tensors


def _state(value: float, weight: float, dtype=None) -> tuple[GossipState, nn.Module]:
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for t in gossiped_tensors(module):
            t.fill_(value)
    return GossipState(gossiped_tensors(module), weight, dtype), module


def test_gossiped_tensors_take_float_buffers_but_not_counters():
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    names = [t.shape for t in gossiped_tensors(module)]
    assert len(names) == 2 + 2 + 2  # weight, bias, bn weight/bias, running mean/var; not num_batches_tracked
    assert len(gossiped_tensors(module, include_buffers=False)) == 4


def test_pack_then_mix_is_the_weighted_mean():
    receiver, module = _state(1.0, 0.25)
    sender, _ = _state(5.0, 0.75)
    message = sender.pack(sender.new_message(), step=3, sender=1)
    assert message.numel() == HEADER_BYTES + sender.numel * 4
    weight, step, src = GossipState.read_header(message)
    assert (weight, step, src) == (0.75, 3, 1)
    receiver.mix(message, weight)
    expected = (0.25 * 1.0 + 0.75 * 5.0) / 1.0
    for t in gossiped_tensors(module):
        assert torch.allclose(t, torch.full_like(t, expected))
    assert receiver.weight == 1.0


def test_weight_travels_as_float64_exactly():
    sender, _ = _state(0.0, 1.0 / 3.0)
    message = sender.pack(sender.new_message(), step=0, sender=0)
    assert GossipState.read_header(message)[0] == 1.0 / 3.0


def test_bf16_transfer_halves_payload_and_mixes_approximately():
    receiver, module = _state(1.0, 0.5, torch.float32)
    sender, _ = _state(3.0, 0.5, torch.bfloat16)
    assert sender.payload_bytes == receiver.payload_bytes // 2
    message = sender.pack(sender.new_message(), step=0, sender=0)
    receiver.transfer_dtype = torch.bfloat16  # both ends agree on the wire format
    receiver.mix(message, 0.5)
    for t in gossiped_tensors(module):
        assert torch.allclose(t, torch.full_like(t, 2.0))


def test_non_finite_payload_is_detected():
    sender, module = _state(1.0, 0.5)
    with torch.no_grad():
        next(module.parameters())[0, 0] = float("nan")
    message = sender.pack(sender.new_message(), step=0, sender=0)
    assert not sender.payload_is_finite(message)


def test_model_without_float_tensors_is_rejected():
    with pytest.raises(ValueError, match="at least one floating-point parameter"):
        GossipState([], 1.0)


