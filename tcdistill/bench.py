"""`tcdistill bench`: throughput, time split, peak memory and MFU of real training steps, optimised vs reference-like.

Each mode builds `TrainConfig(...)` + `Trainer(cfg)` (the code path of the training scripts) over a teacher written
to a work folder (the tiny offline pipeline, or the SD 1.5 architecture with random weights), then runs
`Trainer.optimizer_step`: one step under FlopCounterMode (counted FLOPs), warmup steps, timed steps (timer off)
and a few steps with the section timer on (the time split; it synchronises CUDA per section).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .bench_assets import Assets, prepare_assets
from .argparsing import DefaultsHelpFormatter, OneLineParser
from .config import ConfigError, TrainConfig, field_type, one_line, resolution_refusal
from .timing import OpCounter, peak_memory, reset_peak_memory, trim_heap

# Peak dense bf16 tensor TFLOP/s by GPU name (first match wins; more specific names first).
PEAK_BF16_DENSE_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(resolution=32, batch_size=4, warmup=1, steps=5, workers=0),
    "sd15": dict(resolution=512, batch_size=12, warmup=3, steps=10, workers=6),
}
# Reference-like: the reference scripts' choices (fp32 teacher under autocast, two teacher passes, a target forward
# for every sample, a second frozen UNet for LoRA) and pixels re-encoded every step; compile/channels_last off.
REFERENCE_LIKE: dict[str, Any] = dict(batched_teacher=False, skip_identity_target=False, teacher_dtype="fp32", lora_separate_teacher=True,
                                      target_dtype="fp32", lora_skip_input_cast=False, student_weight_copy=False, lora_merged_target=False, lora_merged_student=False, fused_adam=False, compile_unet=False, channels_last=False)
SECTIONS = ("data", "vae", "text_encoder", "teacher", "student_forward", "target", "student_backward", "optimizer", "ema")
# "compiled" is the optimised mode with `--compile_unet` (static shapes); `--compare --compile_unet` times all three.
MODES = ("reference-like", "optimised", "compiled")


def device_peak_tflops(name: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak bf16 dense TFLOP/s, where it came from) for a GPU name; None when unknown."""
    if override:
        return override, "--peak_tflops"
    for key, tflops in PEAK_BF16_DENSE_TFLOPS:
        if key.lower() in name.lower():
            return tflops, f"table entry {key!r} (bf16 dense)"
    return None, f"no table entry for {name!r} (pass --peak_tflops)"


# TrainConfig fields the bench sets from its own flags (--set variant=lora ran LoRA under a "variant full" header)
_BENCH_FLAGS = dict(train_batch_size="--batch_size", resolution="--resolution", mixed_precision="--mixed_precision",
                    dataloader_num_workers="--workers", seed="--seed", compile_unet="--compile_unet", compile_scope="--compile_scope",
                    channels_last="--channels_last", variant="--variant", pretrained_teacher_model="--preset",
                    train_shards_path_or_url="--preset", train_latents_path_or_url="--no-cache")
# The pixel sizes each preset's teacher takes: tiny, a VAE factor of 2 over a two-level UNet; sd15, SD's VAE factor 8.
RESOLUTION_MULTIPLE = {"tiny": 4, "sd15": 8}


def _overrides(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> TrainConfig field values, typed by the field."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"tcdistill bench: --set/--opt-set expects FIELD=VALUE with a TrainConfig field, got {item!r}")
        if key in _BENCH_FLAGS:  # the header, the presets and the assets (shards, cache) read the bench's own flag
            raise SystemExit(f"tcdistill bench: --set/--opt-set {key}: use {_BENCH_FLAGS[key]}")
        try:
            out[key] = None if raw == "None" else field_type(fields[key])(raw)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise SystemExit(f"tcdistill bench: --set/--opt-set {item!r}: {e}") from None
    return out


def mode_config(args: argparse.Namespace, assets: Assets, variant: str, mode: str, out_dir: str) -> TrainConfig:
    """The TrainConfig of one benchmark mode."""
    ref = mode == "reference-like"
    kw: dict[str, Any] = dict(
        pretrained_teacher_model=assets.teacher, output_dir=out_dir, variant=variant, train_shards_path_or_url=assets.shards,
        train_latents_path_or_url=None if ref or not assets.cached else assets.cached, resolution=args.resolution,
        train_batch_size=args.batch_size, max_train_steps=1_000_000, report_to="none", seed=args.seed,
        mixed_precision=args.mixed_precision, dataloader_num_workers=args.workers, validation_steps=0, lr_warmup_steps=0,
        # The seed README's LR, and no early stop: random-weight teachers may give non-finite steps (counted, not fatal).
        learning_rate=4e-6, max_nonfinite_steps=1_000_000,
        compile_unet=mode == "compiled", compile_scope=args.compile_scope if mode == "compiled" else "unet", channels_last=args.channels_last,
    )
    kw.update(args.set_fields)
    kw.update(REFERENCE_LIKE if ref else args.opt_set_fields)
    return TrainConfig(**kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_flops(trainer: Any, data: Any) -> tuple[int, int]:
    """FLOPs (matmul/conv/attention, forward+backward) of one optimizer step, run eagerly; returns (flops, samples)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models import eager_unets

    with eager_unets(trainer.cfg), FlopCounterMode(display=False) as counter:
        _, n, _ = trainer.optimizer_step(data)
    return int(counter.get_total_flops()), n


def _count_ops(trainer: Any, data: Any) -> OpCounter:
    """The ops one optimizer step dispatches, run eagerly. Not the first step: that one also creates the optimizer
    state (a few ops per parameter, once), and FlopCounterMode decomposes ops it has no formula for."""
    from .models import eager_unets

    with eager_unets(trainer.cfg), OpCounter() as ops:
        trainer.optimizer_step(data)
    return ops


def _release(device: torch.device) -> None:
    """Free what a finished mode left (the next mode's peak must not include it)."""
    from accelerate.state import AcceleratorState

    gc.collect()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    AcceleratorState._reset_state(True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim_heap()  # the next mode's RSS peak is its own


def _timed_step(trainer: Any, data: Any, acc: dict[str, Any]) -> None:
    """One optimizer step; its wall and CPU seconds, samples and loss are added to `acc`."""
    _sync(trainer.device)
    t0, c0 = time.perf_counter(), time.process_time()
    loss, n, ok = trainer.optimizer_step(data)
    _sync(trainer.device)
    acc["walls"].append(time.perf_counter() - t0)
    acc["wall_s"] += acc["walls"][-1]
    # CPU seconds of this process: on a shared CPU box, less sensitive to other jobs' load than wall time.
    acc["cpu_s"] += time.process_time() - c0
    acc["samples"] += n
    acc["losses"].append(loss)
    acc["nonfinite_steps"] += int(not ok)


def _profile(args: argparse.Namespace, trainer: Any, data: Any, label: str) -> dict[str, Any]:
    """`--profile N`: N more steps under torch.profiler; prints the host-vs-device summary and the top ops."""
    from .timing import profile_steps

    p = profile_steps(lambda: trainer.optimizer_step(data), args.profile)
    busy = "" if p["device_busy_ms"] is None else f", GPU kernels {p['device_busy_ms']:.1f} ms ({100 * p['device_busy_ms'] / p['wall_ms']:.0f} % busy)"
    print(f"profile {label}: {p['wall_ms']:.1f} ms/step wall, host ops {p['host_ms']:.1f} ms{busy}", flush=True)
    for key in ("top_self_device", "top_self_cpu"):
        if key in p:
            print(p[key], flush=True)
    return p


def _throughput(res: dict[str, Any], acc: dict[str, Any]) -> None:
    """Fill the throughput fields of a mode's result from its accumulated timed steps."""
    steps = max(len(acc["losses"]), 1)
    step_s = acc["wall_s"] / steps
    res.update(samples=acc["samples"], losses=acc["losses"], nonfinite_steps=acc["nonfinite_steps"],
               samples_per_s=acc["samples"] / max(acc["wall_s"], 1e-12), step_time_ms=1000.0 * step_s,
               # The median resists the odd slow step (a shared machine's hiccup, a late recompile) that moves the mean.
               step_time_median_ms=1000.0 * statistics.median(acc["walls"] or [0.0]),
               step_walls_ms=[1000.0 * w for w in acc["walls"]],
               cpu_time_ms=1000.0 * acc["cpu_s"] / steps, achieved_tflops=res["flops_per_step"] / step_s / 1e12,
               split_other_ms=max(0.0, 1000.0 * step_s - sum(res["split_ms"].values())) if res["split_ms"] else None)


def _new_acc() -> dict[str, Any]:
    return dict(wall_s=0.0, cpu_s=0.0, samples=0, losses=[], nonfinite_steps=0, walls=[])


def _build(args: argparse.Namespace, assets: Assets, variant: str, mode: str, work: Path) -> tuple[Any, Any, TrainConfig, float]:
    from .trainer import Trainer

    cfg = mode_config(args, assets, variant, mode, str(work / f"out-{variant}-{mode}"))
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    return trainer, iter(trainer.data_loader()), cfg, time.perf_counter() - t0


def run_mode(args: argparse.Namespace, assets: Assets, variant: str, mode: str, work: Path, timed: bool = True) -> dict[str, Any]:
    """Build a Trainer for `mode` alone and measure it (FLOPs, peak memory, split; throughput if `timed`)."""
    from .models import eager_unets

    trainer, data, cfg, build_s = _build(args, assets, variant, mode, work)
    device = trainer.device
    with eager_unets(cfg):  # the first step: the optimizer's state is created and the LoRA student makes its merge choice
        trainer.optimizer_step(data)
    flops, flop_samples = _count_flops(trainer, data)
    ops = _count_ops(trainer, data)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # with --compile_unet, the compilations happen here
        trainer.optimizer_step(data)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    acc = _new_acc()
    for _ in range(args.steps if timed else 0):
        _timed_step(trainer, data, acc)
    peak, peak_kind = peak_memory(device)
    trainer.timer.reset()
    trainer.timer.enabled = True
    for _ in range(args.split_steps):
        trainer.optimizer_step(data)
    trainer.timer.enabled = False
    prof = _profile(args, trainer, data, f"{variant}/{mode}") if args.profile else None
    res: dict[str, Any] = dict(
        mode=mode, variant=variant, build_s=build_s, warmup_s=warmup_s, steps=args.steps, warmup=args.warmup,
        split_ms={k: 1000.0 * v / max(args.split_steps, 1) for k, v in trainer.timer.totals.items()},
        peak_memory_bytes=peak, peak_memory_kind=peak_kind, flops_per_step=flops, flops_per_sample=flops / max(flop_samples, 1),
        ops_per_step=ops.count, casts_per_step=ops.by_op["_to_copy"], ops_top=dict(ops.by_op.most_common(15)),
        data_source="cached latents" if cfg.train_latents_path_or_url else "pixels (VAE + text encoder every step)",
        config={k: getattr(cfg, k) for k in (*REFERENCE_LIKE, "mixed_precision", "train_batch_size", "resolution",
                                             "gradient_checkpointing", "gradient_checkpointing_policy", "dataloader_num_workers")},
    )
    if prof:
        res["profile"] = prof
    if timed:
        _throughput(res, acc)
    if device.type == "cuda":
        res["peak_memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    del data, trainer
    _release(device)
    return res


def interleaved_throughput(args: argparse.Namespace, assets: Assets, variant: str, results: dict[str, dict[str, Any]], work: Path) -> None:
    """Fresh trainers for every mode, timed one step each in turn (A B A B ...), so a shared machine's changing
    load hits all modes alike; fills the throughput fields of `results`. All trainers are alive at once."""
    built = {m: _build(args, assets, variant, m, work)[:2] for m in results}
    for trainer, data in built.values():
        for _ in range(max(args.warmup, 1)):
            trainer.optimizer_step(data)
    accs = {m: _new_acc() for m in results}
    for _ in range(args.steps):
        for m, (trainer, data) in built.items():
            _timed_step(trainer, data, accs[m])
    for m, res in results.items():
        _throughput(res, accs[m])
        res["timing"] = "interleaved"
    device = next(iter(built.values()))[0].device
    del built
    _release(device)


def data_throughput(args: argparse.Namespace, assets: Assets) -> list[dict[str, Any]]:
    """Decoded + cropped/resized samples/s of the pixel loader for each worker count (`--data-only`)."""
    from .data import DataConfig, build_train_dataloader

    out = []
    for w in args.data_workers:
        loader = build_train_dataloader(DataConfig(train_shards_path_or_url=assets.shards, resolution=args.resolution,
                                                   train_batch_size=args.batch_size, dataloader_num_workers=w, seed=args.seed))
        it = iter(loader)
        # Worker start-up is not throughput: workers start one after another (a batch from each first) and meanwhile fill
        # their prefetch queues; after one batch, the others' start-up was timed (2 tiny workers: a third of their rate).
        for _ in range(max(w, 1) * (1 + (loader.prefetch_factor or 0))):
            next(it)
        t0 = time.perf_counter()
        n = sum(len(next(it)["captions"]) for _ in range(args.data_batches))
        sps = n / (time.perf_counter() - t0)
        out.append(dict(workers=w, samples_per_s=sps, samples_per_s_per_worker=sps / max(w, 1), resolution=args.resolution))
        del it, loader
    return out


def _fmt_bytes(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def format_run(run: dict[str, Any], header: str) -> str:
    """One variant's side-by-side table (modes as columns, plus each mode's ratio to the reference-like)."""
    modes = [run["modes"][m] for m in MODES if m in run["modes"]]
    names = [m["mode"] for m in modes]
    ratios = run.get("ratios", {})
    cols = names + [f"{m}/ref" for m in ratios]
    lines = [header, f"{'':<28}" + "".join(f"{c:>18}" for c in cols)]

    def row(label: str, vals: list[str], key: str = "") -> None:
        r = [f"{x[key]:.2f}x" if key else "" for x in ratios.values()]
        lines.append(f"{label:<28}" + "".join(f"{v:>18}" for v in vals + r))

    row("warmup (s, incl. compile)", [f"{m['warmup_s']:.1f}" for m in modes])
    row("samples/s", [f"{m['samples_per_s']:.3f}" for m in modes], "samples_per_s")
    row("step time (ms)", [f"{m['step_time_ms']:.1f}" for m in modes], "step_time")
    row("step time, median (ms)", [f"{m['step_time_median_ms']:.1f}" for m in modes], "step_time_median")
    if all("step_time_paired" in r for r in ratios.values()) and ratios:
        row("step time, paired (median)", ["" for _ in modes], "step_time_paired")
    row("step CPU time (ms)", [f"{m['cpu_time_ms']:.1f}" for m in modes], "cpu_time")
    row(f"peak memory ({modes[0]['peak_memory_kind']})", [_fmt_bytes(m["peak_memory_bytes"]) for m in modes], "peak_memory")
    row("GFLOP/sample (counted)", [f"{m['flops_per_sample'] / 1e9:.2f}" for m in modes])
    # Eager count of one step (compiled mode included): on a GPU, ~ kernel launches, i.e. the host's work per step.
    row("dispatched ops/step", [str(m["ops_per_step"]) for m in modes], "ops")
    row("  of which dtype casts", [str(m["casts_per_step"]) for m in modes])
    row("achieved TFLOP/s", [f"{m['achieved_tflops']:.3f}" for m in modes])
    row("MFU", [("n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%") for m in modes])
    row("data", [m["data_source"].split(" (")[0] for m in modes])
    row("mean loss (own batches)", [f"{sum(m['losses']) / max(len(m['losses']), 1):.4g}" for m in modes])
    lines.append("time split, ms/step (section timer on):")
    for s in [*SECTIONS, *sorted({k for m in modes for k in m["split_ms"]} - set(SECTIONS))]:
        if any(s in m["split_ms"] for m in modes):
            row(f"  {s}", [f"{m['split_ms'].get(s, 0.0):.1f}" for m in modes])
    row("  other (untimed)", [f"{m['split_other_ms'] or 0.0:.1f}" for m in modes])
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tcdistill bench", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="tiny: the offline tiny pipeline (CPU); sd15: SD 1.5 architecture, random weights.")
    p.add_argument("--variant", default="full", help="full, lora, or a comma list (full,lora).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compare", action="store_true", help="Run reference-like and optimised (and compiled, with --compile_unet) in this process; print them and their ratios.")
    g.add_argument("--reference-like", dest="reference_like", action="store_true", help="Run only the reference-like mode.")
    g.add_argument("--data-only", dest="data_only", action="store_true", help="Only measure the pixel loader (samples/s per worker).")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="Every mode's --mixed_precision (fp16 needs a GPU).")
    p.add_argument("--batch_size", type=int, default=None, help="Per-device batch (preset default: tiny 4, sd15 12).")
    p.add_argument("--resolution", type=int, default=None, help="Pixels (preset default: tiny 32, sd15 512).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed steps after the FLOP-counting step (preset default: tiny 1, sd15 3).")
    p.add_argument("--steps", type=int, default=None, help="Timed steps (preset default: tiny 5, sd15 10).")
    p.add_argument("--split-steps", dest="split_steps", type=int, default=2, help="Steps timed per section (after the timed steps).")
    p.add_argument("--workers", type=int, default=None, help="Data-loader workers (preset default: tiny 0, sd15 6).")
    p.add_argument("--no-cache", dest="no_cache", action="store_true", help="Optimised mode reads pixels too (no `tcdistill cache`).")
    p.add_argument("--compile_unet", action="store_true", help="Add the 'compiled' mode (optimised + torch.compile'd UNets); alone, run only it.")
    p.add_argument("--compile_scope", choices=["unet", "blocks"], default="unet", help="The compiled mode's --compile_scope (whole UNets, or their transformer and ResNet blocks).")
    p.add_argument("--channels_last", action="store_true", help="Optimised mode: channels_last UNets.")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="TrainConfig override for every mode (repeatable).")
    p.add_argument("--opt-set", dest="opt_set", action="append", default=[], metavar="FIELD=VALUE", help="TrainConfig override for the optimised mode only.")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="Profile N more steps per mode (torch.profiler): GPU-busy share, top ops.")
    p.add_argument("--peak_tflops", type=float, default=None, help="Device peak for MFU (default: from the GPU-name table).")
    p.add_argument("--data-workers", dest="data_workers", default="0,1,2", help="Worker counts for --data-only.")
    p.add_argument("--data-batches", dest="data_batches", type=int, default=10, help="Batches timed per worker count for --data-only.")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="Time the modes' steps alternately, with all modes' trainers alive at once (default: on for --compare on CPU, "
                        "where other jobs' load drifts; off on GPU, where two SD 1.5 trainers need not fit).")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU: 1 avoids thread contention on a busy machine).")
    p.add_argument("--seed", type=int, default=0, help="Training --seed of every mode.")
    p.add_argument("--workdir", default=None, help="Keep teacher, shards and cache here and reuse them (default: a temp dir, removed).")
    p.add_argument("--json", default=None, help="Write the results here.")
    return p


def check_bench_args(args: argparse.Namespace) -> None:
    """Refuse, in one line and before any asset is built, a value that would crash later or be silently ignored."""
    for name, low in (("steps", 1), ("batch_size", 1), ("resolution", 1), ("warmup", 0), ("split_steps", 0), ("data_batches", 1), ("profile", 0), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:  # --threads -1 was torch's traceback
            raise SystemExit(f"tcdistill bench: --{name.replace('_', '-') if name in ('split_steps', 'data_batches') else name} must be >= {low}, got {getattr(args, name)}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:  # 0 fell back to the table; a negative one gave a negative MFU
        raise SystemExit(f"tcdistill bench: --peak_tflops must be > 0, got {args.peak_tflops}")
    if refusal := resolution_refusal(args.resolution):  # the synthetic shards at 100000 px were a MemoryError traceback
        raise SystemExit(f"tcdistill bench: {refusal}")
    if not args.data_only and args.resolution % (m := RESOLUTION_MULTIPLE[args.preset]):  # the tiny teacher's build: a traceback
        raise SystemExit(f"tcdistill bench: --resolution {args.resolution}: the {args.preset} preset needs a multiple of {m}")
    ignored = [f for f, on in (("--compile_unet", args.compile_unet), ("--channels_last", args.channels_last), ("--opt-set", args.opt_set)) if on]
    if args.reference_like and ignored:
        raise SystemExit(f"tcdistill bench: {', '.join(ignored)} only change the optimised mode, which --reference-like does not run")
    args.set_fields, args.opt_set_fields = _overrides(args.set), _overrides(args.opt_set)
    if args.json and Path(args.json).is_dir():
        raise SystemExit(f"tcdistill bench: --json {args.json} is a directory (give the file to write)")
    try:  # its folder now, not after the runs: a file in the way ended a finished benchmark in a traceback, results lost
        Path(args.json or ".").parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"tcdistill bench: --json {args.json}: cannot make its folder ({one_line(e)})") from None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the tables, optionally write JSON; returns the results."""
    args = build_parser().parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_bench_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = args.data_workers
    try:
        args.data_workers = [int(x) for x in str(raw).split(",") if x.strip()]
    except ValueError:
        args.data_workers = []
    if args.data_only and (not args.data_workers or min(args.data_workers) < 0):
        raise SystemExit(f"tcdistill bench: --data-workers needs a comma list of worker counts >= 0, got {raw!r}")
    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    if not variants or any(v not in ("full", "lora") for v in variants):
        raise SystemExit(f"tcdistill bench: --variant must be full, lora or a comma list of them, got {args.variant!r}")
    opt = ["optimised", "compiled"] if args.compile_unet and args.compare else ["compiled"] if args.compile_unet else ["optimised"]
    modes = ["reference-like", *opt] if args.compare else ["reference-like"] if args.reference_like else opt
    owned = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="tcdistill-bench-") if owned else args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        assets = prepare_assets(args.preset, work, args.resolution, clip_skip={**args.set_fields, **args.opt_set_fields}.get("clip_skip"),
                                need_teacher=not args.data_only, need_cache=modes != ["reference-like"] and not args.no_cache and not args.data_only)
        cuda = torch.cuda.is_available()
        name = torch.cuda.get_device_name() if cuda else "cpu"
        peak, peak_src = device_peak_tflops(name, args.peak_tflops) if cuda or args.peak_tflops else (None, "CPU: no MFU (pass --peak_tflops)")
        result: dict[str, Any] = dict(
            preset=args.preset, device=name, mixed_precision=args.mixed_precision, batch_size=args.batch_size, resolution=args.resolution,
            torch=torch.__version__, threads=torch.get_num_threads(), peak_tflops=peak, peak_source=peak_src, cache=assets.cache_info, argv=list(argv or sys.argv[1:]),
        )
        if args.data_only:
            result["data"] = data_throughput(args, assets)
            for d in result["data"]:
                print(f"data loader @ {d['resolution']} px, {d['workers']} worker(s): {d['samples_per_s']:.1f} samples/s "
                      f"({d['samples_per_s_per_worker']:.1f} per worker)")
        else:
            result["runs"] = [bench_variant(args, assets, v, modes, work, peak, peak_src, name) for v in variants]
        if args.json:
            try:
                Path(args.json).write_text(json.dumps(result, indent=2, default=str))
            except OSError as e:  # a full disk: the tables above are printed
                raise SystemExit(f"tcdistill bench: writing --json {args.json} failed ({one_line(e)})") from None
        return result
    except ConfigError as e:  # a --set value the trainer refuses, --mixed_precision fp16 on a CPU, an odd --resolution...
        raise SystemExit(f"tcdistill bench: error: {e}") from None
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)


def ratios(res: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """A mode's figures over the reference-like's (throughput, mean and median step time, CPU time, peak memory); for
    interleaved timing also the median of the per-step ratios, each step over the reference-like step timed just before
    it: a shared CPU's speed drifts by tens of percent within seconds, and adjacent pairs see nearly the same speed."""
    out = dict(samples_per_s=res["samples_per_s"] / ref["samples_per_s"], step_time=res["step_time_ms"] / ref["step_time_ms"],
                step_time_median=res["step_time_median_ms"] / max(ref["step_time_median_ms"], 1e-12),
                cpu_time=res["cpu_time_ms"] / ref["cpu_time_ms"], peak_memory=res["peak_memory_bytes"] / ref["peak_memory_bytes"],
                ops=res["ops_per_step"] / max(ref["ops_per_step"], 1))
    if res.get("timing") == ref.get("timing") == "interleaved":
        out["step_time_paired"] = statistics.median(a / b for a, b in zip(res["step_walls_ms"], ref["step_walls_ms"]))
    return out


def mode_line(res: dict[str, Any]) -> str:
    """One line of a finished mode's figures (printed before the table, which needs every mode)."""
    return (f"mode {res['variant']}/{res['mode']}: {res['samples_per_s']:.3f} samples/s, step {res['step_time_ms']:.1f} ms "
            f"(median {res['step_time_median_ms']:.1f}), peak {res['peak_memory_bytes'] / 2**30:.2f} GiB "
            f"({res['peak_memory_kind']}), {res['achieved_tflops']:.3g} TFLOP/s, warmup {res['warmup_s']:.1f} s")


def bench_variant(args: argparse.Namespace, assets: Assets, variant: str, modes: list[str], work: Path,
                  peak: float | None, peak_src: str, name: str) -> dict[str, Any]:
    """Run the modes of one variant, print its table, return {variant, modes, ratios[, ratio]} (`ratio`: optimised's)."""
    run: dict[str, Any] = dict(variant=variant, modes={})
    interleave = args.interleave if args.interleave is not None else (len(modes) > 1 and not torch.cuda.is_available())
    for mode in modes:
        res = run["modes"][mode] = run_mode(args, assets, variant, mode, work, timed=not interleave)
        if not interleave:  # each mode's figures as soon as it is done: a later mode's compile may outlast a time cap
            print(mode_line(res), flush=True)
    if interleave:
        interleaved_throughput(args, assets, variant, run["modes"], work)
    for res in run["modes"].values():
        res["mfu"] = res["achieved_tflops"] / peak if peak else None
    ref = run["modes"].get("reference-like")
    if ref is not None:
        run["ratios"] = {m: ratios(res, ref) for m, res in run["modes"].items() if m != "reference-like"}
        if "optimised" in run["ratios"]:
            run["ratio"] = run["ratios"]["optimised"]
    header = (f"tcdistill bench: preset {args.preset}, variant {variant}, {name}, mixed_precision {args.mixed_precision}, "
              f"batch {args.batch_size}, {args.resolution} px; {args.warmup} warmup + {args.steps} timed + {args.split_steps} split step(s)"
              + ("; timed steps interleaved across modes" if interleave else ""))
    if peak:
        header += f"\nMFU peak: {peak:.0f} TFLOP/s, {peak_src}"
    print(format_run(run, header), flush=True)
    if any(not math.isfinite(x) for m in run["modes"].values() for x in m["losses"]):
        print("warning: non-finite losses in the timed steps", flush=True)
    return run


if __name__ == "__main__":
    main(sys.argv[1:])
