"""The model card (`README.md` in output_dir) written at the end of training, and `--push_to_hub`."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path
from typing import Any

from .config import SEED_SCRIPTS, TrainConfig
from .export import LORA_WEIGHT_NAME

# Sampling advice for TCD students (TCD paper: 2-8 steps, gamma 0.2 in its evaluation; the authors recommend 0.3,
# higher gamma for more steps, lower for fewer).
RECOMMENDED_STEPS = 4
RECOMMENDED_GAMMA = 0.3
_SECRET_FLAGS = ("hub_token",)
_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def latest_validation_grids(output_dir: str | os.PathLike) -> list[str]:
    """The newest `validation/<tag>-step<N>.png` per tag, relative to output_dir (grids survive resumes on disk)."""
    best: dict[str, tuple[int, str]] = {}
    folder = Path(output_dir) / "validation"
    for f in folder.glob("*-step*.png") if folder.is_dir() else []:
        m = re.fullmatch(r"(.+)-step(\d+)\.png", f.name)
        if m and int(m.group(2)) >= best.get(m.group(1), (-1, ""))[0]:
            best[m.group(1)] = (int(m.group(2)), f"validation/{f.name}")
    return [best[tag][1] for tag in sorted(best)]


def changed_flags(cfg: TrainConfig) -> dict[str, object]:
    """Flags whose values differ from the entry script's defaults (secrets and the script-set variant/family left out)."""
    from .families import script_defaults

    defaults = script_defaults(cfg.model_family)
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name not in (*_SECRET_FLAGS, "variant", "model_family") and value != defaults[f.name]:
            out[f.name] = value
    return out


def full_guidance(cfg: TrainConfig) -> float:
    """The full student's recommended guidance scale: validation's, moved into the trained range of w as `tcdistill
    generate` moves its default (a scale outside it embeds a w the student never trained on)."""
    from .run_outputs import run_guidance

    return run_guidance(cfg.to_dict(), cfg.validation_guidance_scale)


def _usage(cfg: TrainConfig, repo: str, schedule: Any = None) -> str:
    """diffusers code that samples the trained output with TCDScheduler (LCMScheduler for --distill_mode lcm); `schedule`:
    the trained noise schedule's scheduler config, whose fields the sampler's own defaults would replace are spelled out."""
    from .families import pipeline_variant, sampler_overrides, weights_variant
    from .validation import UNCLIPPED, sampling_size

    pipe_cls = _PIPELINES[cfg.model_family]
    name = "LCMScheduler" if cfg.distill_mode == "lcm" else "TCDScheduler"  # as validation.sampling_scheduler
    # from_config keeps what the teacher's file sets: an LCM/TCD-scheduler teacher's own original_inference_steps (or LCM's
    # timestep_scaling) would replace the sampler's default (50, 10) and sample off the run's grid, so name the run's value.
    def differs(key: str, value: float, default: float) -> bool:
        return value != (default if schedule is None else schedule.get(key, default))

    extra = [f"original_inference_steps={cfg.num_ddim_timesteps}"] if differs("original_inference_steps", cfg.num_ddim_timesteps, 50) else []
    extra += [f"{k}={v!r}" for k, v in sampler_overrides(schedule, name).items()] if schedule is not None else []
    if cfg.distill_mode == "lcm" and differs("timestep_scaling", cfg.timestep_scaling_factor, 10.0):
        extra.append(f"timestep_scaling={cfg.timestep_scaling_factor}")
    if cfg.distill_mode == "lcm" and schedule is not None:  # as validation.sampling_scheduler: x0 unclipped
        extra += [f"{k}=False" for k in UNCLIPPED if schedule.get(k)]
    sched = f"{name}.from_config(pipe.scheduler.config{''.join(', ' + e for e in extra)})"
    eta = "" if cfg.distill_mode == "lcm" else f", eta={RECOMMENDED_GAMMA}"
    # At the trained size: the pipeline's default (the teacher's UNet sample_size x VAE factor) may be another.
    size = sampling_size(cfg.resolution)
    # The prompt states it was trained on: the run's --clip_skip (the pipeline's default layer otherwise).
    skip = "" if cfg.clip_skip is None else f", clip_skip={cfg.clip_skip}"
    prompt = f"\"a photo of a cat\", height={size}, width={size}{skip}"
    head = f"import torch\nfrom diffusers import {pipe_cls}, {name}"
    if skip and cfg.model_family == "sd":  # prompts.pipeline_prompts: what tcdistill generate does instead
        head = ("# clip_skip: StableDiffusionPipeline's needs transformers < 5.6 (diffusers issue 14124); `tcdistill generate`"
                f" works with any\n{head}")
    parts = ""  # components passed to from_pretrained: the run's VAE, a text encoder
    base_kw = f"revision=\"{cfg.teacher_revision}\", " if cfg.teacher_revision else ""  # the teacher revision it was trained on
    # A local teacher (or VAE) folder of variant-only weights (save_pretrained(variant="fp16")), which training loads from
    # those (`families.weights_variant`): without `variant=` diffusers failed on it ("no file named ...bin").
    base_kw += _variant_kw(pipeline_variant(cfg.pretrained_teacher_model))
    if cfg.pretrained_vae_model_name_or_path:  # trained with another VAE (e.g. SDXL's fp16-safe one): sample with it too
        head = head.replace("from diffusers import ", "from diffusers import AutoencoderKL, ")
        vae_variant = _variant_kw(weights_variant(cfg.pretrained_vae_model_name_or_path, allow_bin=cfg.allow_pickle_weights))
        parts = f"vae=AutoencoderKL.from_pretrained(\"{cfg.pretrained_vae_model_name_or_path}\", {vae_variant}torch_dtype=torch.float16), "
    if cfg.model_family == "sd" and _projection_text_encoder(cfg):  # as generate.sd_text_encoder: the states training used
        head = head.replace("from diffusers import ", "from transformers import CLIPTextModel\nfrom diffusers import ")
        parts += (f"text_encoder=CLIPTextModel.from_pretrained(\"{cfg.pretrained_teacher_model}\", subfolder=\"text_encoder\", "
                f"{base_kw}torch_dtype=torch.float16), ")
    if cfg.variant == "lora":
        return (f"{head}\n\npipe = {pipe_cls}.from_pretrained(\"{cfg.pretrained_teacher_model}\", {base_kw}{parts}torch_dtype=torch.float16).to(\"cuda\")\n"
                f"pipe.scheduler = {sched}\npipe.load_lora_weights(\"{repo}\", weight_name=\"{LORA_WEIGHT_NAME}\")\npipe.fuse_lora()\n"
                f"image = pipe({prompt}, num_inference_steps={RECOMMENDED_STEPS}, guidance_scale=0.0{eta}).images[0]\n")
    # The full student embeds w = guidance_scale - 1 through time_cond_proj_dim and runs no CFG.
    return (f"{head}, UNet2DConditionModel\n\n"
            f"unet = UNet2DConditionModel.from_pretrained(\"{repo}\", subfolder=\"unet_target\", torch_dtype=torch.float16)\n"
            f"pipe = {pipe_cls}.from_pretrained(\"{cfg.pretrained_teacher_model}\", {base_kw}unet=unet, {parts}torch_dtype=torch.float16).to(\"cuda\")\n"
            f"pipe.scheduler = {sched}\n"
            f"image = pipe({prompt}, num_inference_steps={RECOMMENDED_STEPS}, guidance_scale={full_guidance(cfg)}"
            f"{eta}).images[0]\n")


def _projection_text_encoder(cfg: TrainConfig) -> bool:
    """Whether the SD teacher's model_index.json names its text encoder a CLIPTextModelWithProjection: its pipeline then took
    the pooled projection as prompt states (the card's code failed: "not enough values to unpack (expected 3, got 2)")."""
    from .families import teacher_index

    entry = (teacher_index(cfg) or {}).get("text_encoder")
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] == "CLIPTextModelWithProjection"


def _variant_kw(variant: str | None) -> str:
    """The card code's `variant="..", ` argument for a model folder of variant-only weights, else nothing."""
    return f"variant=\"{variant}\", " if variant else ""


def _data_line(cfg: TrainConfig) -> str:
    """What the run trained on: the cached shards win over --train_shards_path_or_url in training (the card named the
    pixel shards where both were given)."""
    if cfg.train_latents_path_or_url:
        return f"`{cfg.train_latents_path_or_url}` (latents and prompt states cached by `tcdistill cache`)"
    return f"`{cfg.train_shards_path_or_url}`"


def render_model_card(cfg: TrainConfig, outputs: list[str], repo: str | None = None, schedule: Any = None) -> str:
    """Markdown with YAML front matter: base model, method, data, flags, sampling advice, usage (`schedule`: the trained
    noise schedule's config, `_usage`), validation grids."""
    repo = repo or cfg.hub_model_id or os.path.abspath(cfg.output_dir)  # the card's code and command run from any directory
    base = cfg.pretrained_teacher_model
    family = "stable-diffusion-xl" if cfg.model_family == "sdxl" else "stable-diffusion"
    tags = ["text-to-image", "diffusers", family, "tcd", "trajectory-consistency-distillation", "tcdistill"]
    tags += ["lora"] if cfg.variant == "lora" else []
    front = "\n".join(["---", f"base_model: {base}", "library_name: diffusers", "tags:", *[f"- {t}" for t in tags], "---"])
    method = "a LoRA on the teacher's UNet" if cfg.variant == "lora" else "the full UNet (EMA target in `unet_target/`, online student in `unet/`)"
    files = "\n".join(f"- `{os.path.relpath(p, cfg.output_dir)}`" for p in outputs) or "- (none)"
    # Shell-quoted, so the lines paste into a command as they are (a pipe: url or a prompt list holds spaces or '|').
    flags = "\n".join(f"--{k}={shlex.quote(str(v))}" for k, v in changed_flags(cfg).items())
    grids = latest_validation_grids(cfg.output_dir)
    grid_md = "\n".join(f"![{g}]({g})" for g in grids) or "No validation grid was written (--validation_steps 0 or fewer steps)."
    gs = "0 (LoRA: no CFG)" if cfg.variant == "lora" else f"{full_guidance(cfg)} (embedded as w = guidance_scale - 1; trained on w in [{cfg.w_min}, {cfg.w_max}])"
    # No --base: generate then loads the teacher its tcdistill_config.json names at --teacher_revision from --cache_dir
    # (`run_outputs.run_teacher`); an explicit --base is loaded as given, from main in the default cache.
    cli_unet = f"--{'lora' if cfg.variant == 'lora' else 'unet'} {shlex.quote(repo)}"
    if cfg.distill_mode == "lcm":  # trained through LCM's boundary scalings to target time 0: LCM's sampler, no gamma
        advice, cli_sampling = f"Use `LCMScheduler` with {RECOMMENDED_STEPS} steps (2-8 work).", ""
        grid_sampler = ", LCMScheduler"
    else:
        advice = (f"Use `TCDScheduler` with {RECOMMENDED_STEPS} steps (2-8 work) and gamma (`eta`) {RECOMMENDED_GAMMA}: higher gamma "
                  "for\nmore steps, lower for fewer; gamma 0 is deterministic.")
        cli_sampling = f" --gamma {RECOMMENDED_GAMMA}"
        grid_sampler = f", gamma {cfg.validation_gamma}"
    if cfg.clip_skip is not None:  # the prompt states it was trained on, in the count of the UIs that load the kohya file
        from .export import a1111_clip_skip

        k = a1111_clip_skip(cfg.clip_skip, cfg.model_family)
        # A1111 skips on SDXL's CLIP-L alone (and only with its sdxl_clip_l_skip option): ComfyUI's value only there.
        a1111 = "" if cfg.model_family == "sdxl" else f"in A1111 \"Clip skip\" {k}, "
        advice += (f"\nTrained with clip skip: diffusers' `clip_skip={cfg.clip_skip}` (`tcdistill generate` follows it); "
                   f"{a1111}in ComfyUI CLIPSetLastLayer -{k}.")
    return f"""{front}

# TCD ({cfg.distill_mode}) distillation of `{base}`

Trajectory Consistency Distillation ([arXiv 2402.19159](https://arxiv.org/abs/2402.19159)) of `{base}` into
{method}, trained with tcdistill (`distill_mode={cfg.distill_mode}`, {cfg.num_ddim_timesteps}-step DDIM grid,
guidance w ~ U[{cfg.w_min}, {cfg.w_max}] in the LCM form, `{cfg.loss_type}` loss).

- Base model: `{base}` ({cfg.model_family}, prediction type from its scheduler config)
- Method: TCD, {"LoRA" if cfg.variant == "lora" else "full model"} (`{cfg.distill_mode}`)
- Data: {_data_line(cfg)}
- Resolution: {cfg.resolution}

Files:
{files}

## Sampling

{advice} Guidance scale: {gs}.

```python
{_usage(cfg, repo, schedule)}```

Or from the command line: `tcdistill generate {cli_unet} --prompt "a photo of a cat" --steps {RECOMMENDED_STEPS}{cli_sampling}`.

## Training flags

Flags that differ from the defaults of `{SEED_SCRIPTS[cfg.variant, cfg.model_family]}`:

```
{flags}
```

## Latest validation grids

Rows are prompts, columns are step counts ({cfg.validation_inference_steps}){grid_sampler}.

{grid_md}
"""


def write_model_card(cfg: TrainConfig, outputs: list[str], repo: str | None = None, schedule: Any = None) -> str:
    """Write `output_dir/README.md` and return its path."""
    from .checkpoint import atomic_file

    path = os.path.join(cfg.output_dir, "README.md")
    # Whole or not at all: a disk that filled up part-way through left the previous card cut short.
    with atomic_file(path) as tmp:
        tmp.write_text(render_model_card(cfg, outputs, repo, schedule), encoding="utf-8")
    return path


def list_in_card(path: str | os.PathLike) -> bool:
    """Add the file `path` to the "Files:" list of the model card that training wrote beside it (its folder's README.md),
    unless listed; False where there is no such card. `tcdistill export` writes a kohya file into an output folder whose
    card was written at the end of training, and the card (uploaded as it is by a later push) did not name it."""
    from .checkpoint import atomic_file

    p = Path(path)
    card = p.parent / "README.md"
    try:
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
    except UnicodeDecodeError:  # another tool's README (UTF-16, latin-1): no card of ours, which are UTF-8
        return False
    listed = re.search(r"^Files:\n((?:- `[^`\n]+`\n)+)", text, re.M)  # render_model_card's list, in a card it tagged
    entry = f"- `{p.name}`\n"
    if listed is None or "\n- tcdistill\n" not in text or entry in listed.group(1):
        return False
    with atomic_file(card) as tmp:
        tmp.write_text(text[:listed.end()] + entry + text[listed.end():], encoding="utf-8")
    return True


def push_to_hub(cfg: TrainConfig, outputs: list[str], repo_id: str, schedule: Any = None) -> str:
    """Point the card's usage code at the hub repo `repo_id` (created before training: `preflight.create_hub_repo`) and
    upload output_dir without checkpoints."""
    from huggingface_hub import upload_folder

    from .preflight import LOCK_NAME

    write_model_card(cfg, outputs, repo=repo_id, schedule=schedule)
    upload_folder(
        repo_id=repo_id, folder_path=cfg.output_dir, token=cfg.hub_token, commit_message="End of TCD training",
        # Resumable checkpoints (optimizer state), their staging folders and the run's lock file stay local.
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "*.tmp*", LOCK_NAME],
    )
    return repo_id
