#!/usr/bin/env bash
# Issue 13, session 11: the control of recall.sh: the same start, data, order, steps and settings
# with --recall-weight 0, so the two runs differ only in the weight (validation reports agreement
# at the recall positions either way).
#
#   bash recipes/recall-control.sh
set -euo pipefail
python -m balcony train --init-from runs/soup50 --data recipes/corpus --corpus-sources books,bible,reading \
  --skip-tokens 2500000 --max-tokens 1400000 --out runs/recall-control --recall-weight 0 \
  --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 100 --checkpoint-every 50
cp runs/recall-control/metrics.jsonl recipes/results/recall-control.metrics.jsonl
cp runs/recall-control/learning_curve.png recipes/results/recall-control.learning-curve.png
python recipes/lambada_dev.py runs/recall-control --json recipes/results/recall-control.lambada-dev.json
source recipes/held_out.sh
evaluate runs/recall-control recall-control
