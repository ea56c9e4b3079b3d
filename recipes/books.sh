#!/usr/bin/env bash
# Issue 13, session 10 (stage 5 of `default`): the shipped balconies (runs/corpus-d15x2, all three
# exits, exit 15 two layers) continued on text they never read: the corpus's new `books` source
# (Debian's HTML books: the Administrator's Handbook, the Debian Reference, the PostgreSQL and
# Python manuals; `balcony corpus recipes/corpus --source books --tokens 4000000`, 3.89M tokens),
# the World English Bible (`--source bible`, narrative: 1.0M tokens) and its `reading` shards
# (244K tokens), mixed: 2.5M of their 5.1M tokens, sparse KL with a sampled remainder, lr 3e-4 cosine.
# recipes/soup.py then averages the result with its start (what ships: recipes/README.md).
#
#   bash recipes/books.sh
set -euo pipefail
python -m balcony train --init-from runs/corpus-d15x2 --data recipes/corpus --corpus-sources books,bible,reading \
  --max-tokens 2500000 --out runs/books \
  --batch-size 4 --seq-len 512 --lr 3e-4 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16 \
  --val-fraction 0.01 --val-sequences 16 --eval-every 150 --checkpoint-every 50
cp runs/books/metrics.jsonl recipes/results/books.metrics.jsonl
cp runs/books/learning_curve.png recipes/results/books.learning-curve.png
source recipes/held_out.sh
evaluate runs/books books
