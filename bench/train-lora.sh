#!/usr/bin/env bash
# Benchmark of train-lora on the tiny fixture checkpoint with the settings of
# tests/fixtures/golden/loss.json (20 steps, batch 2, rank 4, AdamW 1e-4, 1 thread), in the
# precision MIXED_PRECISION (no: fp32), on caches built from the golden latents (4 images,
# 256-px buckets) and golden text states.
# Prints wall time, s/step and peak RSS. Usage: bench/train-lora.sh [extra train-lora flags]
# C3Lier (3x3 conv modules too), as in bench/all.sh: bench/train-lora.sh --network_args conv_dim=2 conv_alpha=0.5
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
[ -n "${BIN_DIR:-}" ] || cargo build --release -q -p train-lora
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$root" "$work" <<'PY'
import json, sys, numpy as np
root, work = sys.argv[1], sys.argv[2]
golden = f"{root}/tests/fixtures/golden"
states = np.load(f"{golden}/unet/unet.npz")["encoder_hidden_states_77"]
meta = {}
for i, (stem, size) in enumerate([("astronaut", "0512x0512"), ("cell", "0550x0660"), ("chelsea", "0451x0300"), ("text", "0448x0172")]):
    lat = np.load(f"{golden}/vae/{stem}_{size}_sd.npz")["latents"]
    np.savez(f"{work}/{stem}_{size}_sd.npz", latents=lat)
    np.savez(f"{work}/{stem}_te_outputs.npz", hidden_state=states[i % 2])
    meta[f"{stem}.png"] = {"caption": "a photo", "tags": "cat", "train_resolution": [lat.shape[2] * 8, lat.shape[1] * 8]}
json.dump(meta, open(f"{work}/meta_lat.json", "w"))
PY
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1}
/usr/bin/time -v "${BIN_DIR:-$CARGO_TARGET_DIR/release}/train-lora" \
  --pretrained_model_name_or_path "$root/tests/fixtures/sd15-tiny/model.safetensors" \
  --in_json "$work/meta_lat.json" --train_data_dir "$work" --output_dir "$work/out" --output_name bench \
  --network_dim 4 --network_alpha 1 --optimizer_type AdamW --learning_rate 1e-4 --lr_scheduler constant \
  --max_train_steps 20 --train_batch_size 2 --seed 42 --mixed_precision "${MIXED_PRECISION:-no}" --save_precision float "$@" \
  2> "$work/time.txt"
grep -E "Elapsed|Maximum resident" "$work/time.txt"
python3 - "$work/out/bench_loss.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("losses:", " ".join(f"{r['loss']:.4f}" for r in rows))
PY
