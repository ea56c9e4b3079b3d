#!/usr/bin/env bash
# Issue 13, session 9 (stage 4 of `default`): the shipped balconies continued on the committed
# corpus's man, info and chat text that corpus-c (recipes/corpus-mixed.sh) did not read, in two
# runs: top1-0 (recipes/top1-check.sh: the first 300K unseen tokens) and then this one, on the
# rest (1.28M tokens), both with the sparse KL whose remainder is sampled, lr 3e-4 cosine.
#
#   bash recipes/top1-check.sh && bash recipes/corpus-rest.sh
#
# --skip-tokens: corpus-c's packed budget (1,416,005 tokens) + top1-0's (308,224).
set -euo pipefail
python -m balcony train --init-from runs/top1-0 --data recipes/corpus --corpus-sources man,info,chat \
  --skip-tokens 1724229 --max-tokens 1280000 --out runs/corpus-d \
  --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 100 --checkpoint-every 50
cp runs/corpus-d/metrics.jsonl recipes/results/corpus-d.metrics.jsonl
cp runs/corpus-d/learning_curve.png recipes/results/corpus-d.learning-curve.png
source recipes/held_out.sh
evaluate runs/corpus-d corpus-d
