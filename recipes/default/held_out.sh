# Sourced by the recipes: the three held-out checks every shipped artifact is measured with.
#   evaluate ARTIFACT NAME   -> $RESULTS/NAME.eval-{chat,heldout-docstrings,gpl3}.json
#   (RESULTS defaults to recipes/default/results; an experiment sets its own folder)
evaluate() {
  local results=${RESULTS:-recipes/default/results}
  mkdir -p "$results"
  python -m balcony eval "$1" --data src/balcony/resources/heldout-smollm2.jsonl --json "$results/$2.eval-chat.json"
  python -m balcony eval "$1" --data src/balcony/resources/corpus/heldout-docstrings.jsonl --max-tokens 24576 \
    --json "$results/$2.eval-heldout-docstrings.json"
  python -m balcony eval "$1" --data /usr/share/common-licenses/GPL-3 --json "$results/$2.eval-gpl3.json"
}
