#!/usr/bin/env bash
# Issue 13, session 8: the shipped balconies continued on the whole committed corpus (man, info
# and chat shards mixed, documents shuffled), with the sparse KL whose remainder is sampled
# (--kl-tail-samples 16: the within-tail part of the KL is trained too), one pass over 1.4M tokens.
#
#   bash recipes/corpus-mixed.sh
#
# Then the held-out checks the shipped balconies were measured with, and the ship step.
set -euo pipefail
CORPUS=recipes/corpus
python -m balcony corpus $CORPUS
python -m balcony train --init-from default --data $CORPUS --out runs/corpus-c --max-tokens 1400000 \
  --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 100 --checkpoint-every 50
source recipes/held_out.sh
evaluate runs/corpus-c corpus-c
cp runs/corpus-c/metrics.jsonl recipes/results/corpus-c.metrics.jsonl
cp runs/corpus-c/learning_curve.png recipes/results/corpus-c.learning-curve.png
# It beat the shipped balconies on every held-out text at every exit, so it ships: bf16 (21 MB),
# then measured as shipped (bf16 weights loaded into the fp32 model).
python - runs/corpus-c src/balcony/resources/smollm2-135m-instruct <<'PY'
import sys, torch
from balcony import BalconyModel
BalconyModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.bfloat16)
PY
evaluate default shipped
python - <<'PY'
import json
from balcony.evaluation.bench import plot
bench = json.load(open("recipes/results/smollm2-default.bench.json"))
plot(bench, json.load(open("recipes/results/shipped.eval-chat.json")), "recipes/results/shipped.quality-vs-speed.png")
PY
