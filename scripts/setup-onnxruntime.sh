#!/usr/bin/env bash
# Installs the ONNX Runtime shared library that `tag-images` loads at run time into a
# project-local folder (default .local/onnxruntime/), without root and without a system package:
# the official `onnxruntime` wheel is downloaded from PyPI with pip and only the library is
# extracted from it. Re-running is a no-op once the library is there.
#
#   scripts/setup-onnxruntime.sh [TARGET_DIR]
#
# Environment: ORT_VERSION (default 1.31.1, the version the `ort` crate targets), ORT_PACKAGE
# (default onnxruntime; onnxruntime-gpu for the CUDA build used by `--device cuda`), PYTHON
# (default python3).
set -euo pipefail

version="${ORT_VERSION:-1.31.1}"
package="${ORT_PACKAGE:-onnxruntime}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-$root/.local/onnxruntime}"
python="${PYTHON:-python3}"

stamp="$target/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$package==$version" ]; then
    echo "ONNX Runtime ($package $version) already installed in $target"
    exit 0
fi

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) platform=manylinux_2_28_x86_64 ;;
    Linux-aarch64) platform=manylinux_2_28_aarch64 ;;
    *)
        echo "error: no prebuilt ONNX Runtime wheel known for $(uname -s)-$(uname -m);" >&2
        echo "install libonnxruntime $version yourself and pass --ort-lib or set ORT_DYLIB_PATH" >&2
        exit 1
        ;;
esac

download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
echo "downloading $package==$version ($platform) from PyPI"
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform "$platform" --python-version 3.12 --implementation cp \
    --dest "$download" "$package==$version"
wheel="$(ls "$download"/*.whl)"

mkdir -p "$target"
"$python" - "$wheel" "$target" <<'PY'
import os, sys, zipfile
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    names = [n for n in archive.namelist()
             if os.path.basename(n).startswith("libonnxruntime")
             and ".so" in os.path.basename(n)]
    if not names:
        sys.exit(f"error: no libonnxruntime.so in {wheel}")
    for name in names:
        data = archive.read(name)
        out = os.path.join(target, os.path.basename(name))
        with open(out + ".tmp", "wb") as f:
            f.write(data)
        os.replace(out + ".tmp", out)
        print("installed", out)
PY
lib="$(cd "$target" && ls libonnxruntime.so.* | head -n 1)"
ln -sf "$lib" "$target/libonnxruntime.so"
echo "$package==$version" > "$stamp"
echo "ONNX Runtime ($package $version) ready: $target/$lib"
