"""2 nodes x 2 processes on this machine (num_nodes=2, devices=2), each process started by the test with its node's
environment: torchrun-style (NODE_RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) or SLURM's (SLURM_PROCID,
SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, ...), as srun sets it. Ranks must be consistent (global = node * 2 +
local, the same as torch.distributed's), every rank must finish, and the final consensus must be the same on all."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.distributed import free_port
from tests.reliability import SCRIPTS
from tests.helpers.processes import ROOT, kill_group, script_env

NODES, PER_NODE = 2, 2


def _env(kind: str, node: int, local: int, port: int) -> dict[str, str]:
    env = script_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_"))] + ["NODE_RANK", "GROUP_RANK", "RANK"]:
        env.pop(key, None)
    if kind == "env":
        env.update(NODE_RANK=str(node), LOCAL_RANK=str(local), WORLD_SIZE=str(NODES * PER_NODE))
    else:
        env.pop("WORLD_SIZE", None)
        env.update(SLURM_NTASKS=str(NODES * PER_NODE), SLURM_NTASKS_PER_NODE=str(PER_NODE),
                   SLURM_NNODES=str(NODES), SLURM_PROCID=str(node * PER_NODE + local), SLURM_LOCALID=str(local),
                   SLURM_NODEID=str(node), SLURM_JOB_ID="4242", SLURM_JOB_NAME="gossip-multinode-test",
                   SLURM_NODELIST="localhost", SLURM_CPUS_PER_TASK="1")
    return env


@pytest.mark.parametrize("kind, environment", [pytest.param("env", "LightningEnvironment", marks=pytest.mark.slow),
                                               pytest.param("slurm", "SLURMEnvironment", marks=pytest.mark.slow)])
def test_two_nodes_two_processes_each(kind: str, environment: str, tmp_path: Path) -> None:
    port = free_port()
    procs = []
    try:
        for node in range(NODES):
            for local in range(PER_NODE):
                log = open(tmp_path / f"node{node}_local{local}.log", "wb")
                procs.append(subprocess.Popen([sys.executable, str(SCRIPTS / "multinode_fit.py"), str(tmp_path)],
                                              cwd=str(ROOT), env=_env(kind, node, local, port), stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 400
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            kill_group(p.pid)
            p.wait(timeout=10)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert codes == [0] * (NODES * PER_NODE), logs
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(NODES * PER_NODE)]
    for index, record in enumerate(records):
        node, local = divmod(index, PER_NODE)
        assert record["environment"] == environment
        assert (record["global_rank"], record["node_rank"], record["local_rank"]) == (index, node, local), record
        assert record["dist_rank"] == index and record["world_size"] == NODES * PER_NODE
        assert record["pid"] == procs[index].pid  # the process the test started as that node's local rank
        assert record["global_step"] == records[0]["global_step"] > 0
    assert len({r["checksum"] for r in records}) == 1  # final consensus: one model on every rank
    assert sum(r["messages_sent"] for r in records) > 0
