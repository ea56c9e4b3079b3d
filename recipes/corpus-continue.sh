#!/usr/bin/env bash
# Issue 13, session 6: grow the committed corpus (recipes/corpus) and continue the shipped
# balconies on it.
#
#   bash recipes/corpus-continue.sh
#
# 1. man pages and info manuals (2.49M tokens, a few minutes; no model needed);
# 2. `reading` for 20 minutes: a passage of a man page, a task about it, the model's answer;
# 3. `chat` for 15 minutes: the model's answers on topics the shipped held-out text never uses;
# 4. continue `default` (sparse KL, fp32) on 1.4M tokens drawn from the whole corpus, shuffled;
# 5. the held-out checks the shipped balconies were measured with.
# `balcony corpus --tokens N` adds N more tokens each time it runs, so steps 1-3 make the
# committed corpus from nothing and are skipped once it exists (grow it further by hand).
set -euo pipefail
CORPUS=recipes/corpus
if [ ! -f $CORPUS/manifest.json ]; then
  python -m balcony corpus $CORPUS --source man --tokens 1500000
  python -m balcony corpus $CORPUS --source info --tokens 1000000
  python -m balcony corpus $CORPUS --source reading --seconds 1200 --tokens 2000000
  python -m balcony corpus $CORPUS --source chat --seconds 900 --tokens 2000000
fi
python -m balcony corpus $CORPUS
python -m balcony train --init-from default --data $CORPUS --out runs/corpus-a --max-tokens 1400000 \
  --batch-size 4 --seq-len 512 --lr 5e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 150 --checkpoint-every 50
evaluate() {  # artifact, name
  python -m balcony eval "$1" --data src/balcony/resources/heldout-smollm2.jsonl --json recipes/results/$2.eval-chat.json
  python -m balcony eval "$1" --data recipes/data/heldout-docstrings.jsonl --max-tokens 24576 \
    --json recipes/results/$2.eval-heldout-docstrings.json
  python -m balcony eval "$1" --data /usr/share/common-licenses/GPL-3 --json recipes/results/$2.eval-gpl3.json
}
evaluate runs/corpus-a corpus-a
cp runs/corpus-a/metrics.jsonl recipes/results/corpus-a.metrics.jsonl
