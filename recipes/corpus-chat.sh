#!/usr/bin/env bash
# Issue 13, session 7: the committed corpus grows by the model's own chat answers, and the shipped
# balconies are continued on those alone.
#
#   bash recipes/corpus-chat.sh
#
# 1. `chat` sampled into recipes/corpus for 40 minutes (`--seconds` counts from the first batch;
#    a later run continues where the last chat shard stopped and adds as much again);
# 2. continue `default` (sparse KL, fp32, lr 3e-4) on every chat shard, one pass (corpus-b, as
#    reported, trained on the first five: shards 00026-00030, 254K tokens; a second sampling run
#    followed it);
# 3. the held-out checks the shipped balconies were measured with.
set -euo pipefail
CORPUS=recipes/corpus
python -m balcony corpus $CORPUS --source chat --seconds 2400
python -m balcony corpus $CORPUS
python -m balcony train --init-from default --data $CORPUS --corpus-sources chat --out runs/corpus-b \
  --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 \
  --val-fraction 0.02 --val-sequences 16 --eval-every 40 --checkpoint-every 20
source recipes/held_out.sh
evaluate runs/corpus-b corpus-b
cp runs/corpus-b/metrics.jsonl recipes/results/corpus-b.metrics.jsonl
