"""The accounting every survival run must show (issue 20), checked the same way for plain torch and Fabric.

``out``: each survivor's record (``seen`` per epoch: the sample ids it trained and the chunks every rank finished
as it saw them; its final ``weight``, loss ``report``, flattened final model ``flat``, ``counters`` and ``alive``
ranks); ``victim_trained``: per epoch, the ids the lost ranks trained before they died.
"""

from __future__ import annotations

from typing import Any


def check_survival_accounting(out: dict[int, Any], victims: list[int], victim_trained: dict[int, list[int]],
                              epochs: int, samples: int, batch: int) -> dict[str, Any]:
    survivors = sorted(out)
    first = out[survivors[0]]
    report = first["report"]
    # Every survivor has the same report: each victim declared once, its weight accounted at a consistent cut.
    assert all(out[r]["report"] == report for r in survivors)
    assert sorted(peer["rank"] for peer in report["lost"]) == sorted(victims)
    assert all(out[r]["alive"] == survivors for r in survivors)
    assert all(out[r]["counters"]["peers_lost"] == len(victims) for r in survivors)
    assert 0.0 < report["weight_lost"] < 1.0
    # The survivors' weights sum to 1 - what the report says was lost, to float64 rounding.
    total = sum(out[r]["weight"] for r in survivors)
    assert abs(total - (1.0 - report["weight_lost"])) < 1e-12, (total, report["weight_lost"])
    # The final consensus is the same on every survivor (bit for bit: one all-reduce result, loaded everywhere).
    assert all(out[r]["flat"] == first["flat"] for r in survivors)
    for epoch in range(epochs):
        finished = first["seen"][epoch]["finished"]
        assert all(out[r]["seen"][epoch]["finished"] == finished for r in survivors), epoch
        chunks = sorted(i for per_rank in finished.values() for i in per_rank)
        assert chunks == list(range(len(chunks))), (epoch, finished)  # every chunk finished by exactly one rank
        survivor_ids = [i for r in survivors for i in out[r]["seen"][epoch]["ids"]]
        assert len(survivor_ids) == len(set(survivor_ids)), epoch  # no survivor trained a sample twice
        lost_ids = victim_trained.get(epoch, [])
        # Everything not trained by a survivor was trained by a victim before it died...
        assert set(survivor_ids) | set(lost_ids) == set(range(samples)), epoch
        # ...and what both trained is the victims' interrupted chunks, redone by survivors (< one chunk each).
        redone = set(survivor_ids) & set(lost_ids)
        chunk_size = samples // len(chunks) if chunks else samples
        assert len(redone) < len(victims) * (chunk_size + batch), (epoch, len(redone))
        assert len(survivor_ids) + len(set(lost_ids) - redone) == samples, epoch
    return report
