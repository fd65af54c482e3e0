#!/usr/bin/env bash
# Benchmark of train-lora on a full-size SDXL UNet: sd-scripts' SdxlUNet2DConditionModel (SDXL
# base's real layout, 2.57 B parameters) with random weights stored as bf16 in a single-file
# checkpoint (bench/torch_sdxl_lora_full.py make), at RES px (default 1024: 128x128 latents),
# batch 1, LoRA rank DIM (default 16, alpha = rank) on the default modules, AdamW, in the
# precision MIXED_PRECISION (default bf16; no: fp32 weights), with --gradient_checkpointing unless
# GRADIENT_CHECKPOINTING=0, and EXTRA_ARGS (e.g. --fp8_base).
# Runs 1 and 1 + STEPS training steps. Prints per run: steps, wall s, CPU s (user+sys), peak
# RSS; then seconds per step three ways: the difference of the two runs (CPU time too); from
# the longer run's progress lines (steps 2 to 1 + STEPS, so start-up and the first step are left
# out whatever they cost, as the PyTorch side measures after a warm-up step); and from the longer
# run's process times read from /proc at its first and last progress line (wall and CPU, steps
# 2 to 1 + STEPS).
#
#   SD_SCRIPTS=... SD_PYTHON=... bench/train-lora-sdxl-full.sh [STEPS] [WORKDIR]
#       (PROFILE=release|debug, NO_BUILD=1, RES=512, DIM=8, TORCH=1: then the same steps in
#        PyTorch, sd-scripts' SDXL UNet and networks.lora on the same weights)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-1}
WORK=${2:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
[ -n "${NO_BUILD:-}" ] || cargo build -p train-lora $([ "$PROFILE" = release ] && echo --release) -q
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE/train-lora
RES=${RES:-1024}
DIM=${DIM:-16}
MIXED_PRECISION=${MIXED_PRECISION:-bf16}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-1}
DATA="$WORK/data-sdxl-$RES"
UNET="$WORK/unet-sdxl.safetensors"
mkdir -p "$DATA"

if [ ! -f "$UNET" ]; then
  "${SD_PYTHON:?set SD_PYTHON to the python that runs sd-scripts}" bench/torch_sdxl_lora_full.py \
    make "${SD_SCRIPTS:?set SD_SCRIPTS to an sd-scripts checkout}" "$UNET"
fi
if [ ! -f "$DATA/meta_lat.json" ]; then
  "$SD_PYTHON" - "$DATA" "$RES" <<'PY'
import json, sys
import numpy as np
data, res = sys.argv[1], int(sys.argv[2])
side = res // 8
rng = np.random.default_rng(1)
meta = {}
for i in range(2):
    np.savez(f"{data}/img{i}_{res:04d}x{res:04d}_sdxl.npz",
             latents=rng.standard_normal((4, side, side), dtype=np.float32),
             original_size=np.array([res, res]), crop_ltrb=np.array([0, 0, res, res]))
    np.savez(f"{data}/img{i}_te_outputs.npz",
             hidden_state1=rng.standard_normal((77, 768), dtype=np.float32),
             hidden_state2=rng.standard_normal((77, 1280), dtype=np.float32),
             pool2=rng.standard_normal((1280,), dtype=np.float32))
    meta[f"img{i}.png"] = {"caption": "a photo", "train_resolution": [res, res]}
json.dump(meta, open(f"{data}/meta_lat.json", "w"))
PY
fi

# Polls the trainer (the child of /usr/bin/time, process $1) every 0.2 s until it exits, and
# writes to $WORK/steady.txt its CPU seconds (user + system, from /proc) and wall seconds from
# the first progress line `steps: 1/N` to `steps: N/N`, i.e. over steps 2 to N, as the PyTorch
# side measures after its warm-up step (to within a poll). One awk per poll reads both files.
watch_steady_cpu() {
  local timer=$1 steps=$2 trainer="" first_cpu="" first_wall="" step cpu
  local ticks
  ticks=$(getconf CLK_TCK)
  rm -f "$WORK/steady.txt"
  while kill -0 "$timer" 2> /dev/null; do
    sleep 0.2
    [ -n "$trainer" ] || trainer=$(pgrep -P "$timer" || true)
    [ -n "$trainer" ] || continue
    read -r step cpu < <(awk -v RS='[\r\n]' -v stat="/proc/$trainer/stat" '
      match($0, /steps: [0-9]+\//) { step = substr($0, RSTART + 7, RLENGTH - 8) }
      END { if ((getline line < stat) > 0) { split(line, f, " "); print step + 0, f[14] + f[15] } }
    ' "$WORK/progress.txt") || continue
    if [ -z "$first_cpu" ] && [ "$step" = 1 ]; then
      first_cpu=$cpu first_wall=$EPOCHREALTIME
    elif [ -n "$first_cpu" ] && [ "$step" = "$steps" ] && [ "$steps" -gt 1 ]; then
      echo "$(echo "($cpu - $first_cpu) / $ticks" | bc -l) $(echo "$EPOCHREALTIME - $first_wall" | bc -l)" \
        > "$WORK/steady.txt"
      return
    fi
  done
}

run() {
  local steps=$1
  rm -rf "$WORK/out"
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/time.txt" "$BIN" \
    --pretrained_model_name_or_path "$UNET" \
    --in_json "$DATA/meta_lat.json" --train_data_dir "$DATA" --resolution "$RES" \
    --output_dir "$WORK/out" --output_name sdxl --network_dim "$DIM" --network_alpha "$DIM" \
    --network_train_unet_only --optimizer_type AdamW --learning_rate 1e-4 \
    --max_train_steps "$steps" --train_batch_size 1 --seed 1 \
    --mixed_precision "$MIXED_PRECISION" --save_precision float \
    $([ "$GRADIENT_CHECKPOINTING" = 0 ] || echo --gradient_checkpointing) ${EXTRA_ARGS:-} \
    2> "$WORK/progress.txt" &
  local timer=$! status=0
  watch_steady_cpu "$timer" "$steps"
  wait "$timer" || status=$?
  if grep -q "terminated" "$WORK/time.txt"; then
    echo "train-lora was killed (out of memory?): $(cat "$WORK/time.txt")" >&2
    exit 1
  fi
  if [ "$status" != 0 ]; then
    echo "train-lora failed (exit $status): see $WORK/progress.txt" >&2
    exit 1
  fi
  read -r secs user sys rss < "$WORK/time.txt"
  local cpu
  cpu=$(echo "$user + $sys" | bc)
  printf "%-6s %3d steps %9.2f s wall %9.2f CPU s %8.0f MiB peak RSS\n" "$2" "$steps" "$secs" \
    "$cpu" "$((rss / 1024))" >&2
  echo "$secs $cpu"
}

# Seconds per step after the first, from the progress lines `steps: n/N (x s each, ...)`, whose
# rate is the average since the first step began: (N x_N - x_1) / (N - 1).
steady_seconds_per_step() {
  tr '\r' '\n' < "$WORK/progress.txt" | sed -n 's/.*steps: \([0-9]*\)\/[0-9]* (\([0-9.]*\) s each.*/\1 \2/p' |
    awk 'NR == 1 { x1 = $2 } { n = $1; xn = $2 } END { if (n > 1) printf "%.2f", (n * xn - x1) / (n - 1) }'
}

echo "train-lora sdxl ${RES}px rank $DIM $MIXED_PRECISION checkpointing=$GRADIENT_CHECKPOINTING ${EXTRA_ARGS:-}" >&2
read -r first first_cpu <<< "$(run 1 start-up)"
read -r last last_cpu <<< "$(run $((STEPS + 1)) train)"
echo "seconds per step (difference of the runs): $(echo "($last - $first) / $STEPS" | bc -l | cut -c1-6) wall, $(echo "($last_cpu - $first_cpu) / $STEPS" | bc -l | cut -c1-6) CPU"
echo "seconds per step (progress of steps 2-$((STEPS + 1))): $(steady_seconds_per_step) wall"
if [ -f "$WORK/steady.txt" ]; then
  read -r steady_cpu steady_wall < "$WORK/steady.txt"
  echo "seconds per step (process times over steps 2-$((STEPS + 1))): $(echo "$steady_wall / $STEPS" | bc -l | cut -c1-6) wall, $(echo "$steady_cpu / $STEPS" | bc -l | cut -c1-6) CPU"
fi
if [ -n "${TORCH:-}" ]; then
  MIXED_PRECISION=$MIXED_PRECISION \
  GRADIENT_CHECKPOINTING=$([ "$GRADIENT_CHECKPOINTING" = 0 ] || echo 1) \
    "$SD_PYTHON" bench/torch_sdxl_lora_full.py train "$SD_SCRIPTS" "$UNET" "$STEPS" "$RES" "$DIM"
fi
