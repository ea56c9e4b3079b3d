#!/usr/bin/env bash
# serving: the server under 32 concurrent streaming chat clients (held-out prompts, 32 tokens each):
# one at a time, batched, mixed exits, load-adaptive, and vLLM (CPU build, its own venv) beside it;
# then why mixed-exit batches gain little on short contexts (mixed_batch.py) and why a hand-written
# runner (transformers' own continuous batching, continuous_batching.py).
#
#   bash experiments/serving/run.sh [VLLM_PYTHON]
set -euo pipefail
HERE=experiments/serving
python benchmarks/serve_load.py --compare-vllm --vllm-python "${1:-$HOME/vllm-env/bin/python}" \
  --json $HERE/serve-load-vllm.json
python benchmarks/mixed_batch.py --json $HERE/mixed-batch.json
python benchmarks/continuous_batching.py --requests 32 --new-tokens 32 --json $HERE/transformers-continuous-batching.json
