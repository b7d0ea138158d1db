#!/usr/bin/env bash
# The GPU check: PaDiM and PatchCore fit time, coreset points per second, test s/img and peak GPU
# memory for ResNet18 and Wide-ResNet50-2 (seeded weights: nothing is downloaded) on tire, with
# torch, then train.py / test.py end to end on the GPU, and onnxruntime's CUDA provider where it
# is installed. Made for a machine that has torch with CUDA but maybe not the project's other
# packages, and no registry: run bench/gpu_prepare.sh beforehand where the data and PyPI are, and
# take .gpu_check/ along. About 3 minutes on one recent GPU.
#
#   bash bench/gpu_check.sh            # results: $OUT (if set) else bench/out/gpu/
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash bench/gpu_check.sh   # a dry run of the script itself
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/out/gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
DATA=.gpu_check/data/tire
mkdir -p "$RESULTS"
[ -d "$DATA/train" ] || { echo "gpu_check: $DATA is missing: run bench/gpu_prepare.sh first"; exit 2; }
if ! "$PY" -c "import xgboost" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .gpu_check/wheels/*.whl \
        && export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c "import torch, torchvision, onnxruntime as ort; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'); print('onnxruntime', ort.__version__, ort.get_available_providers())"
} 2>&1 | tee "$RESULTS/machine.txt"

QUICK=()
BACKBONES=resnet18,wide_resnet50_2
if [ -n "${GPU_CHECK_QUICK:-}" ]; then QUICK=(--patchcore-train 12 --max-test 8); BACKBONES=resnet18; fi
timeout 200 "$PY" bench/benchmark.py --dataset "$DATA" --device "$DEVICE" --impls ours --models padim,patchcore \
    --backbones "$BACKBONES" --weights none --no-pictures --batch-size 32 "${QUICK[@]}" 2>&1 | tee "$RESULTS/benchmark.log"
cp bench/out/table.md "$RESULTS/table-padim.md" 2>/dev/null
cp bench/out/table-patchcore*.md "$RESULTS/" 2>/dev/null

# End to end through the scripts: PaDiM ResNet18 with the default classifier, then onnxruntime.
MODELS=/tmp/gpu-check-models
rm -rf "$MODELS"
SETTINGS=(DATASET_DIR="$DATA" MODEL_DIR="$MODELS" RESULTS_DIR=/tmp/gpu-check-results BACKBONE=resnet18 WEIGHTS=none
          DEVICE="$DEVICE")
[ -n "${GPU_CHECK_QUICK:-}" ] && SETTINGS+=(CLASSIFIER=False OUT_OF_FOLD_FOLDS=0)
{
    /usr/bin/time -f "train.py wall %e s" "$PY" train.py "${SETTINGS[@]}" 2>&1 | tail -4
    /usr/bin/time -f "test.py (torch) wall %e s" "$PY" test.py "${SETTINGS[@]}" SAVE_PICTURES=False 2>&1 | tail -3
    if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
        "$PY" export.py "${SETTINGS[@]}" 2>&1 | tail -2
        /usr/bin/time -f "test.py (onnxruntime CUDA) wall %e s" "$PY" test.py "${SETTINGS[@]}" RUNTIME=onnxruntime \
            SAVE_PICTURES=False 2>&1 | tail -3
    else
        echo "onnxruntime's CUDA provider is not installed here: its row is skipped"
    fi
} 2>&1 | tee "$RESULTS/scripts.log"
echo "gpu_check: results in $RESULTS"
