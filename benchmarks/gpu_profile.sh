#!/usr/bin/env bash
# Where the optimised GPU step spends its time (issue 4): SD 1.5 architecture, random weights, 512 px, bf16, batch 12.
# 1. full: reference-like vs optimised, each with `--profile 2` (torch.profiler: GPU-busy share of the step, top ops);
# 2. LoRA: the same;  2b./2c. the optimised mode with the fourth session's cast removals switched off (student weight
#    copies, weight-dtype target, LoRA input casts), full and LoRA, profiled as in 1./2. (their gain on a GPU);
# 3./4. the optimised mode with gradient checkpointing (memory), full and LoRA; 3b./4b. the same with the selective
#    policy (conv/matmul/attention outputs kept, the ops between them recomputed); ckpt_unet: the student UNet alone,
#    forward + backward per policy (none, full, selective: `benchmarks/checkpointing.py`);
# 5.-7. `--compile_unet` (static shapes, no recompiles): full and LoRA as three modes in one process (reference-like,
#    optimised eager, compiled; H100: full 305 s, its compile 213 s; LoRA's did not finish in 245 s), then full
#    compiled with CUDA graphs
#    (`compile_mode=reduce-overhead`). The compile time is the "warmup" row, not in the samples/s.
# 8./9. lora_compile_selckpt, full_compile_selckpt: the same three modes with selective checkpointing in the two
#    optimised ones (speed and memory targets checked in one configuration; not yet run on a GPU: the full model's
#    compile without checkpointing took 213 s on an H100).
# 10./11. lora_compile_blocks, full_compile_blocks: 5./6. with regional compilation (`--compile_scope blocks`).
# Runs that would not fit in what is left of BUDGET_S are skipped.
# The split (time per section) is the mean of 3 extra steps: from one step, the H100 compiled run's target read 91.5 ms
# against the teacher's 52.9 ms for twice the rows, which one step cannot tell from a one-off stall.
# Compile cache: inductor's cache lives in WORK/inductor-cache and is packed into OUT/compile-cache.tgz at the end
# (when under 16 MiB, what a device call brings back); a tarball at COMPILE_CACHE_IN (default .whl/compile-cache.tgz,
# carried with the wheels) is unpacked first, so a later machine with the same torch and GPU skips most of the compile
# (CPU, tiny preset: 209 s from an empty cache, 17 s warm). The "warmup" row then is not the cold compile time.
# Usage: benchmarks/gpu_profile.sh OUT_DIR [RUN ...]   (default: all runs, in this order; env: PYTHON, BUDGET_S=540,
#        BENCH_WORKDIR, BENCH_ARGS, COMPILE_CACHE_IN). E.g. only the compile runs: benchmarks/gpu_profile.sh out full_compile lora_compile
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_profile.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
BUDGET=${BUDGET_S:-540}
cd "$(dirname "$0")/.."
WORK=${BENCH_WORKDIR:-/tmp/tcdistill-bench-work}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-cache"
CACHE_IN=${COMPILE_CACHE_IN:-.whl/compile-cache.tgz}
if [ -f "$CACHE_IN" ]; then
  mkdir -p "$WORK" && tar -xzf "$CACHE_IN" -C "$WORK" && echo "compile cache: unpacked $CACHE_IN ($(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1))"
fi
pack_cache() {
  [ -d "$TORCHINDUCTOR_CACHE_DIR" ] || return 0
  tar -czf "$OUT/compile-cache.tgz" -C "$WORK" inductor-cache && echo "compile cache: $OUT/compile-cache.tgz ($(du -h "$OUT/compile-cache.tgz" | cut -f1))"
}
COMMON=(--preset sd15 --mixed_precision bf16 --batch_size 12 --resolution 512 --warmup 2 --steps 5 --split-steps 3
        --workers 6 --workdir "$WORK")
read -r -a EXTRA_ARGS <<< "${BENCH_ARGS:-}"  # appended to every run (later flags win), e.g. a CPU dry run with --preset tiny
COMMON+=("${EXTRA_ARGS[@]}")

RUNS=("${@:2}")
timed() {  # name, cap in seconds, then a command (stdout to OUT/name.txt); fails when the run is not selected or does not fit
  local name=$1 cap=$2; shift 2
  if [ "${#RUNS[@]}" -gt 0 ] && [[ " ${RUNS[*]} " != *" $name "* ]]; then return 1; fi
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 40 ]; then echo "=== $name skipped (${left}s left)"; return 1; fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "=== $name (t=${SECONDS}s, cap ${cap}s)"
  timeout "$cap" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.log"
  echo "--- $name rc=$? (t=${SECONDS}s)"
}
run() {  # name, cap in seconds, then bench flags
  local name=$1 cap=$2; shift 2
  timed "$name" "$cap" "$PY" -m tcdistill.bench "${COMMON[@]}" "$@" --json "$OUT/$name.json" || return 0
  grep -E "^(mode |profile|warmup|samples/s|step time|peak memory|MFU|dispatched|  of which|  other|  teacher|  student|  target|  optimizer|  ema)" "$OUT/$name.txt" || tail -n 5 "$OUT/$name.log"
}

run full 200 --variant full --compare --profile 2
run lora 150 --variant lora --compare --profile 1
CASTS_KEPT=(--opt-set student_weight_copy=false --opt-set target_dtype=fp32 --opt-set lora_skip_input_cast=false)
run full_casts_kept 100 --variant full --profile 2 "${CASTS_KEPT[@]}"
run lora_casts_kept 90 --variant lora --profile 1 "${CASTS_KEPT[@]}"
run full_gradckpt 70 --variant full --set gradient_checkpointing=true
run lora_gradckpt 70 --variant lora --set gradient_checkpointing=true
SELECTIVE=(--set gradient_checkpointing=true --set gradient_checkpointing_policy=selective)
run full_selckpt 70 --variant full "${SELECTIVE[@]}"
run lora_selckpt 70 --variant lora "${SELECTIVE[@]}"
# the student UNet alone per checkpointing policy (activation memory, fwd/bwd time, ops), one process per policy
timed ckpt_unet 150 "$PY" benchmarks/checkpointing.py --resolution 512 --batch 12 --mixed_precision bf16 && { cat "$OUT/ckpt_unet.txt"; tail -n 3 "$OUT/ckpt_unet.log"; }
run full_compile 500 --variant full --compare --compile_unet --warmup 3
run lora_compile 500 --variant lora --compare --compile_unet --warmup 3
# 8./9. both targets in one configuration: reference-like vs optimised and compiled, each with selective checkpointing
#    (the SAC policy is applied at compile time; eager it runs a Python policy per op, slow on a GPU: see docs)
SELECTIVE_OPT=(--opt-set gradient_checkpointing=true --opt-set gradient_checkpointing_policy=selective)
run lora_compile_selckpt 560 --variant lora --compare --compile_unet --warmup 3 "${SELECTIVE_OPT[@]}"
run full_compile_selckpt 560 --variant full --compare --compile_unet --warmup 3 "${SELECTIVE_OPT[@]}"
run full_compile_cudagraphs 400 --variant full --compile_unet --opt-set compile_mode=reduce-overhead --warmup 4
# 10./11. regional compilation (`--compile_scope blocks`: transformer and ResNet blocks compiled, one graph per block
#    shape and call site): a shorter compile than 5./6., for the step speed it keeps
run lora_compile_blocks 500 --variant lora --compare --compile_unet --compile_scope blocks --warmup 3
run full_compile_blocks 500 --variant full --compare --compile_unet --compile_scope blocks --warmup 3
pack_cache
echo "done in ${SECONDS}s"
