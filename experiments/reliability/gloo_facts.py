"""What gloo does when one member of a group is SIGKILLed: the exploratory experiment behind the facts listed in
``lightning_gossip/gossip/survival.py`` (4 ranks, rank 2 kills itself; each survivor prints what its pending and new
sends/receives, the store, a group of the survivors and a collective over the old group did). Run:
``python experiments/reliability/gloo_facts.py <free port>`` (prints per rank; it checks nothing itself: the facts the
design rests on are asserted by ``tests/distributed/test_survival.py`` through the behaviour they give)."""
import os, sys, time, signal, threading, json
from datetime import timedelta
import torch, torch.distributed as dist

VICTIM = 2

def log(rank, *a):
    print(f"[{time.monotonic():.2f}] rank {rank}:", *a, flush=True)

def main(rank, world, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=15))
    side = dist.new_group(list(range(world)), backend="gloo", timeout=timedelta(days=1))
    ctrl = dist.new_group(list(range(world)), backend="gloo", timeout=timedelta(seconds=15))
    # 1. pending recv_anysource in a thread
    box = {}
    def recv_loop():
        buf = torch.zeros(4)
        try:
            w = side.recv_anysource([buf], 0)
            w.wait()
            box["first"] = ("ok", w._source_rank(), buf.tolist())
        except Exception as e:
            box["first"] = ("error", repr(e)[:200], time.monotonic())
    t = threading.Thread(target=recv_loop, daemon=True); t.start()
    # 2. pending probe send to every other rank, tag 7, never received
    probes = {}
    for p in range(world):
        if p != rank:
            probes[p] = side.send([torch.zeros(1)], p, 7)
    dist.barrier()
    if rank == VICTIM:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    t_kill = time.monotonic() + 0.5
    time.sleep(2.0)
    facts = {}
    class F(dict):
        def __setitem__(s, k, v):
            log(rank, k, "=", v); dict.__setitem__(s, k, v)
    facts__ = F(); log(rank, "after sleep")
    facts__["anysource_pending_after_death"] = box.get("first", "still pending")
    facts__["probe_completed"] = {p: w.is_completed() for p, w in probes.items()}
    def try_wait(w):
        try:
            w.wait(); return "ok"
        except Exception as e:
            return "error: " + str(e).splitlines()[0][:150]
    facts__["probe_to_victim_wait"] = try_wait(probes[VICTIM]) if rank != VICTIM else None
    # 3. new send to victim
    try:
        w = side.send([torch.zeros(1)], VICTIM, 0)
        facts__["new_send_to_victim"] = "posted; wait: " + try_wait(w)
    except Exception as e:
        facts__["new_send_to_victim"] = "raised at post: " + str(e).splitlines()[0][:150]
    # 4. re-post recv_anysource on the side group; survivors send to (rank+1 among survivors)
    survivors = [r for r in range(world) if r != VICTIM]
    me = survivors.index(rank)
    dst = survivors[(me + 1) % len(survivors)]
    try:
        buf = torch.zeros(4)
        rw = side.recv_anysource([buf], 0)
        facts__["repost_anysource"] = "posted"
    except Exception as e:
        rw = None
        facts__["repost_anysource"] = "raised: " + str(e).splitlines()[0][:150]
    try:
        sw = side.send([torch.full((4,), float(rank))], dst, 0)
        facts__["send_between_survivors"] = try_wait(sw)
    except Exception as e:
        facts__["send_between_survivors"] = "raised: " + str(e).splitlines()[0][:150]
    if rw is not None:
        done = threading.Event(); res = {}
        def w8():
            res["r"] = try_wait(rw); done.set()
        threading.Thread(target=w8, daemon=True).start()
        done.wait(5)
        facts__["reposted_anysource_result"] = res.get("r", "timeout 5s") + (f" from {rw._source_rank()}" if res.get("r") == "ok" else "")
    # first pending anysource (before death) - did it get the survivor message?
    facts__["first_anysource_final"] = box.get("first", "still pending")
    # 5. specific-source recv from victim
    try:
        w = side.recv([torch.zeros(1)], VICTIM, 3)
        facts__["recv_from_victim"] = "posted; " + try_wait(w)
    except Exception as e:
        facts__["recv_from_victim"] = "raised at post: " + str(e).splitlines()[0][:150]
    # 6. store
    store = dist.distributed_c10d._get_default_store()
    t0 = time.monotonic(); store.add("x", 1); facts__["store_add_s"] = round(time.monotonic() - t0, 4)
    # 7. new group of survivors, local sync
    t0 = time.monotonic()
    try:
        g = dist.new_group(survivors, use_local_synchronization=True, timeout=timedelta(seconds=15))
        x = torch.ones(1); dist.all_reduce(x, group=g)
        facts__["survivor_group_allreduce"] = (x.item(), round(time.monotonic() - t0, 3))
        gs = dist.new_group(survivors, backend="gloo", use_local_synchronization=True, timeout=timedelta(seconds=15))
        facts__["survivor_group2"] = dist.get_rank(gs)
    except Exception as e:
        facts__["survivor_group_allreduce"] = "error: " + str(e).splitlines()[0][:200]
    # 8. all_reduce over old control group
    t0 = time.monotonic()
    try:
        x = torch.ones(1); dist.all_reduce(x, group=ctrl)
        facts__["old_group_allreduce"] = ("ok", x.item())
    except Exception as e:
        facts__["old_group_allreduce"] = ("error", str(e).splitlines()[0][:150], round(time.monotonic() - t0, 2))
    log(rank, json.dumps(facts, default=str, indent=1))
    os._exit(0)

if __name__ == "__main__":
    world = 4
    port = int(sys.argv[1])
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=main, args=(r, world, port)) for r in range(world)]
    for p in procs: p.start()
    for p in procs: p.join(120)
    print([p.exitcode for p in procs])
