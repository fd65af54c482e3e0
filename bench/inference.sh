#!/usr/bin/env bash
# Per-item compute time of the full-size inference models, lorakit next to PyTorch on the same
# random weights in the real layouts and the same inputs (model loading excluded):
#   CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders at batch 1/8/32 (all layers, 77 tokens),
#   BLIP-large captioning at batch 1/8, greedy and 3 beams, exactly 30 generated tokens,
#   the SD/SDXL VAE encoder and decoder at 512² and 1024² (batch 1).
# The weights are made once by bench/torch_inference.py (transformers / diffusers initialisation,
# float32, about 5 GB in WORKDIR). Each row runs once to warm up, then REPEATS times (default 2),
# lorakit (pipeline/examples/inference_bench.rs) and PyTorch alternately. torch uses THREADS
# threads (default: the cores). Prints a markdown table: s/item per side, their ratio, and each
# process's peak RSS (model loading included).
#
#   SD_PYTHON=... bench/inference.sh [WORKDIR] [ROW...]
#       (rows: clip-l-b1 clip-l-b8 clip-l-b32 clip-bigg-b1 clip-bigg-b8 clip-bigg-b32
#        blip-greedy-b1 blip-greedy-b8 blip-beam3-b1 blip-beam3-b8
#        vae-encode-512 vae-encode-1024 vae-decode-512 vae-decode-1024; default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d)}
shift || true
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(clip-l-b1 clip-l-b8 clip-l-b32 clip-bigg-b1 clip-bigg-b8 clip-bigg-b32
  blip-greedy-b1 blip-greedy-b8 blip-beam3-b1 blip-beam3-b8
  vae-encode-512 vae-encode-1024 vae-decode-512 vae-decode-1024)
: "${SD_PYTHON:?set SD_PYTHON to a Python with torch, diffusers and transformers}"
THREADS=${THREADS:-$(nproc)}
# FEATURES=candle-cuda with BENCH_DEVICE=cuda: the lorakit side on the GPU (bench/gpu-check.sh).
[ -n "${NO_BUILD:-}" ] || cargo build -q --release -p lorakit-pipeline --example inference_bench \
  --example cpu_peak ${FEATURES:+--features "$FEATURES"}
BIN=${CARGO_TARGET_DIR:-target}/release/examples/inference_bench
mkdir -p "$WORK"
if [ ! -f "$WORK/blip/tokenizer.json" ]; then
  "$SD_PYTHON" bench/torch_inference.py make "$WORK"
  # caption-images reads the BERT tokenizer from the model folder (the fixture's is the real one).
  cp tests/fixtures/blip-tiny/tokenizer.json "$WORK/blip/"
fi

seconds() { sed -n 's/.*"seconds_per_item": *\([0-9.e+-]*\).*/\1/p' | tail -1; }
# Runs a command under /usr/bin/time: its JSON line on stdout, its peak RSS (MiB) in $WORK/rss.
measured() { /usr/bin/time -f "%M" -o "$WORK/rss.kib" "$@" 2>/dev/null; echo $(( $(tail -1 "$WORK/rss.kib") / 1024 )) > "$WORK/rss"; }

echo "machine ceilings: $("${CARGO_TARGET_DIR:-target}/release/examples/cpu_peak" "$THREADS")"
echo
echo "| row | lorakit s/item | PyTorch s/item | lorakit / PyTorch | lorakit peak RSS | PyTorch peak RSS |"
echo "|---|---|---|---|---|---|"
for row in "${ROWS[@]}"; do
  ours=$(measured "$BIN" "$WORK" "$row" | seconds); ours_rss=$(cat "$WORK/rss")
  theirs=$(measured env OMP_NUM_THREADS="$THREADS" THREADS="$THREADS" "$SD_PYTHON" bench/torch_inference.py run "$WORK" "$row" | seconds)
  theirs_rss=$(cat "$WORK/rss")
  ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')
  printf '| %s | %.3f | %.3f | %s | %s MiB | %s MiB |\n' "$row" "$ours" "$theirs" "$ratio" "$ours_rss" "$theirs_rss"
done
