#!/usr/bin/env bash
# Regenerates every committed fixture, in dependency order: tiny models and component goldens, scheduler
# goldens, end-to-end pipeline goldens (which load the tiny models), then the LoRA fixtures if present and
# the ControlNet and FLUX fixtures, then the textual-inversion, prompt-schedule and ESRGAN upscaler goldens.
# Usage: tools/make_all_fixtures.sh [python]   (default: tools/.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-tools/.venv/bin/python}
"$PY" tools/make_fixtures.py
"$PY" tools/scheduler_goldens.py
"$PY" tools/real_config_schedules.py
"$PY" tools/scheduler_goldens_a1111.py
"$PY" tools/cfg_pp_goldens.py
"$PY" tools/seed_resize_goldens.py
"$PY" tools/pipeline_goldens.py
if [ -f tools/lora_fixtures.py ]; then "$PY" tools/lora_fixtures.py; fi
"$PY" tools/controlnet_fixtures.py
"$PY" tools/flux_fixtures.py
"$PY" tools/flux_kontext_goldens.py
"$PY" tools/flux_fill_goldens.py
"$PY" tools/zimage_fixtures.py
"$PY" tools/flux2_fixtures.py
"$PY" tools/sd3_fixtures.py
"$PY" tools/sd3_lora_fixtures.py
"$PY" tools/ti_goldens.py
"$PY" tools/a1111_prompt_schedules.py
"$PY" tools/esrgan_goldens.py
du -sh fixtures
