#!/usr/bin/env bash
# recall-weight (the trial):
# default-v5 (fp32) continued with --recall-weight 3 on 1.4M tokens of the books / bible / reading
# mix that stage v5-books did not read (--skip-tokens 2500000). A token whose next one is a less
# common token already seen in its row weighs 1 + W (about 15% of the tokens); LAMBADA's last word
# is such a recall (experiments/recall-weight/lambada_dev.py scores documents the downstream table
# never samples). Validation reports agreement at the recall positions either way.
#
#   bash experiments/recall-weight/recall.sh [OUT]     # OUT: the recipes/default/make.sh folder
set -euo pipefail
OUT=${1:-runs/default} HERE=experiments/recall-weight
python -m balcony train --init-from "$OUT/runs/v5" --data recipes/corpus --corpus-shards 37-85 \
  --skip-tokens 2500000 --max-tokens 1400000 --out runs/recall --recall-weight 3 \
  --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 100 --checkpoint-every 50
cp runs/recall/metrics.jsonl $HERE/recall.metrics.jsonl
cp runs/recall/learning_curve.png $HERE/recall.learning-curve.png
python $HERE/lambada_dev.py runs/recall --json $HERE/recall.lambada-dev.json
export RESULTS=$HERE; source recipes/default/held_out.sh
evaluate runs/recall recall
