#!/usr/bin/env bash
# exit-weight-sharing: do exit models that share the base's weights (instead of mutating the base in
# place under a lock) decode as fast? `balcony bench default` alternately from two checkouts, OLD
# and NEW, four rounds each, 2 CPU cores.
#
#   bash experiments/exit-weight-sharing/run.sh OLD_CHECKOUT NEW_CHECKOUT
set -euo pipefail
OLD=$1 NEW=$2 OUTFILE=experiments/exit-weight-sharing/bench-old-vs-new.txt
: > "$OUTFILE"
for round in 1 2; do
  for side in old new; do
    dir=$OLD; [ $side = new ] && dir=$NEW
    echo "## $side-$round" >> "$OUTFILE"
    PYTHONPATH=$dir/src python -m balcony bench default --no-profile --repeats 4 >> "$OUTFILE"
  done
done
