#!/usr/bin/env bash
# soup-weight: how much of a continuation should the soup keep? default-v5 is the mean (alpha 0.5)
# of runs/v4 and runs/v5-books; soup75 keeps 0.75 of the continuation. And does a soup help a
# continuation that lost nothing elsewhere? chat3-soup50 is the mean of runs/v5 and runs/v6-chat
# (default-v6 is runs/v6-chat alone). Controls: default-v5 and default-v6.
#
#   bash experiments/soup-weight/run.sh [OUT]     # OUT: the recipes/default/make.sh folder
set -euo pipefail
OUT=${1:-runs/default} HERE=experiments/soup-weight
python recipes/default/soup.py "$OUT/runs/v4" "$OUT/runs/v5-books" --alpha 0.75 --out runs/soup75
python recipes/default/soup.py "$OUT/runs/v5" "$OUT/runs/v6-chat" --alpha 0.5 --out runs/chat3-soup50
export RESULTS=$HERE; source recipes/default/held_out.sh
evaluate runs/soup75 soup75
python -m balcony eval runs/chat3-soup50 --data src/balcony/resources/heldout-smollm2.jsonl --json $HERE/chat3-soup50.eval-chat.json
