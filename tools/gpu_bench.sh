#!/usr/bin/env bash
# Our models against PyTorch/diffusers on one NVIDIA GPU, on the same random full-size weights and inputs:
# SD 1.5 UNet step (batch 2, 512², F16), SDXL UNet step (batch 2, 1024², F16), VAE decode 512² and 1024²
# (F16), FLUX.1-schnell transformer step (1024², BF16), and end to end SDXL 1024² 30 steps and FLUX-schnell
# 1024² 4 steps. Prints ours/PyTorch-eager ratios (and torch.compile's time with GPU_BENCH_COMPILE=1),
# peak GPU memory of both sides (nvidia-smi, every 100 ms), and our relative L2 to PyTorch's output with
# its limit; our bench stops before timing a component whose output is off. Targets: every step <= 1.0x
# PyTorch eager, VAE <= 1.2x. Details: tools/gpu_bench.py (PyTorch side and driver), benches/gpu.rs (ours).
#
# Two phases, so the GPU's time goes to measuring:
#   tools/gpu_bench.sh prepare   # on the build machine, no GPU needed: CUDA build of our bench binary and
#                                # the txt2img/flux examples (tools/cuda_toolchain.sh's environment, as
#                                # tools/build_cuda.sh), packed with the diffusers wheel into
#                                # target/gpu_bench/carry/ (13 MB with CPU binaries, more with CUDA's kernels;
#                                # carry that folder to the GPU machine)
#   tools/gpu_bench.sh run [ARGS]  # on the GPU machine: checks nvidia-smi, PyTorch's GPU, diffusers and our
#                                # binaries' CUDA libraries, runs each stage (PyTorch side, then ours, then
#                                # deletes its weights), prints the table, writes target/gpu_bench.json
#                                # (after every stage); ARGS go to `gpu_bench.py drive` (e.g. --runs 20);
#                                # exits 1 when a stage fails or is cut off (a missed target is only shown)
# Smoke test of the whole harness on a CPU machine (tiny configs, F32; builds CPU binaries itself):
#   GPU_BENCH_DEVICE=cpu GPU_BENCH_SMALL=1 PYTHON=/root/venv-sd/bin/python tools/gpu_bench.sh run
#
# Settings (environment):
#   PYTHON=python3            the Python holding torch and transformers (diffusers too, else the carried wheel)
#   GPU_BENCH_ONLY=LIST       stages, comma-separated, run in this order whatever the list's:
#                             unet15,vae512,vae1024,unetxl,flux,e2e_sdxl,e2e_flux (default: all)
#   GPU_BENCH_DEADLINE=S      after S seconds kill what runs and print the table (fit an outer time limit)
#   GPU_BENCH_COMPILE=1       also time torch.compile (one to several minutes per stage)
#   GPU_BENCH_KEEP=1          keep every stage's weights in target/gpu_bench/check (FLUX end to end: 34 GB)
#   GPU_BENCH_COPY_TO=DIR     copy target/gpu_bench.json and the log there at the end
#   GPU_BENCH_DEVICE=cpu      run on the CPU (F32), GPU_BENCH_SMALL=1 tiny configs
#   GPU_BENCH_BIN=DIR         our binaries (default target/gpu_bench/bin, or bin-cpu built here for the CPU)
#   FEATURES=cuda,cudnn       prepare: cargo features (FEATURES= builds CPU binaries, to try the packing)
#   DIFFUSERS_VERSION=0.42.1  prepare: the diffusers wheel to carry (the GPU machine's image has none)
# Disk: the component stages write about 31 GB of weights, the end-to-end ones 12 GB more (the FLUX pipeline
# folder is 34 GB, its transformer handed on from the flux stage); each stage's weights are deleted after
# it, and a stage that does not fit the free disk is skipped. No run on a GPU has been timed yet.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT_DIR=target/gpu_bench
CARRY=$OUT_DIR/carry

die() {
    echo "gpu_bench: $*" >&2
    exit 1
}

# Builds our bench binary and the txt2img/flux examples with cargo features $2 into folder $1.
build_ours() {
    local dest=$1 features=$2
    local feat=()
    if [[ -n "$features" ]]; then feat=(--features "$features"); fi
    command -v cargo >/dev/null || die "cargo is needed to build our binaries (or set GPU_BENCH_BIN to a folder with them)"
    local exe
    exe=$(CARGO_TERM_PROGRESS_WHEN=never nice -n 5 cargo bench --no-run --bench gpu "${feat[@]}" \
        --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "gpu" and msg.get("executable"):
        print(msg["executable"])')
    [[ -n "$exe" ]] || die "cargo built no gpu bench binary"
    CARGO_TERM_PROGRESS_WHEN=never nice -n 5 cargo build --release "${feat[@]}" --example txt2img --example flux
    mkdir -p "$dest"
    cp "$exe" "$dest/gpu"
    cp target/release/examples/txt2img target/release/examples/flux "$dest/"
}

prepare() {
    local features=${FEATURES-cuda,cudnn}
    mkdir -p "$CARRY"
    cargo fetch --quiet
    if [[ ",$features," == *",cuda,"* || ",$features," == *",cudnn,"* || ",$features," == *",flash-attn,"* ]]; then
        if [[ ",$features," == *",cudnn,"* ]]; then export WITH_CUDNN=1; fi
        eval "$(bash tools/cuda_toolchain.sh)"
        echo "CUDA toolchain: $CUDA_ROOT (compute capability $CUDA_COMPUTE_CAP)" >&2
    fi
    rm -rf "$OUT_DIR/bin"
    build_ours "$OUT_DIR/bin" "$features"
    # Symbols are most of the size, and the carried tree is limited.
    if command -v strip >/dev/null; then strip "$OUT_DIR"/bin/*; fi
    local commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    if ! git diff --quiet HEAD 2>/dev/null; then commit="$commit+uncommitted"; fi
    echo "features ${features:-none}, compute capability ${CUDA_COMPUTE_CAP:-n/a}, commit $commit, built $(date -u +%FT%TZ)" \
        > "$OUT_DIR/bin/BUILD"
    # One archive: the three binaries share most of their code, which xz's 64 MiB window finds.
    python3 -c 'import sys, tarfile
with tarfile.open(sys.argv[1], "w:xz", preset=9) as t:
    t.add(sys.argv[2], arcname="bin")' "$CARRY/bin.tar.xz" "$OUT_DIR/bin"
    rm -rf "$CARRY/wheels"
    if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$CARRY/wheels" \
        "diffusers==${DIFFUSERS_VERSION:-0.42.1}"; then
        echo "gpu_bench: could not download the diffusers wheel; the GPU machine then needs diffusers installed" >&2
    fi
    echo "prepared $CARRY ($(du -sh "$CARRY" | cut -f1)): $(cat "$OUT_DIR/bin/BUILD")"
    echo "carry $CARRY to the GPU machine and run there: tools/gpu_bench.sh run"
}

# Folders holding the CUDA runtime libraries PyTorch's wheels (and a system CUDA) bring, for our binaries.
cuda_lib_path() {
    "$PYTHON" - <<'PY'
import glob, os
roots = ["/usr/local/cuda/lib64"]
try:
    import nvidia  # the namespace package of NVIDIA's wheels (cu13/lib, cudnn/lib, ...)
    roots += list(nvidia.__path__)
except ImportError:
    pass
dirs = []
for root in roots:
    for lib in sorted(glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True)):
        if os.path.dirname(lib) not in dirs:
            dirs.append(os.path.dirname(lib))
print(":".join(dirs))
PY
}

run() {
    local device=${GPU_BENCH_DEVICE:-cuda}
    [[ "$device" == cuda || "$device" == cpu ]] || die "GPU_BENCH_DEVICE=$device: use cuda or cpu"
    command -v "$PYTHON" >/dev/null || die "no Python at PYTHON=$PYTHON"
    if [[ "$device" == cuda ]]; then
        command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this machine has no NVIDIA driver (GPU_BENCH_DEVICE=cpu runs on the CPU)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader -i 0 \
            || die "nvidia-smi cannot read GPU 0"
    fi
    "$PYTHON" -c "import torch" 2>/dev/null || die "$PYTHON has no PyTorch (set PYTHON to the one that has)"
    if [[ "$device" == cuda ]]; then
        "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
            || die "PyTorch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no GPU (a CPU-only build, or no driver)"
    fi
    "$PYTHON" -c "import transformers" 2>/dev/null || die "$PYTHON has no transformers"
    if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
        compgen -G "$CARRY/wheels/*.whl" >/dev/null \
            || die "$PYTHON has no diffusers and $CARRY/wheels has no wheel (tools/gpu_bench.sh prepare downloads it)"
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$OUT_DIR/site" "$CARRY"/wheels/*.whl \
            || die "installing the carried diffusers wheel failed"
        export PYTHONPATH="$PWD/$OUT_DIR/site${PYTHONPATH:+:$PYTHONPATH}"
        "$PYTHON" -c "import diffusers" || die "diffusers does not import even from $OUT_DIR/site"
    fi
    echo "PyTorch $("$PYTHON" -c 'import torch, diffusers, transformers as t; print(torch.__version__, "diffusers", diffusers.__version__, "transformers", t.__version__)')"

    local bin lib_path=""
    if [[ "$device" == cpu ]]; then
        bin=${GPU_BENCH_BIN:-$OUT_DIR/bin-cpu}
        if [[ -z "${GPU_BENCH_BIN:-}" ]]; then build_ours "$bin" ""; fi
    else
        bin=${GPU_BENCH_BIN:-$OUT_DIR/bin}
        # Unpacked again when the carried archive is newer than what is unpacked (a warm machine, a new build).
        if [[ -z "${GPU_BENCH_BIN:-}" && -f "$CARRY/bin.tar.xz" && ( ! -x "$bin/gpu" || "$CARRY/bin.tar.xz" -nt "$bin/BUILD" ) ]]; then
            rm -rf "$bin"
            "$PYTHON" -c 'import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], filter="data")' "$CARRY/bin.tar.xz" "$OUT_DIR" || die "unpacking $CARRY/bin.tar.xz failed"
        fi
        lib_path=$(cuda_lib_path)
    fi
    for b in gpu txt2img flux; do
        [[ -x "$bin/$b" ]] || die "$bin/$b is missing: run tools/gpu_bench.sh prepare on the build machine and carry $CARRY"
    done
    if [[ -f "$bin/BUILD" ]]; then echo "ours: $(cat "$bin/BUILD")"; fi
    if [[ "$device" == cuda ]]; then
        local missing
        missing=$(LD_LIBRARY_PATH="$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$bin/gpu" | grep "not found" || true)
        [[ -z "$missing" ]] || die "our binary needs libraries this machine lacks (CUDA 13 runtime, cuBLAS, cuRAND, NVRTC, cuDNN 9 for the cudnn feature):
$missing"
    fi

    local args=(drive --device "$device" --bin "$bin")
    if [[ "${GPU_BENCH_SMALL:-0}" != 0 ]]; then args+=(--small); fi
    if [[ -n "${GPU_BENCH_ONLY:-}" ]]; then args+=(--only "$GPU_BENCH_ONLY"); fi
    if [[ "${GPU_BENCH_COMPILE:-0}" != 0 ]]; then args+=(--compile); fi
    if [[ "${GPU_BENCH_KEEP:-0}" != 0 ]]; then args+=(--keep); fi
    if [[ -n "${GPU_BENCH_DEADLINE:-}" ]]; then args+=(--deadline "$GPU_BENCH_DEADLINE"); fi
    if [[ -n "$lib_path" ]]; then args+=(--ours-lib-path "$lib_path"); fi
    local rc=0
    "$PYTHON" tools/gpu_bench.py "${args[@]}" "$@" || rc=$?
    if [[ -n "${GPU_BENCH_COPY_TO:-}" ]]; then
        cp target/gpu_bench.json "$OUT_DIR/gpu_bench.log" "$GPU_BENCH_COPY_TO"/ || true
    fi
    return "$rc"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    *) die "usage: tools/gpu_bench.sh prepare | run [gpu_bench.py drive arguments] (see the top of this file)" ;;
esac
