#!/bin/bash
# serve.py's resident memory across model swaps: trains MobileNetV2 (imagenet-offline) on tire,
# serves it, then swaps the model five times under the server with `train.py ADD_GOOD=` (4 mirrored
# validation goods each), sending 10 requests after each swap and 60 at the end; prints VmRSS.
#   flock /tmp/bench.lock bash bench/swap_memory.sh [work folder, default /tmp/swap-memory] [port, default 18777]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/swap-memory}
PORT=${2:-18777}
PY=${PYTHON:-.venv/bin/python}
DATA=../shared/data/tire
rm -rf "$WORK" && mkdir -p "$WORK"
S="DATASET_DIR=$DATA MODEL_DIR=$WORK/models RESULTS_DIR=$WORK/results REVIEW_DIR=$WORK/review OUT_OF_FOLD_FOLDS=0 CLASSIFIER=False"
$PY train.py $S > "$WORK/train.log" 2>&1
for i in 0 1 2 3 4; do
  mkdir -p "$WORK/add$i"
  for f in $(ls "$DATA/validation/good" | head -$((4 * i + 4)) | tail -4); do
    $PY -c "import sys; from PIL import Image, ImageOps; ImageOps.mirror(Image.open(sys.argv[1])).save(sys.argv[2])" "$DATA/validation/good/$f" "$WORK/add$i/$f"
  done
done
$PY serve.py $S SERVE_PORT=$PORT > "$WORK/serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for t in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
IMAGE="$DATA/test/good/000.png"
send() { for k in $(seq "$1"); do curl -s -o /dev/null -H "Content-Type: image/png" --data-binary @"$IMAGE" "http://127.0.0.1:$PORT/inspect"; done; }
rss() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status"; }
send 10; echo "before any swap: $(rss) MB"
for i in 0 1 2 3 4; do
  $PY train.py $S ADD_GOOD="$WORK/add$i" > "$WORK/add$i.log" 2>&1
  sleep 3; send 10; echo "after swap $((i + 1)): $(rss) MB"
done
send 60; echo "after 60 more requests: $(rss) MB"
