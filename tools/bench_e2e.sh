#!/usr/bin/env bash
# End to end txt2img on the CPU in F32, ours against diffusers on the same random full-size weights:
# our `txt2img` example and diffusers' pipeline, one process per run, interleaved (ours, diffusers, ...),
# 2 threads each, same prompt, seed and PyTorch CPU noise (`--noise torch`), so both sides should draw the
# same image: every timed row is also a checked row (the two PNGs' relative L2 must stay under LIMIT, or
# the script exits non-zero after printing the table).
#
# Stages (tools/bench_e2e.py has their settings): sd15 (512², 20 Euler steps, CFG 7.5), turbo (SD-Turbo:
# SD 2.1 architecture, 512², 1 step, no CFG), sdxl (1024², 1 step, CFG 5). Per run: wall time from process
# start to PNG written (Python's imports count, as our start-up does), the load and generate times each
# side prints, peak RSS from /usr/bin/time (mapped file pages included). Never run in CI.
#
#   tools/bench_e2e.sh                                 # every stage, ROUNDS rounds each (default 1)
#   SD_BENCH_STAGES=turbo,sdxl ROUNDS=2 tools/bench_e2e.sh
#   SD_CPU_PATH=avx2 tools/bench_e2e.sh                # our kernels' AVX2 path (the default on x86-64 today)
#   SD_BENCH_SMALL=1 tools/bench_e2e.sh                # the tiny fixtures at 64²: checks the harness in seconds
#
# The first run writes the full-size folders under target/bench_e2e/ (sd15 ≈ 2.1 GB, turbo ≈ 2.6 GB, sdxl
# ≈ 7 GB, all fp16) and needs ≈ 16 GB of RAM while building SDXL; diffusers then needs ≈ 15 GB for sdxl.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-/root/venv-sd/bin/python}
ROUNDS=${ROUNDS:-1}
STAGES=${SD_BENCH_STAGES:-sd15,turbo,sdxl}
LIMIT=${LIMIT:-1e-2}
OUT=target/bench_e2e
mkdir -p "$OUT"

CARGO_TERM_PROGRESS_WHEN=never cargo build --release --example txt2img
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores;" \
     "flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_bf16|amx_tile)$' | tr '\n' ' ')"
echo "torch: $("$PYTHON" -c 'import torch, diffusers; print(torch.__version__, torch.backends.cpu.get_cpu_capability(), "diffusers", diffusers.__version__)')"

LOG=$OUT/runs.txt
: > "$LOG"
failed=0
for stage in ${STAGES//,/ }; do
    read -r steps guidance size fixture < <("$PYTHON" tools/bench_e2e.py settings "$stage") || true
    [[ -n "${fixture:-}" ]] || { "$PYTHON" tools/bench_e2e.py settings "$stage"; exit 2; }
    dir=$OUT/$stage
    [[ $stage == sd15 ]] && dir=target/bench_load/sd15
    if [[ -n "${SD_BENCH_SMALL:-}" ]]; then
        dir=fixtures/$fixture
        size=64
    elif [[ ! -f "$dir/model_index.json" || ! -d "$dir/tokenizer" ]]; then
        echo "writing the random full-size $stage folder to $dir (once)"
        "$PYTHON" tools/bench_e2e.py make "$stage" "$dir"
    fi
    # Both sides read the weights from a warm page cache (the folder may have been evicted since it was
    # written, and whichever side ran first would pay for the disk).
    find "$dir" -name '*.safetensors' -exec cat {} + > /dev/null
    for round in $(seq 1 "$ROUNDS"); do
        echo "$stage round $round: load average $(cut -d' ' -f1-3 /proc/loadavg)"
        /usr/bin/time -f "%e %M" -o "$OUT/time.txt" \
            target/release/examples/txt2img --model "$dir" --steps "$steps" --guidance "$guidance" \
            --width "$size" --height "$size" --seed 1 --noise torch --sampler Euler \
            --prompt "a cat" -o "$OUT/${stage}_ours.png" > /dev/null 2> "$OUT/ours.err" || { cat "$OUT/ours.err"; exit 1; }
        load=$(grep -oP '^loaded .* in \K[0-9.]+' "$OUT/ours.err")
        gen=$(grep -oP '^generate: \K[0-9.]+' "$OUT/ours.err")
        grep -m1 'CPU kernels' "$OUT/ours.err" || true
        echo "$stage ours $(cat "$OUT/time.txt") $load $gen" | tee -a "$LOG"
        /usr/bin/time -f "%e %M" -o "$OUT/time.txt" \
            "$PYTHON" tools/bench_e2e.py run "$stage" "$dir" "$OUT/${stage}_diffusers.png" "$size" > "$OUT/diffusers.json"
        read -r load gen < <("$PYTHON" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["load"], d["generate"])' "$OUT/diffusers.json")
        echo "$stage diffusers $(cat "$OUT/time.txt") $load $gen" | tee -a "$LOG"
    done
    if check=$("$PYTHON" tools/bench_e2e.py compare "$OUT/${stage}_ours.png" "$OUT/${stage}_diffusers.png" "$LIMIT"); then :; else failed=1; fi
    echo "$check"
    echo "$stage $check" >> "$LOG"
done
"$PYTHON" tools/bench_e2e.py table "$LOG"
if [[ $failed == 1 ]]; then
    echo "a stage's image differs from diffusers' beyond the limit: its times are not comparable" >&2
    exit 1
fi
