#!/usr/bin/env bash
# Issue 13, session 9: exit 15 grown to two layers (the issue lets the artifact grow to 32 MB;
# session 4 measured +0.02 agreement for the second layer at equal data, chat-b15x2 vs chat-c15).
# Exit 15 of corpus-d (recipes/corpus-rest.sh) gets a new first layer (a copy of base layer 15,
# the trunk continued) in front of its trained one; exit 15 alone trains, on 600K tokens of the
# corpus's man/info/chat stream that top1-0 and corpus-d read once (a second visit), lr 5e-4.
# Then exits 20 and 25 of corpus-d and the grown exit 15 are put into one artifact.
#
#   bash recipes/top1-check.sh && bash recipes/corpus-rest.sh && bash recipes/grow15.sh
set -euo pipefail
python -m balcony train --init-from runs/corpus-d --exits 15 --balcony-layers 2 --data recipes/corpus \
  --corpus-sources man,info,chat --skip-tokens 1416005 --max-tokens 600000 --out runs/grow15 \
  --batch-size 4 --seq-len 512 --lr 5e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 50 --checkpoint-every 50
cp runs/grow15/metrics.jsonl recipes/results/grow15.metrics.jsonl
cp runs/grow15/learning_curve.png recipes/results/grow15.learning-curve.png
python - runs/corpus-d runs/grow15 runs/corpus-d15x2 <<'PY'
import sys
from balcony import BalconyModel
rest = BalconyModel.from_pretrained(sys.argv[1])
grown = BalconyModel.from_pretrained(sys.argv[2], base=rest.base)
ship = BalconyModel.from_base(rest.base, exits=rest.exits, balcony_layers={15: 2}, tokenizer=rest.tokenizer)
for e in ship.exits:
    ship.balconies[str(e)].load_state_dict((grown if e == 15 else rest).balconies[str(e)].state_dict())
ship.save_pretrained(sys.argv[3])
PY
source recipes/held_out.sh
evaluate runs/corpus-d15x2 corpus-d15x2
