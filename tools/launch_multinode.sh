#!/usr/bin/env bash
# Multi-node training with torchrun: run this same command on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS=4 tools/launch_multinode.sh -c configs/full.yaml --name full-4x2
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 GPUS=4 tools/launch_multinode.sh -c configs/full.yaml --name full-4x2
#
# Every rank reads its own part of each epoch (exact epochs across ranks); only rank 0 writes the run
# folder, so RUNS (config key `out`) must be on a file system all nodes see, as must the shards.
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host name or IP of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS="${GPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
# DALI and the loss of a data-loading core are per rank: leave cores to each rank's DALI threads.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m mame_fast train "$@"
