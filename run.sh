#!/usr/bin/env bash
# Train with every GPU found (the record uses 8); with no GPU, the `cpu` preset on the bundled
# sample corpus. Extra arguments pass through as overrides, e.g. ./run.sh --num_steps=100
# Several nodes: the same command on each, e.g. NNODES=2 RDZV_ENDPOINT=node0:29500 ./run.sh
set -euo pipefail
cd "$(dirname "$0")"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -gt 0 ] && [ -n "${RDZV_ENDPOINT:-}" ]; then
  echo "run.sh: $gpus GPU(s) found: speedrun preset on ${NNODES:?set NNODES, the number of nodes} nodes x $gpus, rendezvous at $RDZV_ENDPOINT"
  exec python -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$gpus" --rdzv_backend=c10d \
    --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-speedrun}" train_gpt.py "$@"
fi
if [ "$gpus" -gt 0 ]; then
  echo "run.sh: $gpus GPU(s) found: speedrun preset on $gpus process(es)"
  exec python -m torch.distributed.run --standalone --nproc_per_node="$gpus" train_gpt.py "$@"
fi
echo "run.sh: no GPU found: the cpu preset on the bundled sample corpus (data/sample/)"
exec python train_gpt.py --preset=cpu "$@"
