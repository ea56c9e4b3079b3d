#!/usr/bin/env bash
# Ship trained balconies as `default` (bf16 into the package) and measure what ships: the held-out
# checks, the speed profile shipped beside it, the downstream sample and speculative decoding.
#
#   bash recipes/ship-default.sh runs/corpus-d15x2 session9
#   bash recipes/ship-default.sh runs/books session10
set -euo pipefail
RUN=$1
TAG=${2:?name the session: its downstream sample is written as table1-default-limit200-TAG.*}
SHIP=src/balcony/resources/smollm2-135m-instruct
python - "$RUN" "$SHIP" <<'PY'
import sys, torch
from balcony import BalconyModel
BalconyModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.bfloat16)
PY
source recipes/held_out.sh
evaluate default shipped
# the speed profile beside the artifact (the latency-target policy and table1's cost column read it)
python -m balcony bench $SHIP --json recipes/results/shipped.bench.json
python -m balcony eval default --tasks table1 --limit 200 --json recipes/results/table1-default-limit200-$TAG.json \
  | tee recipes/results/table1-default-limit200-$TAG.txt
python benchmarks/speculative.py --prompts 8 --max-new-tokens 64 --skip assisted,dynamic \
  --json recipes/results/speculative-shipped.json
python - <<'PY'
import json
from balcony.evaluation.bench import plot
plot(json.load(open("recipes/results/shipped.bench.json")), json.load(open("recipes/results/shipped.eval-chat.json")),
     "recipes/results/shipped.quality-vs-speed.png")
PY
