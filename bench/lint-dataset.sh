#!/usr/bin/env bash
# Benchmark of lint-dataset on a generated folder of N real images (default 10000): copies of
# the 12 fixture photos (PNG and JPEG, 102x102 to 1000x872), each made unique by a few trailing
# bytes after the end-of-image marker (so every file has a same-size sibling and the duplicate
# check must hash them all: the worst case), plus a caption and a tag file per image.
# Prints one line per mode: images, wall seconds, images/s, peak RSS.
#
#   bench/lint-dataset.sh [N] [WORKDIR]        (PROFILE=debug to time the dev build)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
WORK=${2:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
[ -n "${BIN_DIR:-}" ] || cargo build -p lint-dataset $([ "$PROFILE" = release ] && echo --release) -q
BIN=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/$PROFILE}
DATA="$WORK/data"
if [ ! -f "$DATA/.complete-$N" ]; then
  rm -rf "$DATA" && mkdir -p "$DATA"
  python3 - "$DATA" "$N" tests/fixtures/images <<'PY'
import os, random, sys
data, n, fixtures = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sources = sorted(f for f in os.listdir(fixtures) if f.endswith((".png", ".jpg")))
blobs = [(os.path.splitext(f)[1], open(os.path.join(fixtures, f), "rb").read()) for f in sources]
rng = random.Random(0)
tags = ["1girl", "solo", "long_hair", "short_hair", "blue_eyes", "red_eyes", "white_shirt", "shirt",
        "2girls", "black_hair", "blonde_hair", "ponytail", "twintails", "smile", "outdoors", "cat"]
for i in range(n):
    ext, blob = blobs[i % len(blobs)]
    stem = os.path.join(data, f"img_{i:06d}")
    with open(stem + ext, "wb") as f:
        f.write(blob + i.to_bytes(4, "little"))
    with open(stem + ".caption", "w") as f:
        f.write(f"a photo number {i}\n")
    with open(stem + ".txt", "w") as f:
        f.write(", ".join(rng.sample(tags, 6)) + "\n")
PY
  touch "$DATA/.complete-$N"
fi
measure() {
  local name=$1; shift
  local log="$WORK/$name.time"
  /usr/bin/time -f "%e %M" -o "$log" "$BIN/lint-dataset" "$DATA" -q "$@" > "$WORK/$name.out" || true
  read -r secs rss < "$log"
  awk -v n="$name" -v items="$N" -v s="$secs" -v r="$rss" \
    'BEGIN { printf "%-26s %8d images %8.2f s %10.0f images/s %8.0f MiB peak RSS\n", n, items, s, items / (s > 0 ? s : 1e-9), r / 1024 }'
}
measure headers
measure headers+buckets+tokens --resolution 512 --tokenizer tests/fixtures/sd15-tiny/tokenizer
measure decode --decode
