#!/usr/bin/env bash
# Peak memory of a whole txt2img run (load, prompt encoding, one step, VAE decode, PNG) of each newer family at
# 512² and 1024², full-size random weights in BF16, through our examples (and, with WITH_DIFFUSERS=1, through
# diffusers' pipeline on the same folder, bf16, beside it). One step because memory does not grow with steps;
# the default guidance of each model (SD 3.5 Medium: CFG, a batch of two; klein 4B distilled and Z-Image Turbo:
# none).
#
#   PYTHON=/root/venv-sd/bin/python tools/family_memory.sh                      # all three, 512 and 1024
#   SD_MEM_FAMILIES=zimage_turbo SD_MEM_SIZES=512 tools/family_memory.sh        # one family, one size
#   WITH_DIFFUSERS=1 tools/family_memory.sh                                     # diffusers beside ours
#   KEEP=1 tools/family_memory.sh                                               # keep the folders
#   SD_MEM_BUILD=0 tools/family_memory.sh                                       # reuse target/family_memory/bin
#
# Families: sd35_medium (with T5-XXL), flux2_klein_4b, zimage_turbo. Each folder (16-21 GB) is written by
# tools/family_memory.py under target/family_memory/<family>, measured, and deleted (unless KEEP=1), so one
# family's weights are on disk at a time. Peak RSS is the kernel's ru_maxrss (it counts the resident pages of the
# memory-mapped weight files too); "anonymous" is the sampled peak of RssAnon, what the process holds itself.
# Results: target/family_memory/<family>_<size>_<side>.json and the table printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FAMILIES=${SD_MEM_FAMILIES:-sd35_medium flux2_klein_4b zimage_turbo}
SIZES=${SD_MEM_SIZES:-512 1024}
OUT=target/family_memory
mkdir -p "$OUT/bin"

flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_bf16|amx_bf16)$' | tr '\n' ' ' || true)
MACHINE="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo); flags: ${flags% }"
echo "machine: $MACHINE" | tee "$OUT/machine.log"

# Built once and copied, so a rebuild in this tree during the run cannot change the binaries measured
# (SD_MEM_BUILD=0 measures the binaries already in target/family_memory/bin).
if [[ "${SD_MEM_BUILD:-1}" != "0" ]]; then
  CARGO_TERM_PROGRESS_WHEN=never cargo build --release --example sd3 --example flux2 --example zimage 2>&1 | tail -n 2
  for e in sd3 flux2 zimage; do cp "target/release/examples/$e" "$OUT/bin/$e"; done
fi

example_of() {
  case "$1" in
    sd35_medium) echo sd3 ;;
    flux2_klein_4b) echo flux2 ;;
    zimage_turbo) echo zimage ;;
    *) echo "unknown family '$1' (families: sd35_medium flux2_klein_4b zimage_turbo)" >&2; exit 2 ;;
  esac
}

for family in $FAMILIES; do
  example=$(example_of "$family")
  folder="$OUT/$family"
  if [[ ! -f "$folder/model_index.json" || ! -f "$folder/.complete" ]]; then
    echo "== $family: writing the full-size folder"
    "$PYTHON" tools/family_memory.py build "$family" "$folder"
    touch "$folder/.complete"
  fi
  for size in $SIZES; do
    echo "== $family ${size}²: ours; load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$PYTHON" tools/family_memory.py run "$OUT/${family}_${size}_ours.json" "$OUT/bin/$example" -m "$folder" \
      --dtype bf16 --steps 1 --width "$size" --height "$size" --seed 1 -p "a lighthouse on a cliff at dawn" \
      -o "$OUT/${family}_${size}.png"
    if [[ "${WITH_DIFFUSERS:-0}" != "0" ]]; then
      echo "== $family ${size}²: diffusers; load $(cut -d' ' -f1-3 /proc/loadavg)"
      "$PYTHON" tools/family_memory.py run "$OUT/${family}_${size}_diffusers.json" "$PYTHON" tools/family_memory.py \
        diffusers "$folder" "$size" "$OUT/${family}_${size}_diffusers.png"
    fi
  done
  if [[ "${KEEP:-0}" == "0" ]]; then rm -rf "$folder"; fi
done

"$PYTHON" - "$OUT" "$MACHINE" $FAMILIES -- $SIZES <<'PY'
import json
import sys
from pathlib import Path

out, machine = Path(sys.argv[1]), sys.argv[2]
rest = sys.argv[3:]
sep = rest.index("--")
families, sizes = rest[:sep], rest[sep + 1:]
gib = lambda kib: f"{kib / 2**20:.1f} GiB"
print(f"\nmachine: {machine}")
print("| family (bf16 weights, 1 step) | size | ours: peak RSS / anonymous | ours wall | diffusers: peak RSS | diffusers wall |")
print("|---|---|---|---|---|---|")
for f in families:
    for s in sizes:
        ours = out / f"{f}_{s}_ours.json"
        if not ours.exists():
            continue
        o = json.loads(ours.read_text())
        row = f"| {f} | {s}² | {gib(o['peak_rss_kib'])} / {gib(o['peak_anon_kib'])} | {o['wall_s']} s"
        if o["exit"] != 0:
            row += f" (exit {o['exit']})"
        d = out / f"{f}_{s}_diffusers.json"
        if d.exists():
            d = json.loads(d.read_text())
            row += f" | {gib(d['peak_rss_kib'])} | {d['wall_s']} s" + (f" (exit {d['exit']})" if d["exit"] else "") + " |"
        else:
            row += " | — | — |"
        print(row)
PY
