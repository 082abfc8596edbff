#!/usr/bin/env bash
# One-H100 benchmark of the TCD training step (issue 4): SD 1.5 architecture with random weights, 512 px, bf16,
# batch 12; reference-like vs optimised for the full model and for LoRA, then the data-loader check.
# Usage: benchmarks/gpu_h100.sh OUT_DIR    (JSON + printed tables land in OUT_DIR; ~5-7 min on one H100)
# Env: PYTHON (default python), BENCH_WORKDIR (teacher/shards/cache, ~5 GB; default a temp dir, removed at exit),
#      EXTRAS=0 to skip the optional runs at the end, COMPILE=1 to add a torch.compile run (slow to compile).
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_h100.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
WORK=${BENCH_WORKDIR:-$(mktemp -d /tmp/tcdistill-bench-XXXXXX)}
[ -n "${BENCH_WORKDIR:-}" ] || trap 'rm -rf "$WORK"' EXIT  # ~5 GB of random SD 1.5 weights: never under $OUT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
COMMON=(--preset sd15 --mixed_precision bf16 --batch_size 12 --resolution 512 --warmup 3 --steps 8 --split-steps 2
        --workers 6 --workdir "$WORK")

"$PY" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, diffusers, transformers, accelerate, peft, webdataset
print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__, "| transformers",
      transformers.__version__, "| accelerate", accelerate.__version__, "| peft", peft.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PY

run() {  # name, then bench flags; each run is capped so one hang cannot eat the whole device budget
  local name=$1; shift
  echo "=== $name (t=${SECONDS}s)"
  timeout 330 "$PY" -m tcdistill.bench "${COMMON[@]}" "$@" --json "$OUT/$name.json" 2>"$OUT/$name.log" | tee "$OUT/$name.txt" \
    || { echo "!!! $name failed (exit ${PIPESTATUS[0]}); last log lines:"; tail -n 25 "$OUT/$name.log"; }
}

run sd15_full --variant full --compare
run sd15_lora --variant lora --compare
run sd15_data --data-only --data-workers 1,4,8 --data-batches 8
if [ "${EXTRAS:-1}" = 1 ] && [ "$SECONDS" -lt 300 ]; then
  # Optional: same-math memory/speed knobs on the optimised mode only (no reference-like rerun).
  run sd15_full_channels_last --variant full --channels_last
  if [ "$SECONDS" -lt 390 ]; then run sd15_full_gradckpt --variant full --opt-set gradient_checkpointing=true; fi
fi
if [ "${COMPILE:-0}" = 1 ]; then
  run sd15_lora_compile --variant lora --compile_unet --warmup 4
fi
echo "done in ${SECONDS}s; results in $OUT"
