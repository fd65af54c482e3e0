#!/usr/bin/env bash
# Benchmark of generate-images on a full-size SD1.5 checkpoint in the real layout with random
# weights (860M-parameter UNet, CLIP ViT-L/14-shaped text encoder, SD VAE; made once by
# bench/torch_generate_full.py with sd-scripts' own configs and saver, stored as fp16), one image
# at SIZE² (default 512), STEPS euler steps (default 20), CFG SCALE (default 7), float32.
# The same image is then made by diffusers' StableDiffusionPipeline on the same weights
# (bench/torch_generate_full.py run), with torch limited to THREADS threads (default: the cores).
# Prints per side: wall s (process, model loading included), CPU s (user+sys), peak RSS; the
# PyTorch side also prints the seconds of its pipeline call.
#
# MODEL=sdxl does the same on a full-size SDXL diffusers folder (SDXL base's layout, random
# weights, fp16; made once by bench/torch_generate_sdxl_full.py) at SIZE² (default 1024), against
# diffusers' StableDiffusionXLPipeline.
#
#   SD_SCRIPTS=... SD_PYTHON=... bench/generate-images-full.sh [WORKDIR]
#       (PROFILE=release|debug, NO_BUILD=1, MODEL=sd15|sdxl, SIZE=512 (sdxl: 1024), STEPS=20,
#        SCALE=7, SIDE=both|lorakit|torch,
#        FEATURES=cuda with EXTRA_ARGS="--device cuda": generate-images on the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
MODEL=${MODEL:-sd15}
case "$MODEL" in
  sd15) SIZE=${SIZE:-512} ;;
  sdxl) SIZE=${SIZE:-1024} ;;
  *) echo "error: MODEL is sd15 or sdxl, not $MODEL" >&2; exit 2 ;;
esac
STEPS=${STEPS:-20}
SCALE=${SCALE:-7}
SIDE=${SIDE:-both}
THREADS=${THREADS:-$(nproc)}
: "${SD_SCRIPTS:?set SD_SCRIPTS to an sd-scripts checkout}"
: "${SD_PYTHON:?set SD_PYTHON to a Python with torch, diffusers, transformers}"
[ -n "${NO_BUILD:-}" ] || cargo build -p generate-images $([ "$PROFILE" = release ] && echo --release) -q \
  ${FEATURES:+--features "$FEATURES"}
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE/generate-images
mkdir -p "$WORK"
if [ "$MODEL" = sdxl ]; then
  CKPT="$WORK/sdxl-full"
  [ -f "$CKPT/unet/config.json" ] ||
    "$SD_PYTHON" bench/torch_generate_sdxl_full.py make "$CKPT" tests/fixtures/sd15-tiny/tokenizer
else
  CKPT="$WORK/sd15-full.safetensors"
  [ -f "$CKPT" ] || "$SD_PYTHON" bench/torch_generate_full.py make "$CKPT" "$SD_SCRIPTS"
  # generate-images finds the CLIP vocabulary in a `tokenizer` folder beside the checkpoint.
  [ -d "$WORK/tokenizer" ] || cp -r tests/fixtures/sd15-tiny/tokenizer "$WORK/tokenizer"
fi

run() {
  local label=$1; shift
  local start end
  start=$(date +%s.%N)
  /usr/bin/time -f "%U %S %M" -o "$WORK/time.txt" "$@"
  end=$(date +%s.%N)
  read -r user sys rss < "$WORK/time.txt"
  printf '%s: wall %.1f s, CPU %.1f s, peak RSS %d MiB\n' "$label" \
    "$(echo "$end - $start" | bc)" "$(echo "$user + $sys" | bc)" $((rss / 1024))
}

if [ "$SIDE" != torch ]; then
  rm -rf "$WORK/out"
  run "generate-images ($PROFILE)" "$BIN" --ckpt "$CKPT" --outdir "$WORK/out" \
    --prompt "a photo of a cat --n lowres" --W "$SIZE" --H "$SIZE" --steps "$STEPS" \
    --sampler euler --scale "$SCALE" --seed 1 --quiet ${EXTRA_ARGS:-}
fi
if [ "$SIDE" != lorakit ]; then
  if [ "$MODEL" = sdxl ]; then
    torch_side=(bench/torch_generate_sdxl_full.py run "$CKPT" "$SIZE" "$STEPS" "$SCALE")
  else
    torch_side=(bench/torch_generate_full.py run "$CKPT" "$WORK/tokenizer" "$SIZE" "$STEPS" "$SCALE")
  fi
  run "diffusers ($THREADS threads)" env OMP_NUM_THREADS="$THREADS" "$SD_PYTHON" "${torch_side[@]}"
fi
