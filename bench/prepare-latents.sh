#!/usr/bin/env bash
# Benchmark of prepare-latents (VAE encoding; every run uses --force so all images are encoded).
#   1. tiny: the 12 fixture photos, sd15-tiny checkpoint, 256x256 buckets, batch 4 (the
#      settings of tests/fixtures/golden/metadata/meta_lat.json).
#   2. full: a full-size SD1.5-architecture VAE with random weights (every 32/64/128 channel width
#      of the tiny VAE scaled x4 -> 128/256/512, timing does not depend on weight values), N
#      fixture photos (default 4) at a 512x512 bucket, batch 1.
# NO_BUILD=1 skips the cargo build (use the binary already in $CARGO_TARGET_DIR/$PROFILE).
# Prints wall seconds, images/s, CPU seconds (user + sys; steadier than wall when other work shares
# the cores) and peak RSS per case. RAYON_NUM_THREADS sets the number of threads.
#
#   bench/prepare-latents.sh [N] [WORKDIR]      (N=0: tiny case only; BIN_DIR: prebuilt binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4}
WORK=${2:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
[ -n "${NO_BUILD:-}${BIN_DIR:-}" ] || cargo build -p prepare-latents $([ "$PROFILE" = release ] && echo --release) -q
BIN=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/$PROFILE}/prepare-latents
FIX=tests/fixtures

mkdir -p "$WORK/tiny" "$WORK/full"
cp "$FIX"/images/* "$WORK/tiny/"
sed "s#{DATA}/#$WORK/tiny/#g" "$FIX/golden/metadata/meta_clean.json" > "$WORK/tiny.json"
for f in $(ls "$FIX"/images/*.png | head -n "$N"); do cp "$f" "$WORK/full/"; done
echo '{}' > "$WORK/full.json"

if [ "$N" -gt 0 ] && [ ! -f "$WORK/vae-full.safetensors" ]; then
  python3 - "$FIX/sd15-tiny/model.safetensors" "$WORK/vae-full.safetensors" <<'PY'
import json, struct, sys
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
rng = np.random.default_rng(0)
scale = {32: 128, 64: 256, 128: 512}
out_header, blobs, offset = {}, [], 0
for name, info in sorted(header.items()):
    if not name.startswith("first_stage_model."):
        continue
    shape = [scale.get(d, d) if i < 2 else d for i, d in enumerate(info["shape"])]
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if ".norm" in name and name.endswith(".weight"):
        data = np.ones(shape, np.float32)
    elif len(shape) == 1:
        data = np.zeros(shape, np.float32)
    else:
        data = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    raw = data.tobytes()
    out_header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
text = json.dumps(out_header).encode()
text += b" " * (-len(text) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for raw in blobs:
        f.write(raw)
PY
fi

measure() {
  local name=$1 images=$2; shift 2
  local log="$WORK/$name.time"
  /usr/bin/time -f "%e %U %S %M" -o "$log" "$BIN" "$@" --force -q
  read -r secs user sys rss < "$log"
  awk -v n="$name" -v items="$images" -v s="$secs" -v c="$user" -v k="$sys" -v r="$rss" \
    'BEGIN { printf "%-6s %4d images %8.2f s %8.2f images/s %8.2f CPU s %8.0f MiB peak RSS\n", n, items, s, items / s, c + k, r / 1024 }'
}

measure tiny 12 "$WORK/tiny" "$WORK/tiny.json" "$WORK/tiny-out.json" "$FIX/sd15-tiny/model.safetensors" \
  --batch_size 4 --max_resolution 256,256 --min_bucket_reso 128 --max_bucket_reso 512 --bucket_reso_steps 64 --full_path
[ "$N" -gt 0 ] || exit 0
measure full "$N" "$WORK/full" "$WORK/full.json" "$WORK/full-out.json" "$FIX/sd15-tiny/model.safetensors" \
  --vae "$WORK/vae-full.safetensors" --batch_size 1 --max_resolution 512,512 --min_bucket_reso 512 --max_bucket_reso 512
