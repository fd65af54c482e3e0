#!/usr/bin/env bash
# Benchmark of tag-images on N images (default: 20 and 2000) made by repeating the 12 fixture
# photos, with the tagger in MODEL (default: the bundled tiny tagger; pass a real SmilingWolf
# folder holding model.onnx + selected_tags.csv for representative session times).
# For each N it prints: cold run (inference) wall time and images/s, the ONNX session time
# alone (the floor: the tool logs it), and a re-render from the tag-probability store.
# bench/compare-sd-scripts.sh runs this and then sd-scripts on the same folders.
#
#   bench/tag-images.sh [N...]        env: MODEL, BATCH (8), PROFILE (release), WORK
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(20 2000)
MODEL=${MODEL:-tests/fixtures/wd14-tiny}
BATCH=${BATCH:-8}
PROFILE=${PROFILE:-release}
WORK=${WORK:-$(mktemp -d)}
scripts/setup-onnxruntime.sh > /dev/null
[ -n "${BIN_DIR:-}" ] || cargo build -p tag-images $([ "$PROFILE" = release ] && echo --release) -q
BIN=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/$PROFILE}/tag-images
MODELS="$WORK/models"
mkdir -p "$MODELS/SmilingWolf_wd-v1-4-convnext-tagger-v2"
cp "$MODEL/model.onnx" "$MODEL/selected_tags.csv" "$MODELS/SmilingWolf_wd-v1-4-convnext-tagger-v2/"
photos=(tests/fixtures/images/*.png tests/fixtures/images/*.jpg)

for n in "${SIZES[@]}"; do
  data="$WORK/data-$n"
  rm -rf "$data" && mkdir -p "$data"
  for ((i = 0; i < n; i++)); do
    src=${photos[$((i % ${#photos[@]}))]}
    cp "$src" "$data/img_$(printf %06d "$i").${src##*.}"
  done
  log="$WORK/run-$n.log"
  /usr/bin/time -f "%e %M" -o "$WORK/time-$n" "$BIN" "$data" --model_dir "$MODELS" --batch_size "$BATCH" 2> "$log"
  read -r secs rss < "$WORK/time-$n"
  session=$(sed -n 's/.*ONNX session \([0-9.]*\) s.*/\1/p' "$log")
  provider=$(grep -o '[A-Za-z]*ExecutionProvider' "$log" | head -n 1)
  awk -v n="$n" -v s="$secs" -v r="$rss" -v f="$session" -v p="$provider" 'BEGIN {
    printf "tag-images  %6d images  %7.2f s  %8.1f images/s  %5.0f MiB peak RSS  session %6.2f s (%.1f images/s, %s)  overhead %+.0f%%\n",
      n, s, n / s, r / 1024, f, n / (f > 0 ? f : 1e-9), p, 100 * (s - f) / (f > 0 ? f : 1e-9) }'
  start=$(date +%s.%N)
  "$BIN" "$data" --model_dir "$MODELS" --batch_size "$BATCH" --from_store --thresh 0.5 -q 2> /dev/null
  end=$(date +%s.%N)
  awk -v n="$n" -v s="$(echo "$end - $start" | bc)" \
    'BEGIN { printf "re-render   %6d images  %7.2f s  %8.1f images/s  (--from_store, new threshold)\n", n, s, n / s }'
done
