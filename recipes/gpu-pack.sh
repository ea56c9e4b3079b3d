#!/usr/bin/env bash
# Pack what the GPU calls carry beside the working tree, sized to fit: the default model's GGUF,
# xz-packed and split into parts that each fit with the tree under a call's 64 MiB, and the
# pure-Python `gguf` reader with its dist-info (transformers reads its version). Then prints the
# device calls in order (recipes/README.md, "gpu_recipe.py and gpu-run.sh").
#
#   bash recipes/gpu-pack.sh [CARRY_DIR]        # default runs/carry (ignored by git)
#
# Why sized here: the tree grows with the corpus (47.6 MB in session 15, 49.3 MB in session 17),
# and a part that fitted once (18.5 MB) stops fitting without a word until the call is refused.
set -euo pipefail
CARRY=${1:-runs/carry}
LIMIT=${LIMIT:-$((64 * 1024 * 1024))}  # what one device call carries, tree included
MARGIN=${MARGIN:-$((1024 * 1024))}
SMALLEST=${SMALLEST:-4000000}  # smaller parts would mean too many calls of the lease's 15 minutes
mkdir -p "$CARRY"
rm -f "$CARRY"/smollm2.gguf.xz.part-* "$CARRY/gguf.tar.gz"
# what a call copies: tracked files and untracked ones git does not ignore (never .git)
TREE=$( { git ls-files -z; git ls-files -z -o --exclude-standard; } | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
D=$(python -c 'import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))')
tar -czf "$CARRY/gguf.tar.gz" -C "$D" --exclude=__pycache__ gguf $(cd "$D" && ls -d gguf-*.dist-info)
READER=$(stat -c %s "$CARRY/gguf.tar.gz")
PART=$((LIMIT - TREE - READER - MARGIN))  # the first call carries the reader beside its part
if [ "$PART" -lt "$SMALLEST" ]; then
  echo "gpu-pack: the working tree is $TREE bytes, which leaves $PART bytes a call for the GGUF's parts;" \
       "make the tree smaller (or commit fewer corpus shards) so each call fits in $LIMIT bytes" >&2
  exit 1
fi
GGUF=${GGUF:-$(python -c 'from balcony.default import gguf_path; print(gguf_path())')}
xz -T2 -9 -c "$GGUF" | split -b "$PART" - "$CARRY/smollm2.gguf.xz.part-"
PARTS=("$CARRY"/smollm2.gguf.xz.part-*)
echo "gpu-pack: tree $TREE bytes, ${#PARTS[@]} parts of at most $PART bytes (+ reader $READER bytes) in $CARRY"
echo "device calls, back to back (a warm machine keeps /tmp for 30 s between calls):"
for i in "${!PARTS[@]}"; do
  part=${PARTS[$i]}
  if [ "$i" -eq 0 ]; then
    echo "  run(carry=[\"$part\", \"$CARRY/gguf.tar.gz\"], command=\"mkdir -p /tmp/balcony-gpu/parts /tmp/balcony-gpu/site && cp $CARRY/smollm2.gguf.xz.part-* /tmp/balcony-gpu/parts/ && tar -xzf $CARRY/gguf.tar.gz -C /tmp/balcony-gpu/site\")"
  elif [ "$i" -lt $((${#PARTS[@]} - 1)) ]; then
    echo "  run(carry=[\"$part\"], command=\"cp $CARRY/smollm2.gguf.xz.part-* /tmp/balcony-gpu/parts/\")"
  else
    echo "  run(carry=[\"$part\"], timeout_s=590, command=\"bash recipes/gpu-run.sh $CARRY --init-from default --corpus recipes/corpus ...\")"
  fi
done
