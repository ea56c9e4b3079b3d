#!/usr/bin/env bash
# top1-weight: does a cross-entropy term against the teacher's top-1 token (--top1-weight W, beside
# the KL) buy agreement? default-v3 continued on 300K corpus tokens it did not read, with W and
# without: the run without it is stage v4-part1 of recipes/default/make.sh (the control, same data,
# seed and draws); this run reads the teacher from that stage's cache.
#
#   bash experiments/top1-weight/run.sh [OUT]     (W=0.5 by default; OUT: the make.sh folder)
set -euo pipefail
OUT=${1:-runs/default} W=${W:-0.5} HERE=experiments/top1-weight
python -m balcony train --init-from "$OUT/default-v3" --data recipes/corpus --corpus-shards 0-36 --skip-tokens 1416005 \
  --max-tokens 300000 --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 \
  --kl-tail-samples 16 --teacher-cache "$OUT/runs/teacher-cache-v4" --val-fraction 0.02 --val-sequences 16 \
  --eval-every 50 --checkpoint-every 50 --top1-weight "$W" --out "runs/top1-$W"
cp "runs/top1-$W/metrics.jsonl" "$HERE/top1-$W.metrics.jsonl"
export RESULTS=$HERE; source recipes/default/held_out.sh
evaluate "runs/top1-$W" "top1-$W"
