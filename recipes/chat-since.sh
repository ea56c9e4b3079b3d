#!/usr/bin/env bash
# Issue 13, session 13: stage 7 of `default`. The corpus grew by five chat shards after stage 6
# was trained (shards 93-97: 449,714 tokens, the chat prompts' second round). Stage 6 (runs/chat3,
# fp32) is continued on those shards alone, read once, with stage 6's settings; what it read
# before it does not read again.
#
#   bash recipes/chat-since.sh      (needs runs/chat3, from recipes/chat-rounds.sh)
#   bash recipes/ship-default.sh runs/chat4 session13
set -euo pipefail
python -m balcony corpus recipes/corpus | python -c "import json,sys; print(json.load(sys.stdin)['sources']['chat'])"
python -m balcony train --init-from runs/chat3 --data recipes/corpus --corpus-shards 93-97 \
  --max-tokens 450000 --out runs/chat4 \
  --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 50 --checkpoint-every 50
cp runs/chat4/metrics.jsonl recipes/results/chat4.metrics.jsonl
cp runs/chat4/learning_curve.png recipes/results/chat4.learning-curve.png
source recipes/held_out.sh
evaluate runs/chat4 chat4
