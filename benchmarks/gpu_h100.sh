#!/usr/bin/env bash
# One-H100 benchmark of the TCD training step (issue 4): SD 1.5 architecture with random weights, 512 px, bf16,
# batch 12; reference-like vs optimised for the full model and for LoRA, the same-math memory-lean variant
# (gradient checkpointing) of the optimised mode, and the data-loader check; then one summary table.
# Usage: benchmarks/gpu_h100.sh OUT_DIR    (JSON, printed tables and logs land in OUT_DIR; ~5-7 min on one H100)
# Env: PYTHON (default python), BENCH_ARGS (see below), BENCH_WORKDIR (teacher/shards/cache, ~5 GB; default a temp dir, removed at exit),
#      EXTRAS=0 skips the optional runs, COMPILE=1 adds a torch.compile run (its compile time is not in the numbers).
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_h100.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
WORK=${BENCH_WORKDIR:-$(mktemp -d /tmp/tcdistill-bench-XXXXXX)}
[ -n "${BENCH_WORKDIR:-}" ] || trap 'rm -rf "$WORK"' EXIT  # ~5 GB of random SD 1.5 weights: never under $OUT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
COMMON=(--preset sd15 --mixed_precision bf16 --batch_size 12 --resolution 512 --warmup 3 --steps 8 --split-steps 2
        --workers 6 --workdir "$WORK")
# BENCH_ARGS: extra flags appended to every run (later flags win), e.g. a CPU dry run of this script:
#   BENCH_ARGS="--preset tiny --resolution 32 --batch_size 2 --mixed_precision no --workers 0 --steps 1 --warmup 0 --threads 1"
read -r -a EXTRA_ARGS <<< "${BENCH_ARGS:-}"
COMMON+=("${EXTRA_ARGS[@]}")

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
    || { echo "!!! $name failed; last log lines:"; tail -n 25 "$OUT/$name.log"; }
}

run sd15_full --variant full --compare
run sd15_lora --variant lora --compare
if [ "${EXTRAS:-1}" = 1 ]; then
  # Same math, less activation memory: the optimised mode with gradient checkpointing (compared in the summary
  # with the reference-like runs above, which keep it off).
  if [ "$SECONDS" -lt 330 ]; then run sd15_full_gradckpt --variant full --opt-set gradient_checkpointing=true; fi
  if [ "$SECONDS" -lt 380 ]; then run sd15_lora_gradckpt --variant lora --opt-set gradient_checkpointing=true; fi
  if [ "$SECONDS" -lt 420 ]; then run sd15_full_channels_last --variant full --channels_last; fi
fi
run sd15_data --data-only --data-workers 1,4,8 --data-batches 8
if [ "${COMPILE:-0}" = 1 ]; then run sd15_lora_compile --variant lora --compile_unet --warmup 4; fi

"$PY" - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("sd15_*.json"))}
ref = {r["variant"]: r["modes"]["reference-like"] for res in runs.values() for r in res.get("runs", []) if "reference-like" in r["modes"]}
print("| run | variant | mode | samples/s | peak GiB | MFU | x ref samples/s | x ref peak memory |")
print("|---|---|---|---|---|---|---|---|")
for name, res in runs.items():
    for r in res.get("runs", []):
        for mode, m in r["modes"].items():
            b = ref.get(r["variant"])
            mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
            rs = f"{m['samples_per_s'] / b['samples_per_s']:.2f}" if b else "-"
            rm = f"{m['peak_memory_bytes'] / b['peak_memory_bytes']:.2f}" if b else "-"
            print(f"| {name} | {r['variant']} | {mode} | {m['samples_per_s']:.2f} | {m['peak_memory_bytes'] / 2**30:.1f} | {mfu} | {rs} | {rm} |")
    for d in res.get("data", []):
        print(f"| {name} | data loader | {d['workers']} workers | {d['samples_per_s']:.1f} | | | {d['samples_per_s_per_worker']:.1f}/worker | |")
PY
echo "done in ${SECONDS}s; results in $OUT"
