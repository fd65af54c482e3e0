#!/usr/bin/env bash
# Benchmark of the metadata stages (merge-captions, merge-tags, clean-captions) on a generated
# dataset of N image/caption/tag triples (default 100000). The images are placeholders: these
# stages never decode them. Prints one line per stage: items, wall seconds, items/s, peak RSS.
#
#   bench/metadata.sh [N] [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
WORK=${2:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
[ -n "${BIN_DIR:-}" ] || cargo build --workspace --bins $([ "$PROFILE" = release ] && echo --release) -q
BIN=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/$PROFILE}
DATA="$WORK/data"
if [ ! -f "$DATA/.complete-$N" ]; then
  rm -rf "$DATA" && mkdir -p "$DATA"
  python3 - "$DATA" "$N" <<'PY'
import os, random, sys
data, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
words = ["girl", "woman", "cat", "photo", "anime", "cartoon", "outdoors", "smile", "lady", "people"]
tags = ["1girl", "solo", "long_hair", "short_hair", "blue_eyes", "red_eyes", "white_shirt", "shirt",
        "2girls", "black_hair", "blonde_hair", "ponytail", "twintails", "smile", "^_^", "hair_ornament"]
for i in range(n):
    stem = os.path.join(data, f"img_{i:06d}")
    open(stem + ".png", "wb").close()
    with open(stem + ".caption", "w") as f:
        f.write("a " + " ".join(rng.choice(words) for _ in range(8)) + "\n")
    with open(stem + ".txt", "w") as f:
        f.write(", ".join(rng.sample(tags, 8)) + "\n")
PY
  touch "$DATA/.complete-$N"
fi
measure() {
  local name=$1; shift
  local log="$WORK/$name.time"
  /usr/bin/time -f "%e %M" -o "$log" "$@" -q
  read -r secs rss < "$log"
  awk -v n="$name" -v items="$N" -v s="$secs" -v r="$rss" \
    'BEGIN { printf "%-16s %8d items %8.2f s %10.0f items/s %8.0f MiB peak RSS\n", n, items, s, items / (s > 0 ? s : 1e-9), r / 1024 }'
}
rm -f "$WORK"/meta_*.json*
echo "metadata stages, $N items, $(nproc) cores, profile $PROFILE"
measure merge-captions "$BIN/merge-captions" "$DATA" "$WORK/meta_cap.json" --full_path
measure merge-tags "$BIN/merge-tags" "$DATA" "$WORK/meta_cap_dd.json" --in_json "$WORK/meta_cap.json" --full_path
measure clean-captions "$BIN/clean-captions" "$WORK/meta_cap_dd.json" "$WORK/meta_clean.json"
