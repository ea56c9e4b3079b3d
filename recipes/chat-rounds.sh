#!/usr/bin/env bash
# Issue 13, session 12: more of the model's own chats. The chat source had used up its prompt list
# (2,240 of 2,360 prompts answered); it now goes through the list again in a new seeded order each
# round, answering afresh, and samples 64 prompts at once (1.7x the tokens/s of 16 here). Then
# `default` (soup50, fp32) is continued on every chat shard, old and new, mixed. Its average with
# the start (recipes/soup.py, as stage 5 was made) is measured on the chat text only: it gives back
# most of the gain, so the continuation itself ships (stage 6).
#
#   bash recipes/chat-rounds.sh            (SKIP_CORPUS=1: the corpus already grown)
#   bash recipes/ship-default.sh runs/chat3 session12
set -euo pipefail
[ "${SKIP_CORPUS:-0}" = 1 ] || python -m balcony corpus recipes/corpus --source chat --batch 64 --seconds 2400 \
  --shard-tokens 100000
python -m balcony train --init-from runs/soup50 --data recipes/corpus --corpus-sources chat \
  --max-tokens 1000000 --out runs/chat3 \
  --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 100 --checkpoint-every 50
cp runs/chat3/metrics.jsonl recipes/results/chat3.metrics.jsonl
cp runs/chat3/learning_curve.png recipes/results/chat3.learning-curve.png
python recipes/soup.py runs/soup50 runs/chat3 --alpha 0.5 --out runs/chat3-soup50
source recipes/held_out.sh
evaluate runs/chat3 chat3
python -m balcony eval runs/chat3-soup50 --data src/balcony/resources/heldout-smollm2.jsonl \
  --json recipes/results/chat3-soup50.eval-chat.json
