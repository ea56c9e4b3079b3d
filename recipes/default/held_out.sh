# Sourced by the recipes: the three held-out checks every shipped artifact is measured with.
#   evaluate ARTIFACT NAME   -> recipes/results/NAME.eval-{chat,heldout-docstrings,gpl3}.json
evaluate() {
  python -m balcony eval "$1" --data src/balcony/resources/heldout-smollm2.jsonl --json recipes/results/$2.eval-chat.json
  python -m balcony eval "$1" --data src/balcony/resources/corpus/heldout-docstrings.jsonl --max-tokens 24576 \
    --json recipes/results/$2.eval-heldout-docstrings.json
  python -m balcony eval "$1" --data /usr/share/common-licenses/GPL-3 --json recipes/results/$2.eval-gpl3.json
}
