#!/usr/bin/env bash
# cpu-chats-after-v9: does the CPU way of growing `default` (new chats sampled on 2 cores, read once)
# still move the GPU-trained default-v9? Shards 117-123 of the committed corpus (735,777 chat tokens
# that default-v9 never read), two settings: chat6 (lr 1e-4, batch 8, 5% warm-up, all 737K tokens)
# and chat6-lr3 (the CPU stages' lr 3e-4, batch 4, 2% warm-up, the first 350K). Control: default-v9.
#
#   python -m balcony corpus recipes/corpus --source chat --batch 64 --seconds 3300 --shard-tokens 100000
#   bash experiments/cpu-chats-after-v9/run.sh
set -euo pipefail
HERE=experiments/cpu-chats-after-v9
SPARSE=(--seq-len 512 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 --val-fraction 0.01 --val-sequences 16
        --eval-every 50 --checkpoint-every 50)
python -m balcony train --init-from default --data recipes/corpus --corpus-shards 117- --max-tokens 735000 \
  --batch-size 8 --lr 1e-4 --warmup 0.05 --out runs/chat6 "${SPARSE[@]}"
python -m balcony train --init-from default --data recipes/corpus --corpus-shards 117- --max-tokens 350000 \
  --batch-size 4 --lr 3e-4 --warmup 0.02 --out runs/chat6-lr3 "${SPARSE[@]}"
for run in chat6 chat6-lr3; do cp runs/$run/metrics.jsonl $HERE/$run.metrics.jsonl; done
cp runs/chat6/learning_curve.png $HERE/chat6.learning-curve.png
export RESULTS=$HERE; source recipes/default/held_out.sh
evaluate runs/chat6 chat6
python -m balcony eval runs/chat6-lr3 --data src/balcony/resources/heldout-smollm2.jsonl --json $HERE/chat6-lr3.eval-chat.json
