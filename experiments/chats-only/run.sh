#!/usr/bin/env bash
# chats-only: default-v2 continued on the model's own chats alone (the committed corpus's first
# chat shards, 26-30: 254K tokens), one pass, sparse KL (remainder one bucket), fp32, lr 3e-4.
# Control: default-v2.
#
#   bash experiments/chats-only/run.sh [OUT]     # OUT: the recipes/default/make.sh folder (needs default-v2)
set -euo pipefail
OUT=${1:-runs/default} HERE=experiments/chats-only
python -m balcony train --init-from "$OUT/default-v2" --data recipes/corpus --corpus-shards 26-30 --out runs/chats-only \
  --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 0 \
  --val-fraction 0.02 --val-sequences 16 --eval-every 40 --checkpoint-every 20
cp runs/chats-only/metrics.jsonl $HERE/corpus-b.metrics.jsonl
export RESULTS=$HERE; source recipes/default/held_out.sh
evaluate runs/chats-only corpus-b
