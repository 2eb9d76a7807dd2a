#!/usr/bin/env bash
# Loading a diffusers SD 1.5 folder (random full-size UNet + VAE + CLIP text encoder, fp16
# `*.fp16.safetensors` on disk) into F32 on the CPU: our loader (`sd_models::loader::load`, through
# `benches/load.rs`) against diffusers/transformers `from_pretrained(..., torch_dtype=float32)` with
# torch on 2 threads. One untimed load of each side first so both read the same warm page cache,
# then ROUNDS rounds, each one process per side, interleaved (ours, diffusers, ours, diffusers, …);
# prints the medians, the ratio and the peak memory of each side. Never run in CI.
#
#   tools/bench_load.sh                      # ~2.1 GB folder written once to target/bench_load/sd15
#   ROUNDS=5 PYTHON=/path/to/python tools/bench_load.sh
#   SD_LOAD_CANDLE=1 tools/bench_load.sh     # also candle's stock mmap VarBuilder (the pre-change path)
#
# Memory columns: peak RSS (VmHWM, which counts the mapped file pages a process touched) and peak
# anonymous RSS (sampled every 5 ms: what the process itself holds). F32 SD 1.5 weights are 4.3 GB.
# Results: target/bench_load.json.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-/root/venv-sd/bin/python}
ROUNDS=${ROUNDS:-3}
DIR=target/bench_load/sd15
OUT=target/bench_load/runs.jsonl

if [[ ! -f "$DIR/unet/diffusion_pytorch_model.fp16.safetensors" ]]; then
    echo "writing a random SD 1.5 folder to $DIR (once)"
    "$PYTHON" tools/bench_load.py make "$DIR"
fi

BIN=$(CARGO_TERM_PROGRESS_WHEN=never cargo bench --bench load --no-run --message-format=json 2>/dev/null \
    | "$PYTHON" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "load" and m.get("executable"):
        print(m["executable"])' | tail -n1)
if [[ -z "$BIN" ]]; then
    echo "could not build benches/load.rs; run 'cargo bench --bench load --no-run' to see why" >&2
    exit 1
fi

SIDES=(ours diffusers)
if [[ "${SD_LOAD_CANDLE:-0}" != "0" ]]; then SIDES=(ours candle diffusers); fi

run_side() {
    case "$1" in
        diffusers) "$PYTHON" tools/bench_load.py load "$DIR" 2>/dev/null | tail -n1 ;;
        *) "$BIN" "$DIR" "$1" ;;
    esac
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "warm-up (untimed): ${SIDES[*]}"
for side in "${SIDES[@]}"; do run_side "$side" >/dev/null; done
: >"$OUT"
for round in $(seq 1 "$ROUNDS"); do
    for side in "${SIDES[@]}"; do
        line=$(run_side "$side")
        echo "round $round: $line"
        echo "$line" >>"$OUT"
    done
done

"$PYTHON" - "$OUT" <<'PY'
import json
import statistics
import sys
from pathlib import Path

runs = [json.loads(l) for l in Path(sys.argv[1]).read_text().splitlines() if l.strip()]
sides = list(dict.fromkeys(r["side"] for r in runs))
summary = {}
for side in sides:
    mine = [r for r in runs if r["side"] == side]
    summary[side] = {
        "median_s": statistics.median(r["secs"] for r in mine),
        "all_s": [round(r["secs"], 3) for r in mine],
        "max_vmhwm_mib": max(r["vmhwm_kib"] for r in mine) / 1024,
        "max_peak_anon_mib": max(r["peak_anon_kib"] for r in mine) / 1024,
    }
ref = summary["diffusers"]["median_s"]
print()
print(f"{'side':10} {'median s':>9} {'runs s':>24} {'x diffusers':>12} {'peak RSS MiB':>13} {'peak anon MiB':>14}")
for side, s in summary.items():
    s["over_diffusers"] = s["median_s"] / ref
    runs_s = ", ".join(f"{v:.2f}" for v in s["all_s"])
    print(f"{side:10} {s['median_s']:9.2f} {runs_s:>24} {s['over_diffusers']:12.2f} {s['max_vmhwm_mib']:13.0f} {s['max_peak_anon_mib']:14.0f}")
Path("target/bench_load.json").write_text(json.dumps(summary, indent=2))
print("\nwritten target/bench_load.json")
PY
