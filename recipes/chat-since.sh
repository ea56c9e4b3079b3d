#!/usr/bin/env bash
# Issue 13, sessions 13-: continue trained balconies on the chats the corpus grew since they were
# trained, read once, with stage 6's settings; nothing they read before is read again.
#
#   stage 7 (session 13): shards 93-97, the 449,714 chat tokens sampled after stage 6 (runs/chat3,
#   from recipes/chat-rounds.sh) was trained:
#     bash recipes/chat-since.sh runs/chat3 93-97 450000 runs/chat4
#     bash recipes/ship-default.sh runs/chat4 session13
#   stage 8 (session 13): 40 more minutes of chats first (662,978 tokens: shards 98-104), then the same:
#     python -m balcony corpus recipes/corpus --source chat --batch 64 --seconds 2400 --shard-tokens 100000
#     bash recipes/chat-since.sh runs/chat4 98-104 660000 runs/chat5
# LR, BATCH and WARMUP (environment) override stage 6's 3e-4, 4 and 0.02.
set -euo pipefail
FROM=$1 SHARDS=$2 TOKENS=$3 OUT=$4
LR=${LR:-3e-4} BATCH=${BATCH:-4} WARMUP=${WARMUP:-0.02}
NAME=$(basename "$OUT")
python -m balcony train --init-from "$FROM" --data recipes/corpus --corpus-shards "$SHARDS" \
  --max-tokens "$TOKENS" --out "$OUT" \
  --batch-size "$BATCH" --seq-len 512 --lr "$LR" --warmup "$WARMUP" --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 50 --checkpoint-every 50
cp "$OUT/metrics.jsonl" "recipes/results/$NAME.metrics.jsonl"
cp "$OUT/learning_curve.png" "recipes/results/$NAME.learning-curve.png"
source recipes/held_out.sh
evaluate "$OUT" "$NAME"
