#!/usr/bin/env bash
# Is the sparse KL (--kl-topk) as good as the exact one? Same data, same steps, same seed:
# fresh balconies at 15/20/25 trained on 60 x 4 x 512 docstring tokens, once with the exact
# full-vocabulary KL, once with the sparse KL whose remainder is one bucket (session 5) and once
# with its remainder sampled (--kl-tail-samples, session 8), then evaluated on the shipped
# held-out chat text and the held-out docstrings (figures: recipes/README.md, "The sparse KL").
#   KINDS="sparse-tail" bash recipes/sparse-kl-check.sh     # one of them
#   KINDS=exact SEED=1 bash recipes/sparse-kl-check.sh      # another seed: how far runs differ by chance
#   KINDS=exact INIT=next bash recipes/sparse-kl-check.sh   # balconies that start as the next base layer
set -euo pipefail
CORPUS=runs/corpus/docstrings-train.jsonl  # python recipes/docstring_corpus.py --out ... --heldout-out /tmp/unused.jsonl
COMMON="--data $CORPUS --max-steps 60 --batch-size 4 --seq-len 512 --lr 1e-3 --warmup 0.05 --val-fraction 0.01
        --val-sequences 8 --eval-every 30 --seed ${SEED:-0} --init ${INIT:-copy}"
TAG=${SEED:+-seed$SEED}${INIT:+-$INIT}
for kind in ${KINDS:-exact sparse sparse-tail}; do
  case $kind in
    exact) flags="" ;;
    sparse) flags="--kl-topk ${TOPK:-64} --kl-samples ${SAMPLES:-2048} --kl-tail-samples 0" ;;
    sparse-tail) flags="--kl-topk ${TOPK:-64} --kl-samples ${SAMPLES:-2048} --kl-tail-samples ${TAIL:-16}" ;;
  esac
  python -m balcony train --out runs/kl-$kind$TAG $COMMON $flags
  python -m balcony eval runs/kl-$kind$TAG --data src/balcony/resources/heldout-smollm2.jsonl \
    --json recipes/results/kl-$kind$TAG.eval-chat.json
  python -m balcony eval runs/kl-$kind$TAG --data src/balcony/resources/corpus/heldout-docstrings.jsonl --max-tokens 24576 \
    --json recipes/results/kl-$kind$TAG.eval-heldout-docstrings.json
  cp runs/kl-$kind$TAG/metrics.jsonl recipes/results/kl-$kind$TAG.metrics.jsonl
done
