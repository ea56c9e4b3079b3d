#!/usr/bin/env bash
# Is the sparse KL (--kl-topk) as good as the exact one? Same data, same steps, same seed:
# fresh balconies at 15/20/25 trained on 60 x 4 x 512 docstring tokens, once with the exact
# full-vocabulary KL and once with the sparse KL, then evaluated on the shipped held-out chat
# text and the held-out docstrings (figures: recipes/README.md, "The sparse KL").
set -euo pipefail
CORPUS=runs/corpus/docstrings-train.jsonl  # python recipes/docstring_corpus.py --out ... --heldout-out /tmp/unused.jsonl
COMMON="--data $CORPUS --max-steps 60 --batch-size 4 --seq-len 512 --lr 1e-3 --warmup 0.05 --val-fraction 0.01
        --val-sequences 8 --eval-every 30 --seed 0"
for kind in exact sparse; do
  flags=""; [ "$kind" = sparse ] && flags="--kl-topk ${TOPK:-64} --kl-samples ${SAMPLES:-2048}"
  python -m balcony train --out runs/kl-$kind $COMMON $flags
  python -m balcony eval runs/kl-$kind --data src/balcony/resources/heldout-smollm2.jsonl \
    --json recipes/results/kl-$kind.eval-chat.json
  python -m balcony eval runs/kl-$kind --data recipes/data/heldout-docstrings.jsonl --max-tokens 24576 \
    --json recipes/results/kl-$kind.eval-heldout-docstrings.json
  cp runs/kl-$kind/metrics.jsonl recipes/results/kl-$kind.metrics.jsonl
done
