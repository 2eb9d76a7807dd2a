#!/usr/bin/env bash
# One command for the CUDA build on any Linux machine, with or without a GPU or a system CUDA:
#     tools/build_cuda.sh            # release sd-worker + examples, features cuda,cudnn
#     tools/build_cuda.sh --check    # type-check only: cuda,cudnn and flash-attn code paths, no GPU needed
#     FEATURES=cuda,cudnn,flash-attn tools/build_cuda.sh   # also compile flash attention's kernels
# It installs a CUDA 13.0 toolchain (and cuDNN 9) from PyPI wheels into ~/.cache/sd-cuda-venv the first
# time (tools/cuda_toolchain.sh; a few minutes), then builds. The first build of candle's kernels takes
# 15-30 minutes on 2 cores. `flash-attn` is not in the default set: candle-flash-attn compiles 53 CUDA
# kernels with CUTLASS (one took 4.5 min on one core of the 2-core dev VM, so hours there; build it on
# the GPU machine or a large one) and fetches CUTLASS with git, so it needs github.com or a CUTLASS
# checkout at ~/.cudaforge/git/checkouts/cutlass-7d49e6c7e2f8896c. `--check` still type-checks the
# flash-attn call sites: against candle-flash-attn's own sources with its kernel build script
# removed (a check never links, so the kernels are not needed for it).
# Binaries land in target/release/; on a GPU machine put the CUDA 13 runtime (and cuDNN 9 for the
# `cudnn` feature) on LD_LIBRARY_PATH. Without a GPU, `--device cuda` fails with a message naming the
# device and `--device auto` runs on the CPU; try it with the link stub:
#     LD_LIBRARY_PATH=$CUDA_ROOT/lib/stubs:$CUDA_ROOT/lib:$CUDNN_LIB target/release/sd-worker --device auto …
# At run time SD_CUDA_CONV=im2col and SD_CUDA_ATTENTION=chunked switch the GPU paths back to candle's
# (crates/sd-models/src/ops/cuda.rs), so one binary measures both.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fetch --quiet
export WITH_CUDNN=1
eval "$(bash tools/cuda_toolchain.sh)"
echo "CUDA toolchain: $CUDA_ROOT (compute capability $CUDA_COMPUTE_CAP)" >&2
FEATURES=${FEATURES:-cuda,cudnn}
if [ "${1:-}" = "--check" ]; then
  # A target dir of its own, so the checks share their CUDA builds and leave target/debug alone.
  cargo check -p sd-worker --features "$FEATURES" --target-dir target/cuda-check
  cargo check --features "$FEATURES" --examples --benches --target-dir target/cuda-check
  # flash-attn: the same check against candle-flash-attn's sources without their build script,
  # in a separate target dir and with Cargo.lock restored afterwards (the patch is for this check only).
  FA_SRC=$(ls -d ~/.cargo/registry/src/*/candle-flash-attn-0.11.1 | head -1)
  FA_CHECK=target/cuda-check/candle-flash-attn-nobuild
  rm -rf "$FA_CHECK" && mkdir -p "$(dirname "$FA_CHECK")" && cp -r "$FA_SRC" "$FA_CHECK" && rm "$FA_CHECK/build.rs"
  python3 - "$FA_CHECK/Cargo.toml" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read().replace('build = "build.rs"\n', 'build = false\n')
s = re.sub(r'\[build-dependencies\.[a-z]+\]\n(?:[^\[\n][^\n]*\n|\n)*', '', s)
open(p, 'w').write(s)
PY
  cp Cargo.lock target/cuda-check/Cargo.lock.saved
  trap 'cp target/cuda-check/Cargo.lock.saved Cargo.lock' EXIT
  cargo check -p sd-models --all-targets --features cudnn,flash-attn --target-dir target/cuda-check \
    --config "patch.crates-io.candle-flash-attn.path=\"$PWD/$FA_CHECK\""
else
  cargo build --release -p sd-worker --features "$FEATURES"
  cargo build --release --features "$FEATURES" --examples
fi
