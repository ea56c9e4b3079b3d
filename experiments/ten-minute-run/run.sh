#!/usr/bin/env bash
# About ten minutes of balcony training on the embedded SmolLM2-135M-Instruct, on 2 CPU cores.
# Data: the model's own samples (`self`), generated once and cached (~20-30 min on 2 cores the
# first time, at about 120-170 tokens/s), so the held-out rows are the model's text too.
# 75 steps x 4 x 512 tokens = 153,600 training tokens, one epoch, fp32, default lr and schedule.
set -euo pipefail
OUT="${1:-runs/smollm2-10min}"
python -m balcony train --exits 15,20,25 --data self --out "$OUT" \
  --max-steps 75 --batch-size 4 --seq-len 512 \
  --eval-every 25 --val-sequences 16 --checkpoint-every 25
