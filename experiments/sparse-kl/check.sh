#!/usr/bin/env bash
# Is the sparse KL (--kl-topk) as good as the exact one? Same data, same steps, same seed:
# fresh balconies at 15/20/25 trained on 60 x 4 x 512 docstring tokens, once with the exact
# full-vocabulary KL, once with the sparse KL whose remainder is one bucket and once with its
# remainder sampled (--kl-tail-samples), then evaluated on the shipped held-out chat text and the
# held-out docstrings (figures: experiments/README.md).
#   OUT=runs/default bash experiments/sparse-kl/check.sh          # OUT: the recipes/default/make.sh folder
#   KINDS="sparse-tail" bash experiments/sparse-kl/check.sh       # one of them
#   KINDS=exact SEED=1 bash experiments/sparse-kl/check.sh        # another seed: how far runs differ by chance
#   KINDS=exact INIT=next bash experiments/sparse-kl/check.sh     # balconies that start as the next base layer
#                                                                 # (results go to experiments/init-next)
set -euo pipefail
CORPUS=${OUT:-runs/default}/data/docstrings-train.jsonl  # stage `docstrings` of recipes/default/make.sh
HERE=experiments/sparse-kl; [ "${INIT:-copy}" = next ] && HERE=experiments/init-next
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
    --json $HERE/kl-$kind$TAG.eval-chat.json
  python -m balcony eval runs/kl-$kind$TAG --data src/balcony/resources/corpus/heldout-docstrings.jsonl --max-tokens 24576 \
    --json $HERE/kl-$kind$TAG.eval-heldout-docstrings.json
  cp runs/kl-$kind$TAG/metrics.jsonl $HERE/kl-$kind$TAG.metrics.jsonl
done
