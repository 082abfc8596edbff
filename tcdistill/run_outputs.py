"""A training run's output folder as `generate`, `eval` and `export` read it: its record of flags (`tcdistill_config.json`),
refusals of a folder a live or stopped run holds, and what the record says about sampling (grid, guidance, clip skip,
teacher revision)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointIO, checkpoint_hint
from .config import FINAL_STEP, RUN_CONFIG, check_clip_skip_floor, first_line
from .export import LORA_WEIGHT_NAME, kohya_file_clip_skip
from .preflight import TRAINING_ROLE, output_dir_holder

_OUTPUT_WEIGHTS = ("unet_target", "unet", LORA_WEIGHT_NAME)  # a run's final weights in its output folder (full, LoRA)


def refuse_live_run(path: str | os.PathLike) -> Path | None:
    """The folder holding the run record of the output `path` (its folder or the folder above), or None; refused in one
    line where a live training run holds the folder: that run wrote its flags at its start, over those of the weights there
    (an earlier run's, sampled on the new run's grid), and writes its own weights only at its end."""
    p = Path(path)
    for d in (p if p.is_dir() else p.parent, (p if p.is_dir() else p.parent).parent):
        holder = output_dir_holder(d)
        # Only a training run rewrites the record and weights; `tcdistill generate` writing its images into the folder
        # (or a cache) does not, and was refused as if it were one ("its tcdistill_config.json is that run's").
        if holder and holder.startswith(TRAINING_ROLE):
            raise ValueError(f"{d} is in use by a {holder}): its {RUN_CONFIG} is that run's and its weights are not yet; "
                             "wait for the run to end, or pass a finished output")
        if (d / RUN_CONFIG).is_file():
            refuse_unfinished_run(d)
            return d
    return None


def refuse_unfinished_run(d: Path) -> None:
    """Refuse, in one line, an output folder `d` whose run record has no final step (`FINAL_STEP`): its run stopped before
    its final save (SIGTERM, an error), so the weights there, if any, are an earlier run's (sampled on the stopped run's
    flags and teacher, silently), and a run stopped before its first end has none (a bare "no UNet config.json")."""
    try:
        run = json.loads((d / RUN_CONFIG).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return  # run_config names the damage (export --base warns and goes on without the flags)
    if not isinstance(run, dict) or FINAL_STEP not in run or run[FINAL_STEP] is not None:
        return  # finished, or recorded before FINAL_STEP was (weights and flags of one run, as far as can be told)
    done = CheckpointIO(d).complete()
    weights = [n for n in _OUTPUT_WEIGHTS if (d / n).exists()]
    are = "is" if len(weights) == 1 else "are"
    held = f"the {' and '.join(weights)} there {are} an earlier run's" if weights else "it has no final weights"
    fix = (f"resume it (--resume_from_checkpoint latest: its newest checkpoint is {done[-1][1].name}) to write its own"
           if done else "it saved no checkpoint: train it again")
    raise ValueError(f"{d / RUN_CONFIG} is of a training run that stopped before its final save, so {held}; {fix}")


def run_config(path: str | None, lora: bool | None = None) -> dict[str, Any]:
    """The training run's saved flags next to an output (`refuse_live_run`), or {}; with `lora` (the output was passed as
    --lora, else --unet), an output of the other variant's run refused (`refuse_other_variant`)."""
    d = refuse_live_run(path) if path else None
    if d is not None:
        try:
            run = json.loads((d / RUN_CONFIG).read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:  # JSON and decoding errors: the bare parser message named no file
            raise ValueError(f"{d / RUN_CONFIG} cannot be read as the run's flags ({first_line(e)}); restore it from the "
                             "training run, or remove it and pass --base") from None
        if not isinstance(run, dict):
            raise ValueError(f"{d / RUN_CONFIG} is not a JSON object of the run's flags; restore it from the training run")
        if lora is not None and path:
            refuse_other_variant(Path(path), d, run, lora)
        return run
    return {}


def refuse_other_variant(path: Path, d: Path, run: dict[str, Any], lora: bool) -> None:
    """Refuse, in one line, a LoRA run's output `d` passed as --unet, or a full-model run's as --lora (`path`: the folder, or
    its weights there): a folder that held the other variant's run before kept its weights, which were sampled silently
    with this run's flags; else the line was a bare "no UNet config.json" / "no LoRA weights"."""
    variant = run.get("variant")
    if variant not in ("full", "lora") or (variant == "lora") == lora or (path != d and path.name not in _OUTPUT_WEIGHTS):
        return  # the right flag, a record without a variant, or a model of the user's own inside the folder
    stale = [n for n in (_OUTPUT_WEIGHTS[2:] if lora else _OUTPUT_WEIGHTS[:2]) if (d / n).exists()]
    old = f"; the {' and '.join(stale)} there {'is' if len(stale) == 1 else 'are'} an earlier run's" if stale else ""
    raise ValueError(f"{d} is the output of a {'LoRA' if variant == 'lora' else 'full-model'} run (its {RUN_CONFIG}): pass it as "
                     f"{'--lora' if variant == 'lora' else '--unet'}{old}")


# What `local_output` fetches of a hub repo: a run's saved flags, a bare UNet, a full-model output's EMA UNet, a LoRA.
_HUB_FILES = [RUN_CONFIG, "config.json", "diffusion_pytorch_model*.safetensors", "unet_target/*", LORA_WEIGHT_NAME]


def local_output(path: str | None) -> str | None:
    """`path` itself where it exists (or is unset), else the local snapshot of the hub repo it names: a model card's
    `tcdistill generate --unet/--lora REPO` names the repo that --push_to_hub uploaded the output folder to. A missing path
    that cannot be a repo id (`./run`, `/x/y`, `a/b/c`, a .safetensors file) is returned for its own not-found line."""
    if not path or Path(path).exists() or not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) or path.endswith(".safetensors"):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=_HUB_FILES)
    except (OSError, ValueError) as e:  # not a repo id, no such repo, offline without a cached copy
        raise FileNotFoundError(f"{path} is neither a local path nor a hub repo that could be fetched ({first_line(e)})") from None


def run_sampling(run: dict[str, Any]) -> dict[str, Any]:
    """How a run's student samples, from its saved flags: training grid N, mode (tcd/lcm) and LCM's boundary scaling."""
    return dict(original_steps=int(run.get("num_ddim_timesteps", 50)), distill_mode=run.get("distill_mode", "tcd"),
                timestep_scaling=float(run.get("timestep_scaling_factor", 10.0)))


def sampling_clip_skip(flag: int | None, run: dict[str, Any], lora: str | None = None, family: str = "sd") -> int | None:
    """The clip skip generate and eval sample with: unset, the run's --clip_skip (the prompt states it was trained on), or
    without a run record that of the --lora file's ss_clip_skip (a kohya file copied away from its output: it sampled
    at the last layer); 0, none (the text encoder's last layer, also on a run trained with clip skip); else N (range:
    `check_clip_skip`)."""
    if flag is None:
        return kohya_file_clip_skip(lora, family) if lora and not run else run.get("clip_skip")
    check_clip_skip_floor(flag, zero_is_none=True)
    return flag or None


def run_guidance(run: dict[str, Any], default: float) -> float:
    """A default CFG scale (w + 1) moved into the run's training range [--w_min, --w_max] of w, when its config names one:
    a student conditioned on w (or distilled from a teacher guided at w) was never trained outside it."""
    if "w_min" not in run or "w_max" not in run:
        return default
    return min(max(default - 1.0, float(run["w_min"])), float(run["w_max"])) + 1.0


def check_model_config(folder: str | Path, cls_name: str = "UNet2DConditionModel", hint: str = "pass the distilled UNet folder") -> None:
    """Refuse, in one line, a local folder whose config.json is another diffusers model's than `cls_name` (a VAE, a text
    encoder...): diffusers builds the model from it anyway, and a UNet got no weights (a meta-tensor traceback at the first
    `.to()`), a VAE failed on the UNet's fields ("cross_attention_dim must be specified for CrossAttnDownBlock2D")."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        return
    try:
        name = json.loads(f.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        raise ValueError(f"{f} is not a diffusers {cls_name} config") from None
    if name not in (None, cls_name):
        raise ValueError(f"{folder} holds a {name!r} config where a {cls_name!r} one is expected ({hint})")


def resolve_unet_dir(path: str) -> str:
    """A UNet folder: the path itself, or in a full-model training output its `unet_target` (the EMA deliverable) before
    its `unet` (the online student; also a pipeline folder's UNet)."""
    p = Path(path)
    for cand in (p, p / "unet_target", p / "unet"):
        if (cand / "config.json").is_file():
            check_model_config(cand)
            return str(cand)
    if p.exists():
        raise FileNotFoundError(f"no UNet config.json in {p}, {p / 'unet_target'} or {p / 'unet'}{checkpoint_hint(p)}")
    return path  # a hub id


def run_cache_dir(run: dict[str, Any]) -> str | None:
    """The run's --cache_dir, where its hub models were read from, if that folder is on this machine (an output copied or
    pushed from where it trained names that machine's: not made anew, or refused, here; the default cache is used)."""
    cache_dir = run.get("cache_dir")
    return cache_dir if cache_dir and os.path.isdir(cache_dir) else None


def check_run_model_here(path: str | None, flag: str, what: str) -> None:
    """Refuse the run's recorded local model folder `path` (its teacher or VAE, not given as `flag`) where it is not on this
    machine: training records one as an absolute path, so an output copied to another machine, or a teacher moved since,
    named it here, and diffusers said only that the hub could not be reached for it."""
    if path and os.path.isabs(path) and not os.path.exists(path):
        raise ValueError(f"the run's {what} {path} (its {RUN_CONFIG}) is not on this machine (moved, or the output copied "
                         f"here?); pass {flag} with where it is now")


def run_teacher(run: dict[str, Any]) -> str | None:
    """The teacher named by the run's flags, at the revision it was distilled from: a hub id with a `--teacher_revision` or
    `--cache_dir` resolves to that revision's snapshot folder in that cache (fetched there if need be), so that every later
    read of the base (model_index.json, configs, weights) is of the trained revision, not of main in the default cache. A
    --cache_dir not on this machine (an output copied or pushed from where it trained) is not used: the default cache is."""
    base, revision, cache_dir = run.get("pretrained_teacher_model"), run.get("teacher_revision"), run_cache_dir(run)
    # An absolute path is a local folder training recorded (no hub id): one not here is generate's "not on this machine"
    # line, not the hub's "Repo id must be in the form 'repo_name'" that fetching it gave.
    if not base or os.path.isdir(base) or os.path.isabs(base) or not (revision or cache_dir):
        return base
    from diffusers import DiffusionPipeline

    try:
        return str(DiffusionPipeline.download(base, revision=revision, cache_dir=cache_dir))
    except (OSError, ValueError) as e:  # offline and not in the cache, an unknown revision
        where = " ".join(w for w in (revision and f"at --teacher_revision {revision}", cache_dir and f"from --cache_dir {cache_dir}") if w)
        raise ValueError(f"cannot get the run's teacher {base} {where} ({first_line(e)}); pass --base") from None
