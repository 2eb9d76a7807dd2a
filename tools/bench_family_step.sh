#!/usr/bin/env bash
# One full-size transformer step per newer model family on the CPU, ours against diffusers on the same random
# weights, inputs and cores (a measurement, not a target): SD 3.5 Medium's MMDiT-X in F32 and Z-Image Turbo's
# DiT with BF16 weights (its 24 GB of F32 weights do not fit a 23 GiB machine) and FLUX.2 [klein] 4B's
# Flux2Transformer2DModel in F32 (15.5 GB: one copy per process fits, and the two sides never run at once; 1024
# image tokens + 512 Qwen3 text tokens, the klein pipeline's padded prompt length), each one call for a 512² image
# without CFG. Per stage, interleaved: PyTorch (tools/bench_family_step.py, saving the diffusers folder, inputs
# and PyTorch's output under target/bench_family/check/<stage>), ours (benches/family_step.rs: loads that folder
# through our loader and checks its output against PyTorch's before timing; exits non-zero on a mismatch), then
# PyTorch again; then a table of both sides' medians, the ratio, the check and peak memory.
#
#   tools/bench_family_step.sh                                   # all stages, full size (tens of minutes)
#   SD_BENCH_STAGES=sd3_medium tools/bench_family_step.sh        # one stage (sd3_medium, zimage_turbo, flux2_klein)
#   SD_BENCH_STAGES=flux2_klein tools/bench_family_step.sh       # FLUX.2 [klein] 4B only (about 15-16 GiB per side)
#   SD_BENCH_SMALL=1 tools/bench_family_step.sh                  # tiny configs: checks the harness in a minute
#   PYTHON=/root/venv-sd/bin/python RUNS=3 tools/bench_family_step.sh
#   KEEP_CHECK=1 tools/bench_family_step.sh                      # keep the check folders (10 + 12 + 15.5 GB at full size)
#
# Each stage's check folder is deleted once both sides have run (unless KEEP_CHECK=1), so at most one stage's
# weights (≤ 15.5 GB) are on disk at a time. RUNS (default 3) timed runs per side and phase, after one untimed
# forward. Results: target/bench_family/results.json, logs target/bench_family/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-3}
SMALL_FLAG=""
if [[ "${SD_BENCH_SMALL:-0}" != "0" ]]; then SMALL_FLAG="--small"; fi
ALL_STAGES="sd3_medium,zimage_turbo,flux2_klein"
STAGES=()
for stage in ${SD_BENCH_STAGES:-${ALL_STAGES//,/ }}; do
  for s in ${stage//,/ }; do
    case "$s" in
      sd3_medium|zimage_turbo|flux2_klein) ;;
      *) echo "SD_BENCH_STAGES: unknown stage '$s' (stages: $ALL_STAGES)" >&2; exit 2 ;;
    esac
    if [[ " ${STAGES[*]-} " != *" $s "* ]]; then STAGES+=("$s"); fi
  done
done
if [[ ${#STAGES[@]} -eq 0 ]]; then echo "SD_BENCH_STAGES selects no stage (stages: $ALL_STAGES)" >&2; exit 2; fi

OUT=target/bench_family
CHECK_DIR=$OUT/check
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log
cleanup() {
  if [[ "${KEEP_CHECK:-0}" == "0" ]]; then rm -rf "$CHECK_DIR"; fi
}
trap cleanup EXIT

load() { cut -d' ' -f1-3 /proc/loadavg; }
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512_bf16|avx512_fp16|amx_bf16|amx_tile)$' | tr '\n' ' ' || true)
MACHINE="machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); flags: ${flags% }"
echo "$MACHINE; stages: ${STAGES[*]}; load before: $(load)" | tee "$OUT/machine.log"

# Build first, so compiling never overlaps a timed phase.
CARGO_TERM_PROGRESS_WHEN=never cargo bench --bench family_step --no-run 2>&1 | tail -n 3

for stage in "${STAGES[@]}"; do
  echo "== $stage: torch (1), saving the check folder; load $(load)" | tee -a "$OUT/machine.log"
  "$PYTHON" tools/bench_family_step.py --only "$stage" --runs "$RUNS" --json "$OUT/torch1_$stage.json" \
    --check-dir "$CHECK_DIR" $SMALL_FLAG 2>&1 | tee -a "$OUT/torch.log"
  echo "== $stage: ours; load $(load)" | tee -a "$OUT/machine.log"
  CARGO_TERM_PROGRESS_WHEN=never SD_BENCH_STAGES="$stage" SD_BENCH_RUNS="$RUNS" SD_BENCH_CHECK_DIR="$CHECK_DIR" \
    SD_BENCH_RESULT_DIR="$OUT" cargo bench --bench family_step 2>&1 | tee -a "$OUT/ours.log"
  echo "== $stage: torch (2); load $(load)" | tee -a "$OUT/machine.log"
  "$PYTHON" tools/bench_family_step.py --only "$stage" --runs "$RUNS" --json "$OUT/torch2_$stage.json" \
    $SMALL_FLAG 2>&1 | tee -a "$OUT/torch.log"
  cp "$CHECK_DIR/$stage/reference.json" "$OUT/reference_$stage.json"
  if [[ "${KEEP_CHECK:-0}" == "0" ]]; then rm -rf "${CHECK_DIR:?}/$stage"; fi
done
echo "load after: $(load)" | tee -a "$OUT/machine.log"

"$PYTHON" - "$OUT" "$MACHINE" "${SD_BENCH_SMALL:-0}" "${STAGES[@]}" <<'PY'
import json
import re
import sys
from pathlib import Path

out, machine, small, stages = Path(sys.argv[1]), sys.argv[2], sys.argv[3] != "0", sys.argv[4:]
log = (out / "ours.log").read_text()
ours_machine = next((l for l in log.splitlines() if l.startswith("machine:")), "machine: ?")
first, *phases = (out / "machine.log").read_text().splitlines()
# "== <stage>: <phase>...; load a b c" -> "<stage> <phase>: a b c"
loads = ["before: " + first.rsplit("load before: ", 1)[-1]] + [
    re.sub(r"^== (\S+): (.*?)(, saving the check folder)?; load (.*)$", r"\1 \2: \4", l) for l in phases]
labels = {"sd3_medium": "SD3.5 Medium MMDiT, F32, 512²", "zimage_turbo": "Z-Image Turbo DiT, BF16, 512²",
          "flux2_klein": "FLUX.2 [klein] 4B, F32, 512²"}
gib = lambda kib: kib / 1048576
rows = {}
print()
print(machine)
print("ours: " + ours_machine.removeprefix("machine: "))
print("load average (1, 5, 15 min) at each phase: " + " | ".join(loads))
print(f"{'stage':40} {'ours ms':>10} {'torch ms (1, 2)':>20} {'ours/torch':>10} {'rel L2 (limit)':>20} "
      f"{'ours peak GiB (RSS/anon)':>25} {'torch peak GiB':>15}")
for stage in stages:
    ours = json.loads((out / f"ours_{stage}.json").read_text())
    torch = [json.loads((out / f"torch{i}_{stage}.json").read_text()) for i in (1, 2)]
    ref = json.loads((out / f"reference_{stage}.json").read_text())
    t = [x[f"{stage}_ms"] for x in torch]
    mean = sum(t) / len(t)
    trss = max(x[f"{stage}_peak_rss_kib"] for x in torch)
    rows[stage] = {"ours_ms": ours["median_ms"], "ours_samples_ms": ours["samples_ms"], "torch_ms": t,
                   "ours_over_torch": ours["median_ms"] / mean, "rel_l2": ours["rel_l2"],
                   "rel_l2_limit": ref["rel_l2_limit"], "torch_bf16_vs_f32_rel_l2": ref.get("torch_bf16_vs_f32_rel_l2"),
                   "ours_vmhwm_kib": ours["vmhwm_kib"], "ours_peak_anon_kib": ours["peak_anon_kib"],
                   "torch_peak_rss_kib": [x[f"{stage}_peak_rss_kib"] for x in torch], "ours_load_s": ours["load_s"]}
    check = f"{ours['rel_l2']:.2e} ({ref['rel_l2_limit']:.1e})"
    print(f"{labels[stage] + (' (small)' if small else ''):40} {ours['median_ms']:10.1f} {t[0]:9.1f}, {t[1]:8.1f} "
          f"{ours['median_ms'] / mean:10.2f} {check:>20} "
          f"{gib(ours['vmhwm_kib']):12.2f} / {gib(ours['peak_anon_kib']):9.2f} {gib(trss):15.2f}")
(out / "results.json").write_text(json.dumps({"machine": machine, "ours_machine": ours_machine, "small": small,
                                               "loads": loads, "stages": rows}, indent=2))
print(f"\nratio: ours / mean of the two torch phases; ours peak: VmHWM (mapped weight pages included) / "
      f"peak anonymous RSS; torch peak: ru_maxrss of its process (the larger phase); written {out}/results.json")
PY
