#!/usr/bin/env bash
# GPU check (issue 21): builds the CUDA binaries, runs the device-parity tests on the GPU, and
# prints one table of s/step and peak GPU memory.
#
# *** NOT YET RUN ON A GPU. Written and tested in parts on a machine without one (the parity
# *** tests pass there on the CPU; `bash -n` passes). Remove this note with the first figures.
#
#   bench/gpu-check.sh [WORKDIR]
#     STEPS=3          timed training steps per row (after one start-up run)
#     NO_BUILD=1       use the binaries in target/release and TEST_BIN (no cargo on the machine:
#                      build them elsewhere with the same CUDA setup and carry them)
#     TEST_BIN=path    the parity test executable (`cargo test --release -p lorakit-pipeline
#                      --lib --features candle-cuda --no-run` prints it)
#     WHEELS=dir       install the CUDA compiler from wheels in dir (no registry reachable)
#     SD_SCRIPTS=dir   an sd-scripts checkout: enables the SDXL row (its UNet class makes the
#                      weights, bench/torch_sdxl_lora_full.py; needs python3 with torch)
#
# Steps:
#   1. nvcc: the one on PATH or in /usr/local/cuda, else the PyPI wheels nvidia-cuda-nvcc,
#      -runtime, -crt, -cccl and nvidia-nvvm of the driver's CUDA major version, installed into
#      .local/cuda (ignored by git); CUDA_HOME, CUDA_COMPUTE_CAP (from nvidia-smi) and
#      CUDARC_CUDA_VERSION are set for candle's kernels and cudarc.
#   2. cargo build --release --features cuda (train-lora) and the parity test executable.
#   3. LORAKIT_TEST_DEVICE=cuda: every custom op's device-generic path on the GPU against its CPU
#      kernel, forward and gradients, f32 and bf16 (the device_parity tests in pipeline/src).
#   4. Rows, each with s/step and the peak of nvidia-smi's used memory minus the idle level:
#      SD1.5 512² LoRA step (bench/train-lora-full.sh: the full-size UNet layout, random
#      weights, rank 16, bf16), SDXL 1024² LoRA step (bench/train-lora-sdxl-full.sh, with
#      SD_SCRIPTS), VAE encode 512² and CLIP-L text encoding at batch 32 (the inference_bench
#      example with BENCH_DEVICE=cuda on bench/torch_inference.py's weights; needs python3 with
#      diffusers and transformers, else skipped), generation 512²/20 euler steps, CFG 7
#      (bench/generate-images-full.sh with --device cuda, with SD_SCRIPTS). sd-scripts /
#      diffusers rows are not run here.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d)}
STEPS=${STEPS:-3}
mkdir -p "$WORK"
for tool in nvidia-smi python3 bc /usr/bin/time $([ -n "${NO_BUILD:-}" ] || echo cargo); do
  command -v "$tool" >/dev/null || { echo "gpu-check: $tool not found" >&2; exit 2; }
done
python3 -c "import numpy" || { echo "gpu-check: python3 needs numpy (the weight makers)" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: no NVIDIA GPU here" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# 1. The CUDA compiler and the variables candle's and cudarc's build scripts read.
cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\..*/\1/p' | head -1)
cuda_major=${cuda_major:-13}
if ! command -v nvcc >/dev/null; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  else
    export CUDA_HOME=$PWD/.local/cuda
    if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
      wheels=(nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl nvidia-nvvm)
      pins=("${wheels[@]/%/==$cuda_major.0.*}")
      if [ -n "${WHEELS:-}" ]; then
        python3 -m pip install -q --no-deps --no-index --find-links "$WHEELS" --target .local/cuda-wheels "${pins[@]}"
      else
        python3 -m pip install -q --no-deps --target .local/cuda-wheels "${pins[@]}"
      fi
      mkdir -p "$CUDA_HOME"
      cp -r .local/cuda-wheels/nvidia/cu"$cuda_major"/* "$CUDA_HOME/"
    fi
  fi
  export PATH=$CUDA_HOME/bin:$PATH
fi
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export CUDA_HOME
nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
read -r major minor <<<"$nvcc_version"
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-${major}0${minor}0}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
# A host compiler newer than the toolkit knows still builds candle's kernels.
export NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:--allow-unsupported-compiler}
echo "nvcc $major.$minor ($CUDA_HOME), compute capability $CUDA_COMPUTE_CAP"

# 2. Build.
if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -q -p train-lora --features cuda
  cargo build --release -q -p generate-images --features cuda
  cargo build --release -q -p lorakit-pipeline --example inference_bench --features candle-cuda
  TEST_BIN=$(cargo test --release -q -p lorakit-pipeline --lib --features candle-cuda --no-run \
    --message-format=json 2>/dev/null | sed -n 's/.*"executable":"\([^"]*lorakit_pipeline[^"]*\)".*/\1/p' | tail -1)
fi
: "${TEST_BIN:?TEST_BIN: the parity test executable (see the header)}"

# 3. Parity on the GPU.
LORAKIT_TEST_DEVICE=cuda "$TEST_BIN" device_parity --test-threads 1

# 4. Rows. Peak GPU memory: nvidia-smi sampled every 100 ms while the command runs, minus the
# level before it started.
gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
# Runs "$@" while sampling; sets PEAK_MIB and leaves the command's stdout in $WORK/out.txt.
with_gpu_peak() {
  local idle sampler
  idle=$(gpu_used)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$WORK/memory.txt" &
  sampler=$!
  local code=0
  "$@" >"$WORK/out.txt" || code=$?
  kill "$sampler"
  wait "$sampler" 2>/dev/null || true
  if [ "$code" -ne 0 ]; then
    cat "$WORK/out.txt"
    echo "gpu-check: $* failed (exit code $code)" >&2
    exit "$code"
  fi
  PEAK_MIB=$(( $(sort -n "$WORK/memory.txt" | tail -1) - idle ))
}
rows=()
row() { rows+=("$(printf '| %-34s | %10s | %10s |' "$1" "$2" "$3")"); }

with_gpu_peak env NO_BUILD=1 RES=512 DIM=16 MIXED_PRECISION=bf16 EXTRA_ARGS="--device cuda" \
  bench/train-lora-full.sh "$STEPS" "$WORK/sd15"
row "SD1.5 512² LoRA step (rank 16, bf16)" "$(sed -n 's/seconds per step: //p' "$WORK/out.txt")" "$PEAK_MIB MiB"
if [ -n "${SD_SCRIPTS:-}" ]; then
  with_gpu_peak env NO_BUILD=1 SD_PYTHON=python3 RES=1024 DIM=16 EXTRA_ARGS="--device cuda" \
    bench/train-lora-sdxl-full.sh "$STEPS" "$WORK/sdxl"
  row "SDXL 1024² LoRA step (rank 16, bf16)" "$(sed -n 's/seconds per step: //p' "$WORK/out.txt")" "$PEAK_MIB MiB"
else
  row "SDXL 1024² LoRA step" "skipped" "SD_SCRIPTS unset"
fi
if python3 -c "import diffusers, transformers" 2>/dev/null; then
  [ -f "$WORK/inference/blip/config.json" ] || python3 bench/torch_inference.py make "$WORK/inference"
  for bench_row in vae-encode-512 clip-l-b32; do
    with_gpu_peak env BENCH_DEVICE=cuda target/release/examples/inference_bench "$WORK/inference" "$bench_row"
    row "$bench_row (s/item)" "$(sed -n 's/.*"seconds_per_item": *\([0-9.e+-]*\).*/\1/p' "$WORK/out.txt")" "$PEAK_MIB MiB"
  done
else
  row "VAE encode 512², CLIP-L batch 32" "skipped" "no diffusers"
fi
if [ -n "${SD_SCRIPTS:-}" ]; then
  with_gpu_peak env NO_BUILD=1 SIDE=lorakit SD_PYTHON=python3 EXTRA_ARGS="--device cuda" \
    bench/generate-images-full.sh "$WORK/generate"
  row "generation 512², 20 steps (wall s)" "$(sed -n 's/.*wall \([0-9.]*\) s.*/\1/p' "$WORK/out.txt")" "$PEAK_MIB MiB"
else
  row "generation 512², 20 steps" "skipped" "SD_SCRIPTS unset"
fi

echo
echo "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), lorakit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "| row                                | s/step     | peak GPU   |"
echo "|------------------------------------|------------|------------|"
printf '%s\n' "${rows[@]}"
