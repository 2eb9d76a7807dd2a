#!/usr/bin/env bash
# End to end txt2img on the CPU in F32: our `txt2img` example against diffusers'
# StableDiffusionPipeline on the same random full-size SD 1.5 diffusers folder (fp16 on disk, the one
# tools/bench_load.sh writes, plus a tokenizer), Euler, CFG 7.5, 512², seed 1, 2 threads each side.
# Each round runs one process per side, interleaved; prints each run's wall time (process start to
# PNG written, so Python's imports count as our start-up does) and peak RSS (/usr/bin/time's maximum
# resident set, mapped file pages included), then the medians and ratios. Never run in CI.
#
#   tools/bench_txt2img.sh                   # 2 steps, 2 rounds
#   STEPS=20 ROUNDS=1 tools/bench_txt2img.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-/root/venv-sd/bin/python}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-2}
DIR=target/bench_load/sd15

if [[ ! -f "$DIR/unet/diffusion_pytorch_model.fp16.safetensors" ]]; then
    echo "writing a random SD 1.5 folder to $DIR (once)"
    "$PYTHON" tools/bench_load.py make "$DIR"
fi
# The pipelines need a tokenizer; the fixtures' CLIP tokenizer (a 1000-token vocabulary) tokenises the
# same way on both sides, and the full-size text encoder accepts its ids.
if [[ ! -f "$DIR/tokenizer/vocab.json" ]]; then
    mkdir -p "$DIR/tokenizer"
    cp fixtures/sd15/tokenizer/* "$DIR/tokenizer/"
    "$PYTHON" - "$DIR/model_index.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m.update(tokenizer=["transformers", "CLIPTokenizer"], safety_checker=[None, None], feature_extractor=[None, None],
         requires_safety_checker=False)
json.dump(m, open(sys.argv[1], "w"), indent=2)
PY
fi
CARGO_TERM_PROGRESS_WHEN=never cargo build --release --example txt2img
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"

LOG=target/bench_load/txt2img_runs.txt
: > "$LOG"
for round in $(seq 1 "$ROUNDS"); do
    /usr/bin/time -f "ours wall %e max_rss_kib %M" -a -o "$LOG" \
        target/release/examples/txt2img --model "$DIR" --steps "$STEPS" --seed 1 --prompt "a cat" --guidance 7.5 \
        --sampler Euler --width 512 --height 512 -o target/bench_load/txt2img_ours.png > /dev/null
    /usr/bin/time -f "diffusers wall %e max_rss_kib %M" -a -o "$LOG" \
        "$PYTHON" tools/bench_txt2img.py "$DIR" "$STEPS" target/bench_load/txt2img_diffusers.png > /dev/null
    echo "round $round: $(tail -n2 "$LOG" | tr '\n' ' ')"
done

"$PYTHON" - "$LOG" "$STEPS" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    side, _, wall, _, rss = line.split()
    runs.setdefault(side, []).append((float(wall), int(rss)))
med = {s: (statistics.median(w for w, _ in r), max(m for _, m in r)) for s, r in runs.items()}
for s, (w, m) in med.items():
    print(f"{s:10} median wall {w:7.1f} s   peak RSS {m / 1024:7.0f} MiB")
(wo, mo), (wd, md) = med["ours"], med["diffusers"]
print(f"ours/diffusers ({sys.argv[2]} steps): wall {wo / wd:.2f}, peak RSS {mo / md:.2f}")
PY
