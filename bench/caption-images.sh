#!/usr/bin/env bash
# Benchmark of caption-images: images/s for the tiny fixture BLIP and for a BLIP-large-shaped
# model with random weights (ViT-L/16 at 384 px + BERT-base decoder, 470M parameters, generated
# once into WORKDIR/blip-large), at --batch_size 1 and 8, greedy (--beam_search) with the
# default --max_length 75. Random weights caption up to max_length: the slowest case.
# Prints one line per run: model, batch, images, wall seconds (model loading included),
# images/s, peak RSS.
#
#   bench/caption-images.sh [N_IMAGES] [WORKDIR]
#   env: LARGE_MODEL=0 skips the BLIP-large run, LARGE_BATCHES (default "1 8"), BIN_DIR (prebuilt
#   binaries, examples/ beside them; no cargo build)      (PROFILE=debug|release, default release)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-8}
WORK=${2:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
FLAG=$([ "$PROFILE" = release ] && echo --release || true)
if [ -z "${BIN_DIR:-}" ]; then
  cargo build -q -p caption-images $FLAG
  cargo build -q -p lorakit-pipeline --example blip_random_model $FLAG
fi
BIN=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/$PROFILE}
LARGE="$WORK/blip-large"
if [ "${LARGE_MODEL:-1}" = 1 ] && [ ! -f "$LARGE/model.safetensors" ]; then
  "$BIN/examples/blip_random_model" "$LARGE"
fi
IMAGES=(tests/fixtures/images/*.png tests/fixtures/images/*.jpg)
measure() {
  local name=$1 model=$2 batch=$3
  local data="$WORK/data-$name-$batch"
  rm -rf "$data" && mkdir -p "$data"
  for i in $(seq 0 $((N - 1))); do
    local src=${IMAGES[$((i % ${#IMAGES[@]}))]}
    cp "$src" "$data/img_$i.${src##*.}"
  done
  /usr/bin/time -f "%e %M" -o "$WORK/time" \
    "$BIN/caption-images" "$data" --caption_weights "$model" --beam_search --batch_size "$batch" -q
  read -r secs rss < "$WORK/time"
  awk -v n="$name" -v b="$batch" -v items="$N" -v s="$secs" -v r="$rss" \
    'BEGIN { printf "%-6s batch %d %4d images %8.2f s %8.2f images/s %7.0f MiB peak RSS\n", n, b, items, s, items / s, r / 1024 }'
}
for batch in 1 8; do
  measure tiny tests/fixtures/blip-tiny "$batch"
done
[ "${LARGE_MODEL:-1}" = 1 ] || exit 0
for batch in ${LARGE_BATCHES:-1 8}; do
  measure large "$LARGE" "$batch"
done
