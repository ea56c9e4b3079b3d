#!/usr/bin/env bash
# Issue 13, session 9: does a cross-entropy term against the teacher's top-1 token (beside the
# KL) buy agreement? Two continuations of the shipped balconies on the same 300K corpus tokens
# that corpus-c (recipes/corpus-mixed.sh) did not read (--skip-tokens: corpus-c's whole packed
# budget, 684 x 2,048 / 0.99 + 2 x 512), same seed, one with --top1-weight W; the second run reads
# the teacher from the first's cache. Then the held-out checks of every shipped artifact.
#
#   bash recipes/top1-check.sh          (W=0.5 by default)
set -euo pipefail
W=${W:-0.5}
COMMON=(--init-from default --data recipes/corpus --corpus-sources man,info,chat --skip-tokens 1416005
  --max-tokens 300000 --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048
  --kl-tail-samples 16 --teacher-cache runs/teacher-cache-top1 --val-fraction 0.02 --val-sequences 16
  --eval-every 50 --checkpoint-every 50)
source recipes/held_out.sh
if [ ! -f runs/top1-0/balcony_model.safetensors ]; then
  python -m balcony train "${COMMON[@]}" --out runs/top1-0
  cp runs/top1-0/metrics.jsonl recipes/results/top1-0.metrics.jsonl
  evaluate runs/top1-0 top1-0
fi
python -m balcony train "${COMMON[@]}" --top1-weight "$W" --out "runs/top1-$W"
cp "runs/top1-$W/metrics.jsonl" "recipes/results/top1-$W.metrics.jsonl"
evaluate "runs/top1-$W" "top1-$W"
