#!/usr/bin/env bash
# Start gossip training with torchrun; run this once on every node.
#
#   bash examples/multinode/torchrun.sh                                    # one node, NPROC_PER_NODE processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/multinode/torchrun.sh    # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash examples/multinode/torchrun.sh    # on node1
#
# Extra arguments go to train.py (e.g. --epochs 5). With GPUs set NPROC_PER_NODE to the number of GPUs per node.
set -euo pipefail

NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"   # the address of the node with NODE_RANK=0, reachable from every node
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec torchrun \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" \
    "$(dirname "$0")/train.py" "$@"
