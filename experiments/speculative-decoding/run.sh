#!/usr/bin/env bash
# speculative-decoding: exact output, faster? Balcony speculative decoding (an exit drafts, the full
# model verifies) and dynamic exits against plain greedy `generate` and transformers' assisted early
# exit, on 2 CPU cores, greedy, chat prompts from the shipped held-out set. default-v1's balconies
# (the default-v1.* files); default-v9's run is recipes/default/results/default-v9.speculative.json.
#
#   bash experiments/speculative-decoding/run.sh
set -euo pipefail
HERE=experiments/speculative-decoding
python benchmarks/speculative.py --prompts 8 --max-new-tokens 64 --json $HERE/default-v1.speculative.json
python benchmarks/speculative.py --prompts 4 --skip b4,dynamic,assisted --draft-vocab 0 \
  --json $HERE/default-v1.speculative-full-head.json
python benchmarks/speculative.py --identity 52 --max-new-tokens 32 --exits 15,25 --json $HERE/default-v1.speculative-identity.json
python benchmarks/speculative.py --prompts 1 --skip b1,b4,dynamic --json $HERE/default-v1.speculative-costs.json
python benchmarks/speculative.py --prompts 8 --max-new-tokens 64 --skip assisted,dynamic --dtype bf16 \
  --json $HERE/speculative-bf16.json
