"""Which strategies the benchmark runs side by side: a small registry, one entry per row.

An entry names a row, says how a worker builds the Lightning strategy for it and what traffic the strategy's own
counters do not see (DDP's gradient all-reduce, the periodic exact average of Local SGD), so bytes per step are
comparable across rows. Entries built from a name in Lightning's ``StrategyRegistry`` (``registry_name``) are
available only when that name is registered, so a mode added to ``lightning_gossip`` later (the outer-momentum
modes ``gossip_outer`` / ``gossip_outer_async``) appears in the default run as soon as it registers its name,
without any change here.

Importing this module does not import Lightning; the ``build`` functions import what they need where they run (in
the workers, and once in the parent process to check the arguments before any worker starts).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# Local SGD's averaging period when none is given (``--strategy-arg local_sgd.average_every=H``).
LOCAL_SGD_EVERY = 8


def ring_allreduce_factor(world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce, per byte all-reduced: 2 (M - 1) / M."""
    return 2.0 * (world_size - 1) / world_size if world_size > 1 else 0.0


@dataclass(frozen=True)
class BuildContext:
    """What a worker knows when it builds a row's strategy."""

    backend: str  # the process-group backend ("gloo" or "nccl")
    seed: int
    world_size: int
    args: dict[str, Any] = field(default_factory=dict)  # the user's --strategy-arg ROW.KEY=VALUE for this row
    package: str = "lightning.pytorch"  # the user's Lightning package ("pytorch_lightning" for the standalone one)


@dataclass(frozen=True)
class BenchStrategy:
    """One row of the benchmark.

    Args:
        name: the row's name (``--strategies`` takes it).
        description: one line for ``--list-strategies`` and the report.
        build: ``BuildContext -> Strategy``, called in the worker for every run of the row.
        asynchronous: ranks take different numbers of steps (budgets count samples or time; validation at the ends
            of epochs only).
        registry_name: the Lightning ``StrategyRegistry`` name the row needs; the row exists only when it is
            registered (``None``: always available).
        uncounted_bytes_per_step: ``(sizes, world_size, args) -> bytes`` each rank sends per step that the
            strategy's ``counters`` do not count (0 for what gossip counts itself). ``sizes`` holds
            ``param_bytes`` (the trainable parameters, as DDP all-reduces their gradients) and ``gossip_numel``
            (the floats gossip moves: parameters and floating-point buffers).
        default: part of a run that names no ``--strategies``.
    """

    name: str
    description: str
    build: Callable[[BuildContext], Any]
    asynchronous: bool = False
    registry_name: Optional[str] = None
    uncounted_bytes_per_step: Callable[[dict, int, dict], float] = lambda sizes, world, args: 0.0
    default: bool = True


REGISTRY: dict[str, BenchStrategy] = {}


def register(entry: BenchStrategy) -> BenchStrategy:
    if entry.name in REGISTRY:
        raise ValueError(f"benchmark strategy {entry.name!r} is registered twice")
    REGISTRY[entry.name] = entry
    return entry


# -- building ------------------------------------------------------------------------------------------------------
# Settings every gossip row gets unless the user overrides them: no per-step logging callback (a benchmark measures
# the strategy, not GossipMonitor's logging and its per-epoch consensus-distance all-reduce).
_GOSSIP_DEFAULTS = {"monitor": False}


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``cls`` takes (a registered class may not know every default this module sets)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def from_registry(registry_name: str, **defaults: Any) -> Callable[[BuildContext], Any]:
    """Build the strategy Lightning registers as ``registry_name`` with its registered arguments, then ``defaults``
    (where the class takes them), then the user's ``--strategy-arg`` for the row (which must be taken)."""

    def build(ctx: BuildContext) -> Any:
        import lightning_gossip  # noqa: F401  (registers the gossip names once Lightning is imported)

        entry = importlib.import_module(f"{ctx.package}.strategies").StrategyRegistry[registry_name]
        cls = entry["strategy"]
        kwargs = {**entry["init_params"], **_accepted(cls, {**_GOSSIP_DEFAULTS, "seed": ctx.seed,
                                                            "process_group_backend": ctx.backend, **defaults})}
        kwargs.update(ctx.args)
        return cls(**kwargs)

    return build


def _ddp(ctx: BuildContext) -> Any:
    strategies = importlib.import_module(f"{ctx.package}.strategies")
    return strategies.DDPStrategy(process_group_backend=ctx.backend, **ctx.args)


def _ddp_bytes(sizes: dict, world: int, args: dict) -> float:
    return ring_allreduce_factor(world) * sizes["param_bytes"]  # every gradient, every step


def _local_sgd_bytes(sizes: dict, world: int, args: dict) -> float:
    # GossipAverager.consensus_() all-reduces every gossiped float in float64, plus the gossip weight, every H steps.
    every = int(args.get("average_every", LOCAL_SGD_EVERY))
    return ring_allreduce_factor(world) * 8 * (sizes["gossip_numel"] + 1) / every


register(BenchStrategy("ddp", "Lightning's DDPStrategy: gradient all-reduce every step (the reference row)", _ddp,
                       uncounted_bytes_per_step=_ddp_bytes))
register(BenchStrategy("gossip", "GossipStrategy, lock-step GoSGD (registry name 'gossip', p=0.1 unless set)",
                       from_registry("gossip"), registry_name="gossip"))
register(BenchStrategy("gossip_async", "GossipStrategy(asynchronous=True): GoSGD as published, no rank waits",
                       from_registry("gossip_async"), asynchronous=True, registry_name="gossip_async"))
register(BenchStrategy("local_sgd", f"Local SGD: GossipStrategy(p=0, average_every=H), an exact average every H "
                                    f"steps (H={LOCAL_SGD_EVERY} unless set)",
                       from_registry("gossip", p=0.0, average_every=LOCAL_SGD_EVERY), registry_name="gossip",
                       uncounted_bytes_per_step=_local_sgd_bytes))
# The outer-momentum modes (issue 18): present as soon as lightning_gossip registers the names.
register(BenchStrategy("gossip_outer", "outer-momentum gossip, lock-step (registry name 'gossip_outer')",
                       from_registry("gossip_outer"), registry_name="gossip_outer"))
register(BenchStrategy("gossip_outer_async", "outer-momentum gossip, asynchronous (registry name 'gossip_outer_async')",
                       from_registry("gossip_outer_async"), asynchronous=True, registry_name="gossip_outer_async"))


# -- availability --------------------------------------------------------------------------------------------------
def registered_names() -> set[str]:
    """The strategy names in Lightning's registry once ``lightning_gossip`` is imported (imports Lightning)."""
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_gossip  # noqa: F401

    return set(StrategyRegistry.available_strategies())


def resolve(names: Optional[list[str]], available: set[str]) -> tuple[list[BenchStrategy], list[str]]:
    """The rows to run, and notes on default rows left out because their strategy name is not registered.

    ``names=None`` picks every default entry that is available; a name the user asks for must exist and be
    available, else ``ValueError`` names it and what there is.
    """
    notes = []
    if names is None:
        chosen = []
        for entry in REGISTRY.values():
            if not entry.default:
                continue
            if entry.registry_name is not None and entry.registry_name not in available:
                notes.append(f"{entry.name}: not run, Lightning has no strategy registered as "
                             f"{entry.registry_name!r} in this installation")
                continue
            chosen.append(entry)
        return chosen, notes
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"--strategies: unknown {', '.join(map(repr, unknown))}; the benchmark knows "
                         f"{', '.join(REGISTRY)}")
    missing = [n for n in names if REGISTRY[n].registry_name not in (None, *available)]
    if missing:
        raise ValueError(f"--strategies: {', '.join(map(repr, missing))} needs a strategy registered in Lightning as "
                         f"{', '.join(repr(REGISTRY[n].registry_name) for n in missing)}, which this installation of "
                         "lightning_gossip does not register")
    if len(set(names)) != len(names):
        raise ValueError(f"--strategies: {names} names a strategy twice")
    return [REGISTRY[n] for n in names], notes
