#!/usr/bin/env bash
# Runs every stage's benchmark script (bench/<stage>.sh) in one go on their generated inputs and
# prints ONE markdown table: stage, model/input, items, wall seconds, items/s, peak RSS, under a
# header naming the machine (cores, RAM, CPU model, load average), date, commit and profile.
# The table is also written to bench/results/latest.md. A stage whose script fails gets a
# "failed" row and the run goes on.
#
#   bench/all.sh            tiny models + full-size architectures with random weights
#   QUICK=1 bench/all.sh    tiny models only, small counts (a few minutes)
#
# env: BIN_DIR  folder of prebuilt release binaries (no cargo build; caption-images also wants
#               examples/blip_random_model there for the BLIP-large case); default: build them.
#      WORK     scratch folder (default: a new temporary folder, removed at the end).
#      BENCH_OUT table file (default bench/results/latest.md).
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=${QUICK:-0}
OUT=${BENCH_OUT:-bench/results/latest.md}
if [ -z "${WORK:-}" ]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
export PROFILE=release
if [ -n "${BIN_DIR:-}" ]; then
  BIN_DIR=$(cd "$BIN_DIR" && pwd)
  export BIN_DIR
else
  cargo build --workspace --bins --release -q || exit 1
  cargo build -q -p lorakit-pipeline --example blip_random_model --release || exit 1
fi
if [ "$QUICK" = 1 ]; then
  N_LINT=500 N_DATASET=500 N_META=5000 N_TAG=20 N_CAPTION=4 N_VAE_FULL=0 N_TE=64 N_TE_FULL=0
else
  N_LINT=10000 N_DATASET=3000 N_META=100000 N_TAG=200 N_CAPTION=2 N_VAE_FULL=2 N_TE=512 N_TE_FULL=32
fi

rows="$WORK/rows.md"
: > "$rows"
# stage SCRIPT_LABEL AWK_PROGRAM COMMAND...: runs a per-stage script, turns its output lines into
# table rows with the awk program (which prints "input|items|seconds|items/s|RSS MiB").
stage() {
  local label=$1 program=$2; shift 2
  local log="$WORK/$label.log"
  echo ">> $label: $*" >&2
  "$@" > "$log" 2> "$WORK/$label.err"
  local rc=$?
  awk -F'|' -v stage="$label" '{ printf "| %s | %s | %s | %s | %s | %s |\n", stage, $1, $2, $3, $4, $5 }' \
    < <(awk "$program" "$log") >> "$rows"
  if [ $rc -ne 0 ]; then
    printf '| %s | failed (exit %d: %s) | | | | |\n' "$label" "$rc" \
      "$(tail -n 1 "$WORK/$label.err" | tr '|' '/' | cut -c1-120)" >> "$rows"
  fi
}

stage lint-dataset '/peak RSS/ { printf "%d fixture photos, mode %s|%d|%.2f|%.0f|%s\n", $2, $1, $2, $4, $6, $8 " MiB" }' \
  bench/lint-dataset.sh "$N_LINT" "$WORK/lint"
stage prepare-dataset '/peak RSS/ { printf "DreamBooth folders + reg, fixture photos, %s run|%d|%.2f|%.0f|%s\n", $1, $2, $4, $6, $8 " MiB" }' \
  bench/prepare-dataset.sh "$N_DATASET" "$WORK/dataset"
# metadata.sh times merge-captions, merge-tags and clean-captions on one dataset
stage metadata '/peak RSS/ { printf "%s: %d generated entries|%d|%.2f|%.0f|%s\n", $1, $2, $2, $4, $6, $8 " MiB" }' \
  bench/metadata.sh "$N_META" "$WORK/meta"
stage tag-images '/^tag-images/ { printf "tiny WD14 (bundled), batch 8|%d|%.2f|%.1f|%s\n", $2, $4, $6, $8 " MiB" }
  /^re-render/ { printf "re-render from store (--from_store)|%d|%.2f|%.1f|-\n", $2, $4, $6 }' \
  env MODEL=tests/fixtures/wd14-tiny WORK="$WORK/tag" bench/tag-images.sh "$N_TAG"
stage caption-images '/images/ { m = $1 == "tiny" ? "tiny BLIP" : "BLIP-large shape, random weights"
  printf "%s, greedy, batch %d|%d|%.2f|%.3f|%s\n", m, $3, $4, $6, $8, $10 " MiB" }' \
  env LARGE_MODEL=$([ "$QUICK" = 1 ] && echo 0 || echo 1) LARGE_BATCHES=1 \
  bench/caption-images.sh "$N_CAPTION" "$WORK/caption"
stage prepare-latents '/images/ { m = $1 == "tiny" ? "tiny VAE, 256² buckets, batch 4" : "full-size SD1.5 VAE, random weights, 512², batch 1"
  printf "%s|%d|%.2f|%.2f|%s\n", m, $2, $4, $6, $11 " MiB" }' \
  bench/prepare-latents.sh "$N_VAE_FULL" "$WORK/latents"
stage cache-text-encoder '/captions/ { m = $1 == "tiny" ? "tiny CLIP" : "CLIP ViT-L/14 shape, random weights"
  printf "%s, batch %d|%d|%.2f|%.1f|%s\n", m, $3, $4, $6, $8, $10 " MiB" }' \
  env BATCHES="1 32" bench/cache-text-encoder.sh "$N_TE" "$N_TE_FULL" "$WORK/te"
# train_lora NETWORK FLAGS...: the tiny train-lora row for network NETWORK, with extra flags.
train_lora() {
  local network=$1; shift
  stage train-lora '/Elapsed/ { n = split($NF, t, ":"); s = 0; for (i = 1; i <= n; i++) s = s * 60 + t[i] }
  /Maximum resident/ { r = $NF }
  END { if (s > 0) printf "tiny SD1.5-topology UNet, batch 2, '"$network"', 1 thread (steps)|20|%.2f|%.2f|%.0f MiB\n", s, 20 / s, r / 1024 }' \
    bench/train-lora.sh "$@"
}
train_lora "rank 4"
train_lora "rank 4 + 3x3 conv rank 2 (C3Lier)" --network_args conv_dim=2 conv_alpha=0.5

# metadata rows carry the stage name in their input column: move it to the stage column
sed -i -E 's/^\| metadata \| ([a-z-]+): /| \1 | /' "$rows"

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
ram=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
mkdir -p "$(dirname "$OUT")"
{
  echo "Machine: $(nproc) cores ($cpu), $ram RAM, no GPU used; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD); profile release; mode $([ "$QUICK" = 1 ] && echo QUICK || echo full)."
  echo "Wall seconds include process start and model loading; peak RSS from /usr/bin/time."
  echo
  echo "| stage | model/input | items | wall s | items/s | peak RSS |"
  echo "|---|---|---|---|---|---|"
  cat "$rows"
} | tee "$OUT"
