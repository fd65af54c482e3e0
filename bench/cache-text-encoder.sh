#!/usr/bin/env bash
# Benchmark of cache-text-encoder: captions/s on the tiny fixture model and on a full-size
# CLIP ViT-L/14 text encoder (SD1.x shape: 12 layers, width 768, 12 heads, MLP 3072) with
# random weights, at several --batch_size values (1 = one caption at a time). Every run starts
# from an empty cache folder. Prints: model, batch size, captions, seconds, captions/s.
#
#   bench/cache-text-encoder.sh [N_TINY] [N_FULL] [WORKDIR]   (N_FULL=0 skips CLIP-L; env BATCHES, BIN_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
N_TINY=${1:-512}
N_FULL=${2:-64}
WORK=${3:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
[ -n "${BIN_DIR:-}" ] || cargo build -p cache-text-encoder $([ "$PROFILE" = release ] && echo --release) -q
BIN=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/$PROFILE}/cache-text-encoder
FIXTURES=tests/fixtures
mkdir -p "$WORK"

# Metadata JSON with N varied captions (caption + tags, 30-60 tokens each), stem keys.
make_meta() {
  python3 - "$1" "$2" <<'PY'
import json, random, sys
path, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
words = ["girl", "woman", "cat", "photo", "anime", "cartoon", "outdoors", "smile", "lady", "city"]
tags = ["1girl", "solo", "long hair", "short hair", "blue eyes", "red eyes", "white shirt",
        "2girls", "black hair", "blonde hair", "ponytail", "twintails", "smile", "hair ornament"]
meta = {f"img_{i:06d}": {"caption": "a " + " ".join(rng.choice(words) for _ in range(10)),
                         "tags": ", ".join(rng.sample(tags, 8))} for i in range(n)}
json.dump(meta, open(path, "w"), indent=2)
PY
}

# A single-file SD1 checkpoint holding only a CLIP-L-shaped text encoder with random fp32
# weights (a 1M-value random block tiled over every tensor; layer norms at 1/0).
make_clip_l() {
  python3 - "$1" <<'PY'
import array, json, random, struct, sys
path = sys.argv[1]
rng = random.Random(0)
block = array.array("f", (rng.gauss(0.0, 0.02) for _ in range(1 << 20))).tobytes()
width, mlp, layers, vocab, positions = 768, 3072, 12, 49408, 77
shapes = {"embeddings.token_embedding.weight": [vocab, width],
          "embeddings.position_embedding.weight": [positions, width],
          "final_layer_norm.weight": [width], "final_layer_norm.bias": [width]}
for i in range(layers):
    p = f"encoder.layers.{i}."
    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"]:
        shapes[p + f"self_attn.{proj}.weight"] = [width, width]
        shapes[p + f"self_attn.{proj}.bias"] = [width]
    for norm in ["layer_norm1", "layer_norm2"]:
        shapes[p + f"{norm}.weight"] = [width]
        shapes[p + f"{norm}.bias"] = [width]
    shapes[p + "mlp.fc1.weight"] = [mlp, width]; shapes[p + "mlp.fc1.bias"] = [mlp]
    shapes[p + "mlp.fc2.weight"] = [width, mlp]; shapes[p + "mlp.fc2.bias"] = [width]
header, offset = {}, 0
for name, shape in shapes.items():
    size = 4
    for d in shape: size *= d
    header["cond_stage_model.transformer.text_model." + name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
    offset += size
raw = json.dumps(header).encode()
raw += b" " * (-len(raw) % 8)
one, zero = struct.pack("<f", 1.0), struct.pack("<f", 0.0)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw))); f.write(raw)
    for name, shape in shapes.items():
        size = 4
        for d in shape: size *= d
        if "norm" in name:
            f.write((one if name.endswith("weight") else zero) * (size // 4))
            continue
        while size > 0:
            chunk = block[: min(size, len(block))]
            f.write(chunk); size -= len(chunk)
PY
}

run() {
  local label=$1 model=$2 meta=$3 n=$4 batch=$5
  local out="$WORK/cache-$label-$batch"
  rm -rf "$out" && mkdir -p "$out"
  /usr/bin/time -f "%e %M" -o "$WORK/time" \
    "$BIN" "$meta" "$model" --tokenizer "$FIXTURES/sd15-tiny/tokenizer" --cache_dir "$out" --batch_size "$batch" -q
  read -r secs rss < "$WORK/time"
  awk -v l="$label" -v b="$batch" -v n="$n" -v s="$secs" -v r="$rss" \
    'BEGIN { printf "%-8s batch %3d %6d captions %8.2f s %8.1f captions/s %7.0f MiB peak RSS\n", l, b, n, s, n / s, r / 1024 }'
}

make_meta "$WORK/meta_tiny.json" "$N_TINY"
echo "cache-text-encoder, $(nproc) cores, profile $PROFILE (times include model loading)"
for batch in ${BATCHES:-1 8 32}; do run tiny "$FIXTURES/sd15-tiny/model.safetensors" "$WORK/meta_tiny.json" "$N_TINY" "$batch"; done
[ "$N_FULL" -gt 0 ] || exit 0
make_meta "$WORK/meta_full.json" "$N_FULL"
[ -f "$WORK/clip_l.safetensors" ] || make_clip_l "$WORK/clip_l.safetensors"
for batch in ${BATCHES:-1 8 32}; do run clip-l "$WORK/clip_l.safetensors" "$WORK/meta_full.json" "$N_FULL" "$batch"; done
