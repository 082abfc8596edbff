"""`tcdistill demo`: the whole job on an embedded default, offline on a CPU — world, teacher, TCD/LCM students, report.

1. a captioned synthetic world (webdataset shards), 2. a tiny SD teacher trained on it (VAE, then UNet; cached),
3. a world attribute classifier (cached), 4. TCD distillation, full and LoRA, and an LCM student at the same budget,
all through the trainer the seed scripts use, 5. `tcdistill eval`'s metrics and sample grids in a report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ..argparsing import DefaultsHelpFormatter, OneLineParser

logger = logging.getLogger("tcdistill.demo")


@dataclass
class Budget:
    """Every size the demo spends compute on; `--quick` shrinks them for CI."""

    n_train: int = 4096
    n_eval: int = 128
    vae_steps: int = 300
    teacher_steps: int = 800
    classifier_steps: int = 300
    distill_steps: int = 300
    distill_batch: int = 24
    teacher_batch: int = 64


QUICK = Budget(n_train=128, n_eval=8, vae_steps=4, teacher_steps=4, classifier_steps=4, distill_steps=2, distill_batch=4, teacher_batch=8)

# Distillation hyper-parameters (what the seed scripts take as flags); tuned on this world, see docs/demo.md.
DISTILL_FLAGS: dict[str, dict[str, Any]] = {
    # N = 20 (a skip of 50 timesteps): the teacher's guidance reaches x0 through fewer bootstrapped links than with
    # SD's N = 50, which at this budget lowered the 4-step error to the teacher by ~10 % (docs/demo.md).
    "common": {"w_min": 1.0, "w_max": 3.0, "loss_type": "l2", "adam_weight_decay": 0.0, "lr_scheduler": "constant",
               "num_ddim_timesteps": 20},
    "full": {"learning_rate": 1e-4, "ema_decay": 0.9},
    "lora": {"learning_rate": 1e-3, "lora_rank": 16, "lora_alpha": 16},
}
# (run name, trainer variant, distill mode, sampler used at evaluation)
STUDENTS: tuple[tuple[str, str, str, str], ...] = (
    ("tcd-full", "full", "tcd", "tcd"),
    ("tcd-lora", "lora", "tcd", "tcd"),
    ("lcm-full", "full", "lcm", "lcm"),
)
GUIDANCE_SCALE = 3.0  # teacher CFG scale at evaluation = w + 1 with w = 2, the middle of [w_min, w_max]


def build_parser() -> argparse.ArgumentParser:
    b = Budget()
    p = OneLineParser(prog="tcdistill demo", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--output_dir", default="demo-out", help="Where the world, models, report and grids go.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the world, every training run and the evaluation noise.")
    p.add_argument("--teacher_steps", type=int, default=None, help=f"Teacher UNet training steps (default {b.teacher_steps}).")
    p.add_argument("--vae_steps", type=int, default=None, help=f"Teacher VAE training steps (default {b.vae_steps}).")
    p.add_argument("--distill_steps", type=int, default=None, help=f"Optimizer steps of each student (default {b.distill_steps}).")
    p.add_argument("--n_eval", type=int, default=None, help=f"Evaluation prompts (default {b.n_eval}).")
    p.add_argument("--quick", action="store_true", help="Tiny budgets (CI smoke run: checks the plumbing, not the quality).")
    p.add_argument("--force", action="store_true", help="Retrain the teacher, classifier and students even if cached.")
    return p


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(path: Path, key: str) -> bool:
    """True when `path` holds a finished stage made with the same settings (its marker file matches)."""
    marker = path / "demo_stage.json"
    try:
        return json.loads(marker.read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):  # none, or cut short / not an object (an older demo's): redo the stage
        return False


def _mark(path: Path, key: str, info: dict[str, Any]) -> None:
    from ..checkpoint import atomic_file

    with atomic_file(path / "demo_stage.json") as tmp:  # whole or not at all: a cut-short marker failed the next run
        tmp.write_text(json.dumps({"key": key, **info}, indent=1, default=str))


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the demo end to end; print where the report is."""
    args = build_parser().parse_args(argv)
    budget = QUICK if args.quick else Budget()
    for name in ("teacher_steps", "vae_steps", "distill_steps", "n_eval"):
        if getattr(args, name) is not None:
            setattr(budget, name, getattr(args, name))
    for name, low in (("teacher_steps", 0), ("vae_steps", 0), ("distill_steps", 1), ("n_eval", 2)):
        if getattr(budget, name) < low:  # n_eval: a Fréchet distance needs two samples
            sys.exit(f"tcdistill demo: error: --{name} must be >= {low}, got {getattr(budget, name)}")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        sys.exit(f"tcdistill demo: error: --output_dir {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    from .stages import build_world, distill_student, evaluate_all, train_classifier_stage, train_teacher_stage
    from .report import write_report

    t = time.perf_counter()
    world = build_world(out / "world", budget, args.seed, _log)
    timings["world"] = time.perf_counter() - t

    t = time.perf_counter()
    teacher_dir = out / "teacher"
    key = _key({"stage": "teacher", "budget": [budget.n_train, budget.vae_steps, budget.teacher_steps, budget.teacher_batch], "seed": args.seed})
    if not args.force and _cached(teacher_dir, key):
        _log(f"teacher: cached in {teacher_dir}")
        teacher_info = json.loads((teacher_dir / "demo_stage.json").read_text())
    else:
        teacher_info = {"key": key, **train_teacher_stage(teacher_dir, world, budget, args.seed, _log)}
        _mark(teacher_dir, key, teacher_info)
    timings["teacher"] = time.perf_counter() - t

    t = time.perf_counter()
    clf_dir = out / "classifier"
    key = _key({"stage": "classifier", "teacher": teacher_info.get("key"), "budget": [budget.n_train, budget.classifier_steps], "seed": args.seed})
    if not args.force and _cached(clf_dir, key):
        _log(f"classifier: cached in {clf_dir}")
    else:
        _mark(clf_dir, key, train_classifier_stage(clf_dir, world, teacher_dir, budget, args.seed, _log))
    timings["classifier"] = time.perf_counter() - t

    students: dict[str, dict[str, Any]] = {}
    for name, variant, mode, sampler in STUDENTS:
        t = time.perf_counter()
        run_dir = out / "students" / name
        flags = {**DISTILL_FLAGS["common"], **DISTILL_FLAGS[variant], "distill_mode": mode}
        key = _key({"stage": name, "teacher": teacher_info.get("key"), "flags": flags, "steps": budget.distill_steps,
                    "batch": budget.distill_batch, "seed": args.seed})
        if not args.force and _cached(run_dir, key):
            _log(f"{name}: cached in {run_dir}")
        else:
            distill_student(run_dir, variant, flags, teacher_dir, world, budget, args.seed, _log)
            _mark(run_dir, key, {"flags": flags})
        students[name] = {"dir": str(run_dir), "variant": variant, "mode": mode, "sampler": sampler, "flags": flags}
        timings[f"distill_{name}"] = time.perf_counter() - t

    t = time.perf_counter()
    n_grid = int(DISTILL_FLAGS["common"].get("num_ddim_timesteps", 50))  # the students' N: their samplers' grid
    rows, settings = evaluate_all(teacher_dir, clf_dir, world, students, budget, args.seed, GUIDANCE_SCALE, _log, n_grid)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    cmd = "tcdistill demo " + " ".join(sys.argv[2:] if argv is None else list(argv))
    report = write_report(out, rows, settings=settings, budget=asdict(budget), students=students, teacher=teacher_info,
                          timings=timings, command=cmd.strip(), seed=args.seed)
    _log(f"done in {timings['total']:.0f} s: {report}")
