"""The demo's report: the teacher-matching table, distribution metrics, target checks (Markdown + JSON), sample grids."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from PIL import Image

from ..evaluate import format_table, json_rows
from ..validation import make_grid

GRID_STEPS = (1, 2, 4, 8)
GRID_PROMPTS = 8
GRID_SCALE = 2  # 32-px samples drawn at 64 px


def _find(rows: list[dict[str, Any]], model: str, k: int, gamma: float | None = None) -> dict[str, Any] | None:
    for r in rows:
        if r["model"] == model and r["steps"] == k and (gamma is None or r["gamma"] == gamma):
            return r
    return None


def target_checks(rows: list[dict[str, Any]], gammas: list[float], lcm: str = "lcm-full", tcd: str = "tcd-full") -> list[dict[str, Any]]:
    """The issue's targets, each measured (never assumed): ratio to teacher DDIM, TCD vs LCM, TCD 8 vs 4 steps.

    At gamma 0 TCD follows the deterministic trajectory the teacher's reference follows, so the targets are in RMSE
    to that reference. At gamma > 0 it re-injects fresh noise each step (the paper's SSS): its samples leave that
    trajectory by design, so "no worse than LCM" and "8 steps no worse than 4" are judged on the distribution
    metric (world Fréchet distance) when the rows have one.
    """
    checks = []
    for g in gammas:
        metric = "rmse" if g == 0 or not any("world_fd" in r for r in rows) else "world_fd"
        if metric == "rmse":
            for k in (2, 4):
                ddim, t = _find(rows, "teacher", k), _find(rows, tcd, k, g)
                if ddim and t:
                    ratio = ddim["rmse"] / max(t["rmse"], 1e-12)
                    checks.append({"target": f"{tcd} gamma {g:g}, {k} steps: >= 3x closer to teacher-50 than teacher DDIM-{k}",
                                   # three decimals: at two, 2.9986 read "3.00x" next to a target not met
                                   "value": f"{ratio:.3f}x", "met": ratio >= 3.0})
        ks = sorted({r["steps"] for r in rows if r["model"] == lcm})
        pairs = [(k, _find(rows, tcd, k, g), _find(rows, lcm, k)) for k in ks]
        # `not <=`: a NaN metric (a Fréchet distance over < 2 samples) counts as worse, never as met.
        worse = [k for k, t, lc in pairs if t and lc and not t[metric] <= lc[metric]]
        checks.append({"target": f"{tcd} gamma {g:g} no worse than {lcm} at every k ({metric})",
                       "value": "worse at k=" + ",".join(map(str, worse)) if worse else "all k", "met": not worse})
        t4, t8 = _find(rows, tcd, 4, g), _find(rows, tcd, 8, g)
        if t4 and t8:
            checks.append({"target": f"{tcd} gamma {g:g}: 8 steps no worse than 4 ({metric})",
                           "value": f"{t8[metric]:.4f} vs {t4[metric]:.4f}", "met": t8[metric] <= t4[metric]})
    return checks


def ratio_table(rows: list[dict[str, Any]], students: list[str], gammas: list[float]) -> str:
    """RMSE to the teacher's 50-step sample by k: teacher DDIM-k, each student (per gamma), and DDIM/student ratios."""
    ks = sorted({r["steps"] for r in rows if r["model"] != "teacher"})
    cols: list[tuple[str, float | None]] = []
    for s in students:
        gs = sorted({r["gamma"] for r in rows if r["model"] == s}, key=lambda g: -1 if g is None else g)
        cols += [(s, g) for g in gs if g is None or g in gammas]
    head = "| k | teacher DDIM | " + " | ".join(f"{s}" + ("" if g is None else f" γ={g:g}") for s, g in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    for k in ks:
        ddim = _find(rows, "teacher", k)
        cells = []
        for s, g in cols:
            r = _find(rows, s, k, g)
            cells.append("" if r is None or ddim is None else f"{r['rmse']:.3f} ({ddim['rmse'] / max(r['rmse'], 1e-12):.1f}×)")
        lines.append(f"| {k} | {ddim['rmse']:.3f} | " + " | ".join(cells) + " |" if ddim else f"| {k} | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_grids(out: Path, rows: list[dict[str, Any]], students: list[str], gamma: float) -> list[str]:
    """One PNG per model: rows = prompts, columns = teacher 50-step, then the model at 1/2/4/8 steps."""
    ref = next(r for r in rows if r["model"] == "teacher" and r["steps"] == max(x["steps"] for x in rows if x["model"] == "teacher"))
    paths = []
    for model in ["teacher", *students]:
        cols = [ref["_images"]]
        for k in GRID_STEPS:
            r = _find(rows, model, k, None if model == "teacher" else gamma) or _find(rows, model, k)
            if r is not None:
                cols.append(r["_images"])
        n = min(GRID_PROMPTS, cols[0].shape[0])
        img = make_grid([[c[i] for c in cols] for i in range(n)])
        img = img.resize((img.width * GRID_SCALE, img.height * GRID_SCALE), Image.Resampling.NEAREST)
        path = out / f"grid-{model}.png"
        img.save(path)
        paths.append(str(path))
    return paths


def write_report(out: Path, rows: list[dict[str, Any]], *, settings: dict[str, Any], budget: dict[str, Any],
                 students: dict[str, dict[str, Any]], teacher: dict[str, Any], timings: dict[str, float],
                 command: str, seed: int) -> str:
    """Write report.md, report.json and grid-*.png into `out`; return the Markdown path."""
    import torch

    names = list(students)
    gammas = list(settings["gammas"])
    checks = target_checks(rows, gammas)
    grids = write_grids(out, rows, names, gammas[-1])
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    data = {"command": command, "seed": seed, "settings": settings, "budget": budget, "students": students,
            "teacher": teacher, "timings_s": timings, "environment": env, "targets": checks, "rows": json_rows(rows), "grids": grids}
    (out / "report.json").write_text(json.dumps(data, indent=1, default=str))
    prompts = settings.get("prompts_file")
    md = [
        "# tcdistill demo report", "",
        f"Command: `{command}` (seed {seed}); wall time {timings['total']:.0f} s on {env['threads']} torch thread{'s' if env['threads'] != 1 else ''}.", "",
        f"Teacher-matching error: RMSE in latent space between each k-step sample and the teacher's "
        f"{settings['reference_steps']}-step guided DDIM sample (CFG {settings['guidance_scale']:g}) from the same noise and "
        f"prompt, mean over {settings['n_prompts']} prompts (`{prompts}`); in brackets, how many times closer than the "
        "teacher's own guided DDIM at k steps.", "",
        ratio_table(rows, names, gammas), "",
        "## Targets", "",
        *[f"- [{'x' if c['met'] else ' '}] {c['target']}: {c['value']}" for c in checks], "",
        "## All rows", "",
        "`world_fd`: Fréchet distance in the world classifier's features against rendered images of the same prompts; "
        "`world_fidelity`: fraction of samples whose four attributes the classifier reads as the prompt says.", "",
        format_table(rows), "",
        "## Samples", "",
        "Rows: the first prompts; columns: teacher 50-step DDIM, then 1, 2, 4, 8 steps "
        f"(TCD students at γ={gammas[-1]:g}).", "",
        *[f"![{Path(p).stem}]({Path(p).name})" for p in grids], "",
        "## Budget and timings", "",
        f"Budget: `{json.dumps(budget)}`", "",
        "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in timings.items()], "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return str(path)
