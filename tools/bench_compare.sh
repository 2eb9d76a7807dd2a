#!/usr/bin/env bash
# Runs the Candle benches (ours and stock candle-transformers) and the PyTorch/diffusers baseline
# on the same CPU workloads and prints the ratios. Takes a long time at full size (tens of
# minutes on 2 cores); SD_BENCH_SMALL=1 runs tiny configs to check the harness.
#
#   tools/bench_compare.sh                 # full size
#   SD_BENCH_SMALL=1 tools/bench_compare.sh
#   PYTHON=/path/to/python TORCH_RUNS=5 tools/bench_compare.sh
#
# Results: target/bench_compare.json (medians in ms and ratios), logs in target/bench_*.log.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_RUNS=${TORCH_RUNS:-5}
SMALL_FLAG=""
if [[ "${SD_BENCH_SMALL:-0}" != "0" ]]; then SMALL_FLAG="--small"; fi
mkdir -p target

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
CARGO_TERM_PROGRESS_WHEN=never cargo bench --bench unet --bench vae 2>&1 | tee target/bench_cargo.log
echo "load after cargo bench: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" tools/bench_torch.py --runs "$TORCH_RUNS" --json target/bench_torch.json $SMALL_FLAG 2>&1 | tee target/bench_torch.log
echo "load after torch: $(cut -d' ' -f1-3 /proc/loadavg)"

"$PYTHON" - <<'PY'
import json
from pathlib import Path

def criterion_ms(group, name):
    path = Path("target/criterion") / group / name / "new" / "estimates.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing; did `cargo bench --bench unet --bench vae` run to completion?")
    return json.loads(path.read_text())["median"]["point_estimate"] / 1e6

torch = json.loads(Path("target/bench_torch.json").read_text())
rows = [
    ("UNet step (SD1.5, b2, 64x64)", "unet_sd15_step", "unet_ms"),
    ("VAE decode (SD, 64x64 -> 512^2)", "vae_sd_decode", "vae_ms"),
]
out = {}
print()
print(f"{'workload':34} {'ours ms':>10} {'stock ms':>10} {'torch ms':>10} {'ours/torch':>11} {'stock/torch':>12} {'ours/stock':>11}")
for label, group, key in rows:
    ours, stock, ref = criterion_ms(group, "ours"), criterion_ms(group, "stock"), torch[key]
    out[group] = {"ours_ms": ours, "stock_ms": stock, "torch_ms": ref,
                  "ours_over_torch": ours / ref, "stock_over_torch": stock / ref, "ours_over_stock": ours / stock}
    print(f"{label:34} {ours:10.1f} {stock:10.1f} {ref:10.1f} {ours / ref:11.2f} {stock / ref:12.2f} {ours / stock:11.2f}")
Path("target/bench_compare.json").write_text(json.dumps(out, indent=2))
print("\nwritten target/bench_compare.json")
PY
