#!/usr/bin/env bash
# Benchmark of prepare-dataset on a generated DreamBooth layout of N real images (default 3000):
# copies of the 12 fixture photos spread over three `<repeats>_<name>` folders, two thirds with
# a `.txt` caption, plus a regularisation folder of N/10 images. Times a first run (image
# headers read, buckets placed, JSON written) and an unchanged re-run (all up to date).
# Prints one line per run: images, wall seconds, images/s, peak RSS.
#
#   bench/prepare-dataset.sh [N] [WORKDIR]        (PROFILE=debug to time the dev build)
#
# With SD_SCRIPTS (an sd-scripts checkout) and SD_PYTHON (the Python that runs it) set, the same
# layout is then registered by sd-scripts itself (bench/sd_scripts_dataset.py: train_network.py's
# dataset group, image sizes and buckets, no model), side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
WORK=${2:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
[ -n "${BIN_DIR:-}" ] || cargo build -p prepare-dataset $([ "$PROFILE" = release ] && echo --release) -q
BIN=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/$PROFILE}
DATA="$WORK/img"
REG="$WORK/reg"
if [ ! -f "$WORK/.complete-$N" ]; then
  rm -rf "$DATA" "$REG" && mkdir -p "$DATA" "$REG"
  python3 - "$DATA" "$REG" "$N" tests/fixtures/images <<'PY'
import os, shutil, sys
data, reg, n, fixtures = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sources = sorted(f for f in os.listdir(fixtures) if f.endswith((".png", ".jpg")))
folders = ["3_sks photo", "2_kohya style", "1_other thing"]
for folder in folders:
    os.makedirs(os.path.join(data, folder))
os.makedirs(os.path.join(reg, "1_photo"))
for i in range(n):
    source = sources[i % len(sources)]
    ext = os.path.splitext(source)[1]
    folder = os.path.join(data, folders[i % len(folders)])
    shutil.copyfile(os.path.join(fixtures, source), os.path.join(folder, f"img_{i:06d}{ext}"))
    if i % 3:
        with open(os.path.join(folder, f"img_{i:06d}.txt"), "w") as f:
            f.write(f"a photo number {i}, tag_{i % 17}, tag_{i % 5}\n")
for i in range(n // 10):
    source = sources[i % len(sources)]
    shutil.copyfile(os.path.join(fixtures, source),
                    os.path.join(reg, "1_photo", f"reg_{i:06d}{os.path.splitext(source)[1]}"))
PY
  touch "$WORK/.complete-$N"
fi
measure() {
  local name=$1; shift
  local log="$WORK/$name.time"
  /usr/bin/time -f "%e %M" -o "$log" "$BIN/prepare-dataset" -q --train_data_dir "$DATA" \
    --reg_data_dir "$REG" --caption_extension .txt --resolution 512 --enable_bucket \
    --out_json "$WORK/meta_dataset.json"
  read -r secs rss < "$log"
  local items=$((N + N / 10))
  awk -v n="$name" -v items="$items" -v s="$secs" -v r="$rss" \
    'BEGIN { printf "%-10s %8d images %8.2f s %10.0f images/s %8.0f MiB peak RSS\n", n, items, s, items / (s > 0 ? s : 1e-9), r / 1024 }'
}
measure first
measure re-run
if [ -n "${SD_SCRIPTS:-}" ] && [ -n "${SD_PYTHON:-}" ]; then
  /usr/bin/time -f "%e %M" -o "$WORK/sd-scripts.time" "$SD_PYTHON" bench/sd_scripts_dataset.py \
    "$SD_SCRIPTS" "$DATA" "$REG" > "$WORK/sd-scripts.out" 2> "$WORK/sd-scripts.log"
  read -r secs rss < "$WORK/sd-scripts.time"
  echo "$(tail -n 1 "$WORK/sd-scripts.out") (process: ${secs} s wall, $((rss / 1024)) MiB peak RSS)"
fi
