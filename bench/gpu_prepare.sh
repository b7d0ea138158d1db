#!/usr/bin/env bash
# Packs what bench/gpu_check.sh needs on a GPU machine that cannot reach a package registry or
# ../shared: a compact copy of tire (images re-encoded as JPEG quality 95, masks as they are)
# and the wheels of the project's packages such an image tends to lack (xgboost, as the 5.6 MB
# CPU-only build). Everything goes to .gpu_check/ (ignored by git), which must stay within 64 MB.
#
#   bash bench/gpu_prepare.sh [path/to/tire]       # run here, where the data and PyPI are
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${1:-../shared/data/tire}
PY=${PYTHON:-.venv/bin/python}
[ -d "$SOURCE/train/good" ] || { echo "gpu_prepare: $SOURCE has no train/good: give the tire folder as the first argument"; exit 2; }
rm -rf .gpu_check.tmp && mkdir -p .gpu_check.tmp/wheels
"$PY" - "$SOURCE" .gpu_check.tmp/data/tire <<'PYTHON'
import shutil, sys
from pathlib import Path
from PIL import Image

source, target = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(source.rglob("*")):
    if not path.is_file():
        continue
    out = target / path.relative_to(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png" and "ground_truth" not in path.parts:
        Image.open(path).convert("RGB").save(out.with_suffix(".jpg"), quality=95)
    else:
        shutil.copyfile(path, out)
PYTHON
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .gpu_check.tmp/wheels "xgboost-cpu==3.2.*"
rm -rf .gpu_check && mv .gpu_check.tmp .gpu_check
SIZE=$(du -sm .gpu_check | cut -f1)
echo "gpu_prepare: .gpu_check/ holds ${SIZE} MB ($(find .gpu_check/data -name '*.jpg' | wc -l) images, $(ls .gpu_check/wheels | wc -l) wheel)"
[ "$SIZE" -le 60 ] || { echo "gpu_prepare: over 60 MB: the device tool carries at most 64 MB with the tree"; exit 1; }
