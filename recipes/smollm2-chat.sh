#!/usr/bin/env bash
# Stage 2 of the shipped `default` balconies (session 4), and a 2-layer exit 15 grown from it.
#
#   bash recipes/smollm2-default.sh && bash recipes/smollm2-chat.sh
#
# continue-docs: stage 1 (runs/smollm2-default) trained on 430K more docstring tokens, none from
#    the packages whose docstrings are held out (src/balcony/resources/corpus/heldout-docstrings.jsonl).
# chat-a (its exits 20, 25 ship as `default`): continue-docs trained on the model's own chat answers
#    (recipes/chat_corpus.py: 286K tokens, prompts on 118 topics disjoint from the shipped
#    held-out text's 60) plus 61K tokens of docstrings neither run read. 167 steps, 21 min.
# chat-b15x2 (not shipped): exit 15 of chat-a grown to a 2-layer balcony (--balcony-layers 2),
#    trained on the chat answers again plus 201K tokens of docstrings no run read. 196 steps.
# chat-c15: the same for a one-layer exit 15 (the control); its exit 15 ships with chat-a's 20, 25.
# Held-out text: the shipped chat answers (other topics), the held-out docstrings and the GPL-3
# licence. Figures: recipes/README.md.
set -euo pipefail
CORPUS=runs/corpus
SHIP=src/balcony/resources/smollm2-135m-instruct
COMMON="--batch-size 4 --seq-len 512 --lr 5e-4 --warmup 0.02 --precision bf16 --val-sequences 16 --eval-every 40"

python recipes/docstring_corpus.py --out $CORPUS/docstrings-train.jsonl --heldout-out src/balcony/resources/corpus/heldout-docstrings.jsonl
python -m balcony train --init-from runs/smollm2-default --data $CORPUS/docstrings-train.jsonl \
  --out runs/continue-docs --max-tokens 430000 --val-fraction 0.01 $COMMON
python recipes/chat_corpus.py --tokens 280000 --out $CORPUS/chat.jsonl          # 41 min at ~140 tokens/s

python recipes/mix_corpus.py --out $CORPUS/mix-chat.jsonl $CORPUS/chat.jsonl \
  $CORPUS/docstrings-train.jsonl:skip=576000:take=60000
python -m balcony train --init-from runs/continue-docs --data $CORPUS/mix-chat.jsonl --out runs/chat-a \
  --max-tokens 340000 --val-fraction 0.02 --checkpoint-every 20 $COMMON

python recipes/mix_corpus.py --seed 1 --out $CORPUS/mix-b.jsonl $CORPUS/chat.jsonl \
  $CORPUS/docstrings-train.jsonl:skip=640000:take=200000
python -m balcony train --init-from runs/chat-a --exits 15 --balcony-layers 2 --data $CORPUS/mix-b.jsonl \
  --out runs/chat-b15x2 --max-tokens 400000 --val-fraction 0.02 --checkpoint-every 20 $COMMON

# chat-c15: exit 15 of chat-a, still one layer, trained on the same data as chat-b15x2 (the
# control: what the second layer buys at an equal token budget).
python -m balcony train --init-from runs/chat-a --exits 15 --data $CORPUS/mix-b.jsonl \
  --out runs/chat-c15 --max-tokens 400000 --val-fraction 0.02 --checkpoint-every 20 $COMMON

# Ship exits 20 and 25 of chat-a and exit 15 of chat-c15 in bf16 (21 MB; a 2-layer exit 15
# would make it 28 MB, over the 25 MB the artifact may take), then measure what ships (bf16
# weights loaded into the fp32 model).
python - runs/chat-a runs/chat-c15 "$SHIP" <<'PY'
import sys, torch
from balcony import BalconyModel
ship = BalconyModel.from_pretrained(sys.argv[1])
ship.balconies["15"].load_state_dict(BalconyModel.from_pretrained(sys.argv[2], base=ship.base).balconies["15"].state_dict())
ship.save_pretrained(sys.argv[3], dtype=torch.bfloat16)
PY
source recipes/held_out.sh
evaluate runs/chat-a chat-a
evaluate runs/chat-b15x2 chat-b15x2
python -m balcony eval runs/chat-c15 --data src/balcony/resources/heldout-smollm2.jsonl --json recipes/results/chat-c15.eval-chat.json
evaluate default shipped
for run in chat-a chat-b15x2 chat-c15; do
  cp runs/$run/metrics.jsonl recipes/results/$run.metrics.jsonl
  cp runs/$run/learning_curve.png recipes/results/$run.learning-curve.png
done
# A one-layer balcony's speed does not depend on its weights: the stage-1 bench
# (results/smollm2-default.bench.json, and the profile shipped beside the artifact) still
# applies; the plot pairs it with what ships now.
python - <<'PY'
import json
from balcony.evaluation.bench import plot
bench = json.load(open("recipes/results/smollm2-default.bench.json"))
plot(bench, json.load(open("recipes/results/shipped.eval-chat.json")), "recipes/results/shipped.quality-vs-speed.png")
PY
