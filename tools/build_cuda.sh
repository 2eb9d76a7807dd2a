#!/usr/bin/env bash
# One command for the CUDA build on any Linux machine, with or without a GPU or a system CUDA:
#     tools/build_cuda.sh            # release sd-worker + examples with --features cuda
#     tools/build_cuda.sh --check    # type-check only (the kernels' build script still runs nvcc)
# It installs a CUDA 13.0 toolchain from PyPI wheels into ~/.cache/sd-cuda-venv the first time
# (tools/cuda_toolchain.sh; a few minutes), then builds. The first build of candle's kernels takes
# 15-30 minutes on 2 cores. Binaries land in target/release/; on a GPU machine put the CUDA 13
# runtime on LD_LIBRARY_PATH. Without a GPU, `--device cuda` fails with a message naming the device
# and `--device auto` runs on the CPU; try it with the link stub:
#     LD_LIBRARY_PATH=$CUDA_ROOT/lib/stubs:$CUDA_ROOT/lib target/release/sd-worker --device auto …
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fetch --quiet
eval "$(bash tools/cuda_toolchain.sh)"
echo "CUDA toolchain: $CUDA_ROOT (compute capability $CUDA_COMPUTE_CAP)" >&2
if [ "${1:-}" = "--check" ]; then
  cargo check -p sd-worker --features cuda
  cargo check --features cuda --examples
else
  cargo build --release -p sd-worker --features cuda
  cargo build --release --features cuda --examples
fi
