#!/usr/bin/env bash
# Runs our criterion benches and the PyTorch/diffusers/transformers baseline on the same CPU workloads,
# the same weights and the same inputs, interleaved (torch, ours, torch), checks that our outputs match
# PyTorch's (relative L2 <= 1e-4; the bench exits non-zero otherwise) and prints the ratios.
# Stages: unet (SD 1.5 UNet step), vae (SD VAE decode), clip (SD 1.5 text encoder), flux_double and
# flux_single (one FLUX.1 block of each kind at full width on 4096 + 512 tokens, ~1.3 TFLOP each).
# Takes a long time at full size (UNet and VAE alone about 15 minutes on 2 cores, plus ~7 GB of weights
# written to target/bench_check; the FLUX stages another ~2 GB and several forwards of ~1.3 TFLOP each
# per phase), so a full run can be split with SD_BENCH_STAGES; SD_BENCH_SMALL=1 runs tiny configs to
# check the harness in a minute.
#
#   tools/bench_compare.sh                 # full size, every stage
#   SD_BENCH_STAGES=unet,vae tools/bench_compare.sh            # some stages (default: all five)
#   SD_BENCH_STAGES=clip,flux_double,flux_single tools/bench_compare.sh
#   SD_BENCH_SMALL=1 tools/bench_compare.sh
#   PYTHON=/path/to/python TORCH_RUNS=5 tools/bench_compare.sh
#   SD_CPU_PATH=scalar tools/bench_compare.sh   # our kernels without SIMD (AVX2 is the default)
#   SD_BENCH_STOCK=1 tools/bench_compare.sh     # also stock candle-transformers (UNet and VAE only)
#   SD_BENCH_OPENVINO=0 tools/bench_compare.sh  # skip OpenVINO (timed when `import openvino` works)
#
# Results: target/bench_compare.json (medians in ms and ratios), logs in target/bench_*.log.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_RUNS=${TORCH_RUNS:-3}
SMALL_FLAG=""
if [[ "${SD_BENCH_SMALL:-0}" != "0" ]]; then SMALL_FLAG="--small"; fi
ALL_STAGES="unet,vae,clip,flux_double,flux_single"
SD_BENCH_STAGES=${SD_BENCH_STAGES:-$ALL_STAGES}
# The stages' torch selection and our bench files (flux_block holds both FLUX stages and reads
# SD_BENCH_STAGES itself to run only the selected ones).
STAGES=()
ONLY_FLAGS=()
BENCH_FLAGS=()
for stage in ${SD_BENCH_STAGES//,/ }; do
  case "$stage" in
    unet|vae|clip|flux_double|flux_single) ;;
    *) echo "SD_BENCH_STAGES: unknown stage '$stage' (stages: $ALL_STAGES)" >&2; exit 2 ;;
  esac
  if [[ " ${STAGES[*]} " == *" $stage "* ]]; then continue; fi
  STAGES+=("$stage")
  ONLY_FLAGS+=(--only "$stage")
  bench=$stage
  if [[ $stage == flux_* ]]; then bench=flux_block; fi
  if [[ " ${BENCH_FLAGS[*]} " != *" $bench "* ]]; then BENCH_FLAGS+=(--bench "$bench"); fi
done
if [[ ${#STAGES[@]} -eq 0 ]]; then echo "SD_BENCH_STAGES selects no stage (stages: $ALL_STAGES)" >&2; exit 2; fi
SD_BENCH_STAGES=$(IFS=,; echo "${STAGES[*]}")
export SD_BENCH_STAGES
CHECK_DIR=target/bench_check
mkdir -p target "$CHECK_DIR"
rm -f "$CHECK_DIR"/*/check.json
FILTER="ours"
if [[ "${SD_BENCH_STOCK:-0}" != "0" ]]; then FILTER=""; fi
# OpenVINO is timed (in the first torch phase, on the same modules) when it is installed.
OV_FLAG=""
if [[ "${SD_BENCH_OPENVINO:-1}" != "0" ]] && "$PYTHON" -c "import openvino" 2>/dev/null; then OV_FLAG="--openvino"; fi

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores; stages: $SD_BENCH_STAGES; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" tools/bench_torch.py --runs "$TORCH_RUNS" --json target/bench_torch.json --check-dir "$CHECK_DIR" "${ONLY_FLAGS[@]}" $OV_FLAG $SMALL_FLAG 2>&1 | tee target/bench_torch.log
echo "load after torch (1): $(cut -d' ' -f1-3 /proc/loadavg)"
CARGO_TERM_PROGRESS_WHEN=never SD_BENCH_CHECK_DIR="$CHECK_DIR" cargo bench "${BENCH_FLAGS[@]}" -- $FILTER 2>&1 | tee target/bench_cargo.log
echo "load after ours: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PYTHON" tools/bench_torch.py --runs "$TORCH_RUNS" --json target/bench_torch2.json "${ONLY_FLAGS[@]}" $SMALL_FLAG 2>&1 | tee -a target/bench_torch.log
echo "load after torch (2): $(cut -d' ' -f1-3 /proc/loadavg)"

"$PYTHON" - "$CHECK_DIR" "$FILTER" "$SD_BENCH_STAGES" "${BENCH_FLAGS[*]}" <<'PY'
import json
import sys
from pathlib import Path

check_dir, only_ours, stages, bench_flags = Path(sys.argv[1]), sys.argv[2] == "ours", sys.argv[3].split(","), sys.argv[4]

def criterion_ms(group, name):
    path = Path("target/criterion") / group / name / "new" / "estimates.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing; did `cargo bench {bench_flags}` run to completion?")
    return json.loads(path.read_text())["median"]["point_estimate"] / 1e6

torch = [json.loads(Path(p).read_text()) for p in ("target/bench_torch.json", "target/bench_torch2.json")]
log = Path("target/bench_cargo.log").read_text()
machine = next((l for l in log.splitlines() if l.startswith("machine:")), "machine: ?")
# (stage, label, criterion group, whether our bench also has a stock candle-transformers row)
rows = [
    ("unet", "UNet step (SD1.5, b2, 64x64)", "unet_sd15_step", True),
    ("vae", "VAE decode (SD, 64x64 -> 512^2)", "vae_sd_decode", True),
    ("clip", "CLIP text encoder (SD1.5, b2x77)", "clip_sd15_b2", False),
    ("flux_double", "FLUX double block (4096+512 tok)", "flux_double_block", False),
    ("flux_single", "FLUX single block (4096+512 tok)", "flux_single_block", False),
]
out = {"machine": machine, "stages": stages}
print()
print(machine)
has_ov = any(k.endswith("_openvino_ms") for k in torch[0])
print(f"{'workload':34} {'ours ms':>10} {'torch ms (1, 2)':>18} {'ours/torch':>11} {'rel L2':>9}"
      + (f" {'openvino ms':>12} {'ours/openvino':>14}" if has_ov else "")
      + ("" if only_ours else f" {'stock ms':>10} {'stock/torch':>12}"))
for name, label, group, has_stock in rows:
    if name not in stages:
        continue
    key = f"{name}_ms"
    ours = criterion_ms(group, "ours")
    refs = [t[key] for t in torch]
    ref = sum(refs) / len(refs)
    check = json.loads((check_dir / name / "check.json").read_text())
    row = {"ours_ms": ours, "torch_ms": refs, "ours_over_torch": ours / ref, "rel_l2": check["rel_l2"]}
    line = f"{label:34} {ours:10.1f} {refs[0]:8.1f}, {refs[1]:7.1f} {ours / ref:11.2f} {check['rel_l2']:9.2e}"
    if has_ov:
        ov = torch[0].get(f"{name}_openvino_ms")
        if ov is None:
            line += f" {'-':>12} {'-':>14}"
        else:
            row.update(openvino_ms=ov, ours_over_openvino=ours / ov, openvino_rel_l2=torch[0][f"{name}_openvino_rel_l2"])
            line += f" {ov:12.1f} {ours / ov:14.2f}"
    if not only_ours:
        if has_stock:
            stock = criterion_ms(group, "stock")
            row.update(stock_ms=stock, stock_over_torch=stock / ref)
            line += f" {stock:10.1f} {stock / ref:12.2f}"
        else:
            line += f" {'-':>10} {'-':>12}"
    out[group] = row
    print(line)
Path("target/bench_compare.json").write_text(json.dumps(out, indent=2))
print("\nratios use the mean of the two torch phases; written target/bench_compare.json")
PY
