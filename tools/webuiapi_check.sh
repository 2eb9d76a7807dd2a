#!/usr/bin/env bash
# Starts the worker on the tiny fixtures and drives it with the official A1111 client (webuiapi).
# Needs Python with `pip install webuiapi` (set PYTHON); not part of CI, which has no Python.
#   PYTHON=/path/to/venv/bin/python tools/webuiapi_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PORT=${PORT:-7871}
cargo build -q -p sd-worker
# A models folder with two checkpoints to switch between.
models=$(mktemp -d)
cp -r fixtures/sd15 fixtures/sd2 "$models/"
mkdir -p "$models/vae" && cp -r fixtures/sdxl/vae "$models/vae/xl-vae"
target/debug/sd-worker --models-dir "$models" --model sd15 --port "$PORT" --lora-dir fixtures/lora --upscaler-dir fixtures/esrgan --vae-dir "$models/vae" \
  --embeddings-dir fixtures/embeddings --controlnet-dir fixtures/controlnet --max-steps 1000 >/tmp/sd-worker-webuiapi.log 2>&1 &
worker=$!
trap 'kill $worker 2>/dev/null || true; rm -rf "$models"' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
"$PYTHON" tools/webuiapi_check.py --port "$PORT"
