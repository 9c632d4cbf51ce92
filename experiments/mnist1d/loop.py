"""One training run on MNIST-1D with M real gloo worker processes and a hand-written loop, for every method alike.

The methods differ ONLY in how the workers communicate; data, shards, model, initialisation, optimizer, steps and
evaluation are the same code for all of them:

- ``gossip``: the project's plain-torch core, :class:`lightning_gossip.gossip.GossipAverager` (what the Lightning
  strategy wraps), with probability ``p`` and a ``topology``; ``p=0`` never communicates.
- ``gossip_async``: the same averager in its asynchronous mode (``asynchronous=True``: messages are sent and mixed
  in whenever they arrive, nobody waits for a peer). Every worker still takes ``steps`` steps, and each evaluation
  brings the messages in flight home first (the exact consensus needs them), so the workers meet every
  ``eval_every`` steps: this compares the *accuracy* of the two modes at equal steps; their speed with stragglers
  is measured by ``experiments/benchmark/async_straggler.py``.
- ``gossip_outer``: the same averager with the outer optimizer (``outer_every=period``, ``outer_lr``,
  ``outer_momentum``, ``outer_nesterov``; docs/outer.md): every ``period`` steps a random pairing averages the
  models of each pair and every worker takes a Nesterov outer step from its slow weights; ``p`` is the plain gossip
  between outer steps (0: none).
- ``gossip_outer_async``: the same in the asynchronous mode: every ``period`` of its own steps a worker takes its
  outer step and pushes its new slow weights to a random peer, which mixes them in when they arrive (as
  ``gossip_async``, the workers meet at every evaluation).
- ``ddp``: torch's ``DistributedDataParallel`` (gradients all-reduced every step).
- ``local_sgd``: torch's ``PeriodicModelAverager`` (``torch.distributed.algorithms.model_averaging``): Local SGD,
  parameters averaged every ``period`` steps. It skips parameters whose ``.grad`` is None, so it runs after
  ``optimizer.step()`` and before the next ``zero_grad``.
- ``torchft_localsgd`` / ``torchft_diloco``: torchft's ``LocalSGD`` and ``DiLoCo`` (one replica per process, a
  ``Manager`` each, the Lighthouse started in the launcher process). DiLoCo's outer optimizer is SGD(``outer_lr``,
  ``outer_momentum``, Nesterov unless ``outer_nesterov=0``); the defaults, lr 0.7 and momentum 0.9, are the DiLoCo
  paper's.
- ``single``: one process (the large-batch baseline: give it ``batch_size = M * b``).

Every ``eval_every`` steps (and at the end) the workers evaluate, outside the timed training: the consensus (the
exact weighted average for gossip, the plain mean of the models otherwise) on the validation set, every worker's
own model on the validation set, the consensus distance (1/M) sum ||x_i - mean||^2, the mean training loss over the
window, and the bytes each worker has sent. At the end: test accuracy of the consensus and of every worker's own
model, wall-clock of the training steps, start-up time and peak RSS per worker.

Bytes: gossip counts whole messages as sent (the averager's counters). All-reduce methods are charged the
bandwidth-optimal ring all-reduce, 2 (M-1)/M x the model's bytes per worker per all-reduce (a model of the traffic,
not a measurement of what gloo's algorithm sent).

    python -m experiments.mnist1d.loop --method gossip --workers 4 --p 0.1 --steps 300 --out /tmp/run.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
METHODS = ("gossip", "gossip_async", "gossip_outer", "gossip_outer_async", "ddp", "local_sgd", "torchft_localsgd", "torchft_diloco", "single")


@dataclass
class RunConfig:
    method: str = "gossip"
    workers: int = 4
    steps: int = 1500
    batch_size: int = 32           # per worker
    lr: float = 0.05
    momentum: float = 0.9
    model: str = "mlp"             # mlp (the paper's 40-100-100-10) | cnn (the paper's 1-D CNN)
    split: str = "iid"             # iid | label_skew
    alpha: float = 0.3             # label skew: Dirichlet concentration
    seed: int = 1
    p: float = 0.1                 # gossip
    topology: str = "random"       # gossip
    period: int = 8                # local_sgd, torchft_*, gossip_outer: steps between averages / outer steps
    outer_lr: float = 0.7          # torchft_diloco, gossip_outer: the outer SGD's learning rate
    outer_momentum: float = 0.9    # torchft_diloco, gossip_outer: the outer SGD's momentum
    outer_nesterov: int = 1        # torchft_diloco, gossip_outer: 1 Nesterov (DiLoCo), 0 heavy-ball (NoLoCo's code)
    eval_every: int = 100
    num_samples: int = 20000
    cache_dir: str = str(REPO / "data" / "mnist1d")
    timeout_s: float = 1800.0
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        if self.method == "single" and self.workers != 1:
            raise ValueError(f"method='single' runs one worker, got workers={self.workers}.")
        if self.method != "single" and self.workers < 2:
            raise ValueError(f"method={self.method!r} needs workers >= 2, got {self.workers}.")
        if self.steps < 1 or self.eval_every < 1 or self.period < 1:
            raise ValueError(f"steps, eval_every and period must be >= 1, got {self.steps}, {self.eval_every}, "
                             f"{self.period}.")


# ---------------------------------------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------------------------------------
def _build(cfg: RunConfig, rank: int, world: int):
    import torch

    from lightning_gossip.app.data import Mnist1dDataModule
    from lightning_gossip.app.models import MLP, Conv1dNet

    dm = Mnist1dDataModule(num_samples=cfg.num_samples, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size,
                           split=cfg.split, alpha=cfg.alpha, seed=cfg.seed)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world,
                                 _accelerator_connector=SimpleNamespace(use_distributed_sampler=False))
    dm.setup("fit")
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    if cfg.model == "mlp":
        net = MLP([40], 10, hidden=[100, 100])
    elif cfg.model == "cnn":
        net = Conv1dNet([40], 10)
    else:
        raise ValueError(f"model must be 'mlp' or 'cnn', got {cfg.model!r}.")
    return dm, net


def _batches(dm, rank: int, world: int):
    """Endless (x, y) batches of this rank's shard, epoch after epoch (every rank takes the same number)."""
    sampler = dm.train_sampler() if world > 1 else None
    from lightning_gossip.app.data import ShardSampler

    if sampler is None:
        sampler = ShardSampler(len(dm.train_set), 0, 1, dm.seed)
    x_all, y_all = dm.train_set.tensors
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        idx = sampler.indices()
        for start in range(0, len(idx), dm.batch_size):
            chunk = idx[start:start + dm.batch_size]
            yield x_all[chunk], y_all[chunk]
        epoch += 1


def _accuracy(net, x, y) -> tuple[float, float]:
    import torch
    from torch.nn import functional as F

    with torch.no_grad():
        logits = net(x)
        return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y))


def worker(cfg: RunConfig, rank: int, world: int, port: int, lighthouse: Optional[str], out: Optional[str],
           t_launch: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    t_import = time.time()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=cfg.timeout_s))
    dm, net = _build(cfg, rank, world)
    params = list(net.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    allreduce_bytes = 2.0 * (world - 1) / world * model_bytes  # ring all-reduce, per worker
    model = net
    averager = None
    ft = None
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    gossip = cfg.method in ("gossip", "gossip_async", "gossip_outer", "gossip_outer_async")
    if gossip:
        from lightning_gossip.gossip import GossipAverager

        outer = {"outer_every": cfg.period, "outer_lr": cfg.outer_lr, "outer_momentum": cfg.outer_momentum,
                 "outer_nesterov": bool(cfg.outer_nesterov)} if cfg.method.startswith("gossip_outer") else {}
        averager = GossipAverager(net, p=cfg.p, topology=cfg.topology, seed=cfg.seed, mix_buffers=False,
                                  asynchronous=cfg.method in ("gossip_async", "gossip_outer_async"), **outer)
    elif cfg.method == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)
    elif cfg.method == "local_sgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        averager = PeriodicModelAverager(period=cfg.period, warmup_steps=0)
    elif cfg.method.startswith("torchft"):
        ft = _torchft_setup(cfg, net, opt, rank, world, lighthouse)
    if world > 1 and not gossip and cfg.method != "ddp":
        for p in params:  # the same start everywhere (gossip and DDP broadcast rank 0's model themselves)
            dist.broadcast(p.data, src=0)

    x_val, y_val = dm.val_set.tensors
    x_test, y_test = dm.test_set.tensors
    batches = _batches(dm, rank, world)
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    train_time = 0.0
    bytes_sent = 0.0
    t_first_step = time.time()

    def mean_over_ranks(value: float) -> float:
        if world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / world

    def gather(value: float) -> list[float]:
        if world == 1:
            return [value]
        out_list = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(out_list, torch.tensor([value], dtype=torch.float64))
        return [float(t) for t in out_list]

    def consensus_eval(x, y) -> tuple[float, float, float]:
        """(acc, loss, consensus distance) of the consensus; every rank's own model is left untouched."""
        if world == 1:
            return (*_accuracy(net, x, y), 0.0)
        if gossip:
            with averager.consensus_swapped_in() as distance:
                acc, loss = _accuracy(net, x, y)
            return acc, loss, float(distance)
        own = [p.detach().clone() for p in params]
        flat = torch.cat([p.reshape(-1) for p in own])
        mean = flat.clone()
        dist.all_reduce(mean)
        mean /= world
        distance = mean_over_ranks(float((flat - mean).pow(2).sum()))
        torch.nn.utils.vector_to_parameters(mean, params)
        acc, loss = _accuracy(net, x, y)
        for p, o in zip(params, own):
            p.data.copy_(o)
        return acc, loss, distance

    def evaluate(step: int) -> None:
        own_acc, _ = _accuracy(net, x_val, y_val)
        cons_acc, cons_loss, distance = consensus_eval(x_val, y_val)
        sent = averager.counters.bytes_sent if gossip else bytes_sent
        curve.append({
            "step": step, "train_loss": mean_over_ranks(sum(losses) / len(losses)) if losses else None,
            "val_acc": cons_acc, "val_loss": cons_loss, "own_val_acc": gather(own_acc),
            "consensus_distance": distance, "bytes_sent_per_worker": mean_over_ranks(float(sent)),
            "train_time_s": mean_over_ranks(train_time),
        })
        losses.clear()

    net.train()
    for step in range(1, cfg.steps + 1):
        x, y = next(batches)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()  # torchft LocalSGD / DiLoCo sync from the optimizer's step hook
        if gossip:
            averager.step()
        elif cfg.method == "local_sgd":
            averager.average_parameters(params)  # before the next zero_grad: it skips params whose grad is None
            if (step - 1) % cfg.period == 0:  # its own counter starts at 0: it averages at steps 1, 1+H, 1+2H, ...
                bytes_sent += allreduce_bytes
        elif cfg.method == "ddp":
            bytes_sent += allreduce_bytes
        elif ft is not None and step % cfg.period == 0:
            bytes_sent += allreduce_bytes
        train_time += time.perf_counter() - t0
        losses.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step)

    # the end: the consensus on every rank (gossip: exact weighted mean), tested with each worker's own model
    own_test = gather(_accuracy(net, x_test, y_test)[0])
    cons_test, cons_test_loss, final_distance = consensus_eval(x_test, y_test)
    if ft is not None:
        ft["exit"]()
    rss_mb = gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    startup = gather(t_first_step - t_launch)
    if rank == 0 and out:
        result = {
            "config": asdict(cfg), "world_size": world, "model_params": sum(p.numel() for p in params),
            "model_bytes": model_bytes, "curve": curve,
            "test_acc": cons_test, "test_loss": cons_test_loss, "own_test_acc": own_test,
            "final_consensus_distance": final_distance,
            "bytes_sent_per_worker": curve[-1]["bytes_sent_per_worker"],
            "train_time_s": curve[-1]["train_time_s"], "startup_s": startup, "import_s": t_import - t_launch,
            "peak_rss_mb": rss_mb,
            "gossip_counters": averager.counters.as_dict() if gossip else None,  # sends_skipped: asynchronous only
            "torch": torch.__version__,
        }
        tmp = Path(out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)
    if gossip:
        averager.end(consensus=False)  # releases the exchange's buffers and threads (finish() only drains)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if ft is not None:
        # torchft's native background threads can abort the interpreter's teardown ("terminate called without an
        # active exception"); everything is written and every rank is past the barrier, so leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _torchft_setup(cfg: RunConfig, net, opt, rank: int, world: int, lighthouse: Optional[str]) -> dict:
    """One torchft replica per process: its own TCPStore (a replica group of one), a Manager, LocalSGD or DiLoCo."""
    import torch
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo, LocalSGD

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    state = {"model": None}

    def load_state_dict(sd):
        net.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    def state_dict():
        return {"model": net.state_dict(), "optim": opt.state_dict()}

    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=cfg.timeout_s)), min_replica_size=world,
        load_state_dict=load_state_dict, state_dict=state_dict, replica_id=f"replica_{rank}",
        store_addr="127.0.0.1", store_port=store.port, rank=0, world_size=1, lighthouse_addr=lighthouse,
        use_async_quorum=False, timeout=timedelta(seconds=cfg.timeout_s),
        quorum_timeout=timedelta(seconds=cfg.timeout_s), connect_timeout=timedelta(seconds=cfg.timeout_s),
    )
    if cfg.method == "torchft_localsgd":
        wrapper = LocalSGD(manager, net, opt, sync_every=cfg.period)
    else:
        outer = torch.optim.SGD(net.parameters(), lr=cfg.outer_lr, momentum=cfg.outer_momentum,
                                nesterov=bool(cfg.outer_nesterov))
        wrapper = DiLoCo(manager, [net], opt, outer, sync_every=cfg.period, backup_device=torch.device("cpu"),
                         pin_memory=False)
    wrapper.__enter__()
    state["model"] = net

    def exit_():
        wrapper.__exit__(None, None, None)
        manager.shutdown(wait=False)

    return {"manager": manager, "wrapper": wrapper, "store": store, "exit": exit_}


# ---------------------------------------------------------------------------------------------------------------------
# the launcher
# ---------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: RunConfig, out: Path, nice: int = 0) -> dict:
    """Run ``cfg`` with ``cfg.workers`` worker processes (their own process group, killed by pgid on timeout)."""
    cfg.check()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lighthouse = None
    server = None
    if cfg.method.startswith("torchft"):
        from torchft.coordination import LighthouseServer

        server = LighthouseServer(bind="[::]:0", min_replicas=cfg.workers)
        lighthouse = server.address()
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t_launch = time.time()
    procs = []
    teardown_abort = False
    try:
        for rank in range(cfg.workers):
            cmd = [sys.executable, "-m", "experiments.mnist1d.loop", "--worker", "--rank", str(rank),
                   "--world", str(cfg.workers), "--port", str(port), "--t-launch", repr(t_launch),
                   "--config", json.dumps(asdict(cfg)), "--out", str(out)]
            if lighthouse:
                cmd += ["--lighthouse", lighthouse]
            if nice:
                cmd = ["nice", "-n", str(nice), *cmd]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                                          stdout=subprocess.PIPE if rank else None, stderr=subprocess.STDOUT))
        deadline = time.time() + cfg.timeout_s
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
        codes = [p.returncode for p in procs]
        # A worker that aborts in the interpreter's teardown (SIGABRT from a native thread), after rank 0 wrote the
        # results and every rank passed the final barrier, leaves a complete run: keep it, and say so in the JSON.
        teardown_abort = out.exists() and all(c in (0, -signal.SIGABRT) for c in codes) and any(codes)
        if (any(codes) and not teardown_abort) or not out.exists():
            tails = [p.stdout.read().decode(errors="replace")[-2000:] for p in procs[1:] if p.stdout]
            raise RuntimeError(f"run {out.name} failed: exit codes {codes}\n" + "\n".join(tails))
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
            if p.stdout:
                p.stdout.close()
        if server is not None:
            server.shutdown()
    result = json.loads(out.read_text())
    result["launch_wall_s"] = time.time() - t_launch
    if teardown_abort:
        result["teardown_exit_codes"] = codes
    out.write_text(json.dumps(result, indent=1))
    return result


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lighthouse", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--t-launch", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    for f in RunConfig.__dataclass_fields__.values():
        if f.name not in ("extra",):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = parser.parse_args(argv)
    if args.worker:
        cfg = RunConfig(**json.loads(args.config))
        worker(cfg, args.rank, args.world, args.port, args.lighthouse, args.out, args.t_launch)
        return
    values = {k: getattr(args, k) for k in RunConfig.__dataclass_fields__ if getattr(args, k, None) is not None}
    cfg = RunConfig(**values)
    result = launch(cfg, Path(args.out or "run.json"))
    print(json.dumps({k: result[k] for k in ("test_acc", "own_test_acc", "bytes_sent_per_worker", "train_time_s",
                                             "startup_s", "peak_rss_mb")}))


if __name__ == "__main__":
    main()
