#!/usr/bin/env bash
# two-layer-exit15-v2: what does a second decoder layer buy exit 15 at equal data? Exit 15 of
# stage v2-chat grown to a 2-layer balcony (--balcony-layers 2: a copy of base layer 15 in front of
# the trained layer), trained on the same 400K tokens (data/mix-b.jsonl) as stage v2-exit15, its
# one-layer control (whose exit 15 shipped in default-v2). Stage 2's settings: bf16, lr 5e-4.
#
#   bash experiments/two-layer-exit15-v2/run.sh [OUT]     # OUT: the recipes/default/make.sh folder
set -euo pipefail
OUT=${1:-runs/default} HERE=experiments/two-layer-exit15-v2
python -m balcony train --init-from "$OUT/runs/v2-chat" --exits 15 --balcony-layers 2 --data "$OUT/data/mix-b.jsonl" \
  --out runs/chat-b15x2 --max-tokens 400000 --val-fraction 0.02 --checkpoint-every 20 \
  --batch-size 4 --seq-len 512 --lr 5e-4 --warmup 0.02 --precision bf16 --val-sequences 16 --eval-every 40
cp runs/chat-b15x2/metrics.jsonl $HERE/chat-b15x2.metrics.jsonl
cp runs/chat-b15x2/learning_curve.png $HERE/chat-b15x2.learning-curve.png
export RESULTS=$HERE; source recipes/default/held_out.sh
evaluate runs/chat-b15x2 chat-b15x2
