#!/usr/bin/env bash
# Stage 1 of the shipped `default` balconies: exits 15, 20, 25 of the embedded
# SmolLM2-135M-Instruct, trained with the project's own trainer on 2 CPU cores. Stage 2
# (recipes/smollm2-chat.sh) continues from this run's output and ships the result in bf16
# inside the package. Until session 4 this stage alone was what shipped (its figures below).
#
#   bash recipes/smollm2-default.sh [RUN_DIR]      # then: bash recipes/smollm2-chat.sh
#
# Data: `pydocs`, the docstrings of this Python's standard library and installed packages
# (balcony.training.data.python_docs_corpus, ~10M tokens; read in a fixed shuffled order, of which this
# run reads the first 1.3M tokens once). The corpus depends on what is installed: the shipped
# run read the file `python recipes/docstring_corpus.py --out runs/corpus/docstrings.jsonl` wrote
# on a machine set up by scripts/setup.sh before the serving extras existed (4,831 documents,
# 42,173,233 bytes, sha256 10d1b274...b821cad3), passed as --data runs/corpus/docstrings.jsonl.
# Held-out text for evaluation: the model's own answers (recipes/make_heldout.py) and the GPL-3
# licence text, neither of which anything here trains on.
# 635 steps x 4 x 512 tokens, lr 1e-3 cosine, 2% warm-up, bf16 autocast (KL in fp32): 93 min
# on 2 CPU cores at ~235 tokens/s.
set -euo pipefail
RUN="${1:-runs/smollm2-default}"

python -m balcony train --exits 15,20,25 --data pydocs --out "$RUN" \
  --max-tokens 1300000 --batch-size 4 --seq-len 512 --lr 1e-3 --warmup 0.02 --precision bf16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 40 --checkpoint-every 20

cp "$RUN/metrics.jsonl" recipes/results/smollm2-default.metrics.jsonl
cp "$RUN/learning_curve.png" recipes/results/smollm2-default.learning-curve.png
