#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain (nvcc, headers, cuBLAS/cuRAND/cudart link libraries) from PyPI
# wheels on a machine without a GPU or system CUDA, plus a libcuda.so link stub, and prints the
# environment to build the workspace with `--features cuda`. Usage:
#     eval "$(bash tools/cuda_toolchain.sh)"      # from the project root (tools/build_cuda.sh does it all)
#     cargo build --release --features cuda ...
# Optional: CUDA_VENV (default ~/.cache/sd-cuda-venv), WITH_CUDNN=1 to add cuDNN 9 headers/libs.
# The binary links libcuda/libcudart/libcublas/libcurand dynamically: on the GPU machine those come
# from the driver and the CUDA 13 runtime (e.g. /usr/local/cuda/lib64 or PyTorch's nvidia wheels).
# The kernels are compiled for compute capability 90 (H100/H200); set CUDA_COMPUTE_CAP for others.
set -euo pipefail
VENV=${CUDA_VENV:-$HOME/.cache/sd-cuda-venv}
if [ ! -f "$VENV/.ok" ]; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14 >&2
  touch "$VENV/.ok"
fi
if [ "${WITH_CUDNN:-0}" = 1 ] && [ ! -f "$VENV/.cudnn-ok" ]; then
  "$VENV/bin/pip" install -q nvidia-cudnn-cu13 >&2 && touch "$VENV/.cudnn-ok"
fi
CU=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
# unversioned names for the linker
( cd "$CU/lib"
  for l in cublas cublasLt curand nvrtc cudart; do
    so=$(ls lib$l.so.* 2>/dev/null | grep -v -e builtins -e alt | head -1)
    [ -n "$so" ] && ln -sf "$so" lib$l.so
  done )
ln -sfn lib "$CU/lib64"
# libcuda.so link stub: every driver symbol returns CUDA_ERROR_NO_DEVICE; for linking and for
# checking here that a binary fails gracefully. The real driver's libcuda.so.1 is used on a GPU.
mkdir -p "$CU/lib/stubs"
if [ ! -f "$CU/lib/stubs/libcuda.so" ]; then
  CUDARC=$(ls -d ~/.cargo/registry/src/*/cudarc-* 2>/dev/null | sort -V | tail -1)
  [ -n "$CUDARC" ] || { echo "run 'cargo fetch' in the workspace first (cudarc sources needed)" >&2; exit 1; }
  grep -ohE '^ *pub (unsafe )?fn (cu[A-Za-z0-9_]+)\(' "$CUDARC"/src/driver/sys/*.rs | sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | awk '{print "int "$1"(void){return 100;}"}' > "$CU/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" "$CU/lib/stubs/libcuda_stub.c"
fi
# The binaries ask the loader for the soname, so a GPU-less run with the stub needs that name too.
ln -sf libcuda.so "$CU/lib/stubs/libcuda.so.1"
echo "export CUDA_ROOT=$CU PATH=$CU/bin:\$PATH CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000 LIBRARY_PATH=$CU/lib:$CU/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
if [ -f "$VENV/.cudnn-ok" ]; then
  CUDNN=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cudnn)
  # unversioned name for the linker (`-lcudnn`); the runtime asks for libcudnn.so.9
  ln -sf libcudnn.so.9 "$CUDNN/lib/libcudnn.so"
  echo "export CUDNN_LIB=$CUDNN/lib CPATH=$CUDNN/include\${CPATH:+:\$CPATH} LIBRARY_PATH=$CUDNN/lib:\$LIBRARY_PATH"
fi
