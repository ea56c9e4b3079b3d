#!/usr/bin/env bash
# manuals-only: default-v2 continued on man pages and info manuals alone (1.1M tokens of the
# committed corpus's shards 0-25), sparse KL (remainder one bucket), fp32, lr 5e-4. Control: default-v2.
#
#   bash experiments/manuals-only/run.sh [OUT]     # OUT: the recipes/default/make.sh folder (needs default-v2)
set -euo pipefail
OUT=${1:-runs/default} HERE=experiments/manuals-only
python -m balcony train --init-from "$OUT/default-v2" --data recipes/corpus --corpus-shards 0-25 --out runs/manuals-only \
  --max-tokens 1100000 --batch-size 4 --seq-len 512 --lr 5e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 \
  --kl-tail-samples 0 --val-fraction 0.01 --val-sequences 16 --eval-every 150 --checkpoint-every 50
cp runs/manuals-only/metrics.jsonl $HERE/corpus-a.metrics.jsonl
export RESULTS=$HERE; source recipes/default/held_out.sh
evaluate runs/manuals-only corpus-a
