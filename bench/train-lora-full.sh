#!/usr/bin/env bash
# Benchmark of train-lora on a full-size SD1.5 UNet architecture with random weights (the tiny
# fixture UNet with every width scaled x10: 320/640/1280 channels, 768-wide text context,
# 860M parameters, 3.4 GB of float32), at RES px (default 256: 32x32 latents), batch 1, LoRA rank
# DIM (default 8, alpha = rank) on the default kohya modules (attention projections, feed-forward, proj_in/proj_out), AdamW, in the
# precision MIXED_PRECISION (no: fp32; fp16/bf16 store the frozen UNet in that dtype).
# Runs 1 and 1 + STEPS training steps; the difference gives seconds per step without start-up.
# Prints: run, steps, wall s, CPU s (user+sys), peak RSS.
#
#   bench/train-lora-full.sh [STEPS] [WORKDIR]     (PROFILE=release|debug, NO_BUILD=1,
#                                                   NETWORK_ARGS="conv_dim=8 conv_alpha=8": C3Lier,
#                                                   RES=512, DIM=16, GRADIENT_CHECKPOINTING=1,
#                                                   EXTRA_ARGS="--gradient_checkpointing_levels 1")
# With SD_SCRIPTS and SD_PYTHON set, the same steps then run in PyTorch: sd-scripts' own UNet and
# networks.lora on the same weights (bench/torch_lora_full.py).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-3}
WORK=${2:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
[ -n "${NO_BUILD:-}" ] || cargo build -p train-lora $([ "$PROFILE" = release ] && echo --release) -q
BIN=${CARGO_TARGET_DIR:-target}/$PROFILE/train-lora
RES=${RES:-256}
DIM=${DIM:-8}
DATA="$WORK/data-$RES"
mkdir -p "$DATA"

if [ ! -f "$WORK/unet-full.safetensors" ]; then
  python3 - tests/fixtures/sd15-tiny/model.safetensors "$WORK/unet-full.safetensors" <<'PY'
import json, struct, sys
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
rng = np.random.default_rng(0)
CONTEXT = 768  # CLIP ViT-L/14 width; the tiny model's context is 64 wide
names = sorted(n for n in header if n.startswith("model.diffusion_model."))
def full_shape(name, shape):
    out = []
    for axis, dim in enumerate(shape):
        if axis == 1 and (".attn2.to_k." in name or ".attn2.to_v." in name):
            out.append(CONTEXT)
        elif axis < 2 and dim != 4:
            out.append(dim * 10)
        else:
            out.append(dim)
    return out
shapes = {n: full_shape(n, header[n]["shape"]) for n in names}
out_header, offset = {}, 0
for name in names:
    size = 4 * int(np.prod(shapes[name]))
    out_header[name] = {"dtype": "F32", "shape": shapes[name], "data_offsets": [offset, offset + size]}
    offset += size
text = json.dumps(out_header).encode()
text += b" " * (-len(text) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for name in names:
        shape = shapes[name]
        if "norm" in name and name.endswith(".weight"):
            data = np.ones(shape, np.float32)
        elif len(shape) == 1:
            data = np.zeros(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            data = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)
        f.write(data.tobytes())
PY
fi
if [ ! -f "$DATA/meta_lat.json" ]; then
  python3 - "$DATA" "$RES" <<'PY'
import json, sys
import numpy as np
data, res = sys.argv[1], int(sys.argv[2])
side = res // 8
rng = np.random.default_rng(1)
meta = {}
for i in range(2):
    np.savez(f"{data}/img{i}_{res:04d}x{res:04d}_sd.npz", latents=rng.standard_normal((4, side, side), dtype=np.float32))
    np.savez(f"{data}/img{i}_te_outputs.npz", hidden_state=rng.standard_normal((77, 768), dtype=np.float32))
    meta[f"img{i}.png"] = {"caption": "a photo", "train_resolution": [res, res]}
json.dump(meta, open(f"{data}/meta_lat.json", "w"))
PY
fi

run() {
  local steps=$1
  rm -rf "$WORK/out"
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/time.txt" "$BIN" \
    --pretrained_model_name_or_path "$WORK/unet-full.safetensors" \
    --in_json "$DATA/meta_lat.json" --train_data_dir "$DATA" \
    --output_dir "$WORK/out" --output_name full --network_dim "$DIM" --network_alpha "$DIM" \
    ${NETWORK_ARGS:+--network_args $NETWORK_ARGS} \
    --optimizer_type AdamW --learning_rate 1e-4 --max_train_steps "$steps" --train_batch_size 1 \
    --seed 1 --mixed_precision "${MIXED_PRECISION:-no}" --save_precision float -q --network_train_unet_only \
    ${GRADIENT_CHECKPOINTING:+--gradient_checkpointing} ${EXTRA_ARGS:-}
  if grep -q "terminated" "$WORK/time.txt"; then
    echo "train-lora was killed (out of memory?): $(cat "$WORK/time.txt")" >&2
    exit 1
  fi
  read -r secs user sys rss < "$WORK/time.txt"
  # The summary goes to stderr (appended, also when stderr is a file); the wall time to stdout.
  printf "%-6s %3d steps %9.2f s wall %9.2f CPU s %8.0f MiB peak RSS\n" "$2" "$steps" "$secs" \
    "$(echo "$user + $sys" | bc)" "$((rss / 1024))" >&2
  echo "$secs"
}

first=$(run 1 start-up)
last=$(run $((STEPS + 1)) train)
echo "seconds per step: $(echo "($last - $first) / $STEPS" | bc -l | cut -c1-6)"
if [ -n "${SD_SCRIPTS:-}" ]; then
  conv=()
  for arg in ${NETWORK_ARGS:-}; do conv+=("${arg#*=}"); done
  "${SD_PYTHON:?set SD_PYTHON to the python that runs sd-scripts}" bench/torch_lora_full.py \
    "$SD_SCRIPTS" "$WORK/unet-full.safetensors" "$STEPS" "$RES" "$DIM" "$DIM" "${conv[@]}"
fi
