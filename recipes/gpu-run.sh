#!/usr/bin/env bash
# The device side of recipes/gpu_recipe.py: join the carried GGUF parts, run the recipe in a
# scratch folder, and leave under $OUT only what may come back (at most 8 files of 16 MiB):
# the artifact's safetensors in parts, its config, metrics, recipe.json, the log and the
# sampled chats (gzipped). recipes/README.md ("gpu_recipe.py") gives the calls that carry
# the parts over; every argument after the first goes to the recipe.
#
#   bash recipes/gpu-run.sh CARRY_DIR --init-from default --sample-seconds 180 --train-seconds 200
set -uo pipefail
CARRY=$1; shift
OUT=${OUT:?set OUT to the folder whose files come back}
WORK=${WORK:-/tmp/balcony-gpu}
mkdir -p "$WORK"
# parts carried in earlier calls were copied to $WORK/parts (a warm machine keeps /tmp between calls)
mkdir -p "$WORK/parts" && cp "$CARRY"/smollm2.gguf.xz.part-* "$WORK/parts/" 2>/dev/null
cat "$WORK"/parts/smollm2.gguf.xz.part-* | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" > "$WORK/smollm2.gguf" || exit 2
[ -d "$WORK/site/gguf" ] || { mkdir -p "$WORK/site" && tar -xzf "$CARRY/gguf.tar.gz" -C "$WORK/site"; }
export PYTHONPATH="$PWD/src:$WORK/site" PYTHONUNBUFFERED=1
python3 recipes/gpu_recipe.py --gguf "$WORK/smollm2.gguf" --out "$WORK/out" "$@" 2>&1 | tee "$OUT/gpu.log"
rc=${PIPESTATUS[0]}
A="$WORK/out/artifact"
if [ -d "$A" ]; then
  split -b 15M "$A/balcony_model.safetensors" "$OUT/balcony_model.safetensors.part-"
  cp "$A/balcony_config.json" "$OUT/"
fi
[ -f "$WORK/out/recipe.json" ] && cp "$WORK/out/recipe.json" "$OUT/"
[ -f "$WORK/out/run/metrics.jsonl" ] && cp "$WORK/out/run/metrics.jsonl" "$OUT/"
[ -d "$WORK/out/corpus-self" ] && cp -r "$WORK/out/corpus-self" "$OUT/"  # gzipped shards and their manifest
ls -la "$OUT"
exit "$rc"
