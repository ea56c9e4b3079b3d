#!/usr/bin/env bash
# Balcony against LayerSkip-style training and depth pruning on the default model, the same
# 262,144 tokens of the committed corpus each (a quarter of the 1M the comparison is meant for),
# then held-out agreement/KL and the downstream table (100 documents a task).
#
#   bash experiments/compare-methods/run.sh [OUT]
set -euo pipefail
OUT=${1:-runs/compare-262k}
python -m balcony compare --methods balcony,layerskip,pruned --tokens 262144 --out "$OUT" \
  --data recipes/corpus --kl-topk 64 --tasks table1 --limit 100 | tee experiments/compare-methods/default-262k.txt
cp "$OUT/compare.json" experiments/compare-methods/default-262k.json
cp "$OUT/compare.png" experiments/compare-methods/default-262k.png
