"""`tcdistill generate`: prompts -> PNGs with a TCD-distilled UNet (`--unet`) or LoRA (`--lora`) on its base model.

Guidance: a LoRA student learned a guidance-distilled ODE and samples with guidance_scale 0 (no CFG). A full
student has `time_cond_proj_dim`: the pipeline embeds w = guidance_scale - 1 and runs no CFG, so the default 8.0
gives w = 7, inside the training range of w for SD (5..15) and SDXL (3..15) and the same as validation's default; a run
trained on another --w_min/--w_max range (the demo's 1..3) gets the nearest w inside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import atomic_file
from .argparsing import DefaultsHelpFormatter, OneLineParser
from .config import (FINAL_STEP, TORCH_SEEDS, check_not_single_file, check_seed,
                     first_line)
from .export import LORA_WEIGHT_NAME, load_unet_lora, lora_file
from .families import (PROMPT_COMPONENTS, absent_components, pipeline_variant, scheduler_stand_in, unet_family, unreadable_weights,
                       weights_variant)
from .prompts import pipeline_prompts
from .models import DTYPES
from .preflight import check_output_dir, lock_output_dir, resolve_device, unlock_output_dir
from .run_outputs import (check_model_config, check_run_model_here, local_output, resolve_unet_dir, run_cache_dir, run_config,
                          run_guidance, run_sampling, run_teacher, sampling_clip_skip)
from .teacher_checks import check_clip_skip, check_sample_size
from .validation import sampling_hw

FULL_MODEL_GUIDANCE = 8.0
TCD_GAMMA = 0.3  # --gamma's default with TCDScheduler (LCM sampling takes none)


# model_index.json's pipeline class -> (the text-to-image class that samples it, its family). A model saved from its img2img
# pipeline holds the same components (training takes it as a teacher) and loads as text-to-image, as the model card shows.
PIPELINE_CLASSES = {"StableDiffusionPipeline": ("StableDiffusionPipeline", "sd"),
                    "StableDiffusionImg2ImgPipeline": ("StableDiffusionPipeline", "sd"),
                    "StableDiffusionXLPipeline": ("StableDiffusionXLPipeline", "sdxl"),
                    "StableDiffusionXLImg2ImgPipeline": ("StableDiffusionXLPipeline", "sdxl")}


def base_index(base: str) -> dict[str, Any]:
    """The pipeline `base`'s model_index.json, read once per command and passed to what needs it."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(base))


def pipeline_class(base: str, index: dict[str, Any]) -> Any:
    """StableDiffusionPipeline or StableDiffusionXLPipeline, from the base's model_index.json `index` (`PIPELINE_CLASSES`).
    A base without the family's prompt encoders (an SDXL refiner has no text_encoder) is refused: sampling failed in a matmul."""
    import diffusers

    name = index.get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ValueError(f"{base}: pipeline class {name!r} is not supported (expected one of {sorted(PIPELINE_CLASSES)})")
    cls_name, family = PIPELINE_CLASSES[name]
    missing = absent_components(index, PROMPT_COMPONENTS[family])
    if missing:
        raise ValueError(f"{base}: the {name} has no {', '.join(missing)} (model_index.json); the student samples with every "
                         f"prompt encoder of its {family.upper()} teacher (a refiner-style pipeline is not a base)")
    return getattr(diffusers, cls_name)


def sd_text_encoder(base: str, index: dict[str, Any], dtype: torch.dtype, variant: str | None = None) -> dict[str, Any]:
    """`{"text_encoder": CLIPTextModel}` for an SD base whose model_index.json `index` names a CLIPTextModelWithProjection text
    encoder, else {}: StableDiffusionPipeline takes the encoder's first output as the prompt states, for that class its
    pooled projection ([B, D]), and sampling failed with "not enough values to unpack". Training conditions on the last
    hidden state of the same weights (families.SDFamily loads them as CLIPTextModel), which this gives the pipeline."""
    from transformers import CLIPTextModel

    entry = index.get("text_encoder") or [None, None]
    if entry[1] != "CLIPTextModelWithProjection":
        return {}
    # Cast after loading: transformers before 4.56 takes `torch_dtype=`, not `dtype=` (passed on to __init__, a TypeError).
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **({"variant": variant} if variant else {})).to(dtype)
    return {"text_encoder": te}


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`dtype=` where diffusers takes it (it deprecates `torch_dtype`), else the older `torch_dtype=`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - present once `dtype` is accepted
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def base_pipeline(cls: Any, base: str, dtype: torch.dtype, index: dict[str, Any] | None = None, **kw: Any) -> Any:
    """`cls.from_pretrained(base, **kw)` in `dtype`: from the base's variant files where it holds only those (a base saved
    with fp16 variant files loads only when asked for them), and with an SD base's projection text encoder as the
    CLIPTextModel training conditions on (`sd_text_encoder`; `index`: the base's model_index.json where already read)."""
    from safetensors import SafetensorError

    variant = pipeline_variant(base)
    try:
        if cls.__name__ == "StableDiffusionPipeline":
            kw.update(sd_text_encoder(base, base_index(base) if index is None else index, dtype, variant))
        if (stand_in := scheduler_stand_in(base)) is not None:
            kw["scheduler"] = None  # not built: diffusers' placeholder class raises; the stand-in goes in after the load
        pipe = cls.from_pretrained(base, **kw, **_dtype_kwargs(dtype), **({"variant": variant} if variant else {}))
    except SafetensorError as e:  # transformers lets it through: a cut-short text encoder file was a traceback
        raise ValueError(unreadable_weights([base], e)) from None
    if stand_in is not None:
        pipe.scheduler = stand_in
    return pipe


def load_vae(vae: str, dtype: torch.dtype, unet_in: int, cache_dir: str | None = None) -> Any:
    """The AutoencoderKL `vae` (--vae: folder or hub id) as training loads --pretrained_vae_model_name_or_path
    (`families._load_vae`): a hub id through `cache_dir` (the run's --cache_dir: generate found it only in the default
    cache, offline a bare "does not appear to have a file named config.json"), a local folder holding only variant
    weights (`save_pretrained(..., variant="fp16")`) from those ("no file named diffusion_pytorch_model.bin"). Refused
    where its latent channels are not the UNet's `unet_in` (training refuses it; sampling failed in the final decode)."""
    from diffusers import AutoencoderKL

    check_model_config(vae, "AutoencoderKL", "--vae: pass a VAE folder such as the teacher's vae/")
    variant = weights_variant(vae, allow_bin=True)
    model = AutoencoderKL.from_pretrained(vae, cache_dir=cache_dir, **({"variant": variant} if variant else {}), **_dtype_kwargs(dtype))
    if model.config.latent_channels != unet_in:
        raise ValueError(f"--vae {vae} has {model.config.latent_channels} latent channels but the UNet takes {unet_in} "
                         "input channels; pass a VAE of the teacher's latent space")
    return model


def load_pipeline(base: str, unet: str | None, lora: str | None, device: str, dtype: torch.dtype, lora_scale: float = 1.0,
                  vae: str | None = None, sampling: dict[str, Any] | None = None, index: dict[str, Any] | None = None,
                  vae_cache_dir: str | None = None) -> Any:
    """The base pipeline with the distilled UNet or the fused LoRA (and another VAE, a hub id of which is read through
    `vae_cache_dir`), on the run's scheduler (TCDScheduler, or LCMScheduler for an LCM-mode run; `run_sampling`) over its
    training grid."""
    from diffusers import UNet2DConditionModel

    from .validation import sampling_scheduler

    kw: dict[str, Any] = {}
    index = base_index(base) if index is None else index  # model_index.json, where the caller has not read it
    cls = pipeline_class(base, index)
    if unet:
        kw["unet"] = UNet2DConditionModel.from_pretrained(resolve_unet_dir(unet), **_dtype_kwargs(dtype))
        _check_unet_family(kw["unet"].config, cls, base)
        check_unet_fits(kw["unet"].config, UNet2DConditionModel.load_config(base, subfolder="unet"), base)
    if vae:
        unet_in = (kw["unet"].config if unet else UNet2DConditionModel.load_config(base, subfolder="unet"))["in_channels"]
        kw["vae"] = load_vae(vae, dtype, unet_in, vae_cache_dir)
    pipe = base_pipeline(cls, base, dtype, index, **kw)
    pipe.scheduler = sampling_scheduler(pipe.scheduler.config, **(sampling or run_sampling({})))
    if lora:
        load_unet_lora(pipe, lora, base)
        pipe.fuse_lora(lora_scale=lora_scale)  # fused: sampling runs at the base model's speed
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _check_unet_family(unet_config: Any, pipe_cls: Any, base: str) -> None:
    """An SDXL UNet (text_time added conditioning) needs an SDXL base and an SD UNet an SD base: refuse a mix in one line."""
    xl_unet = unet_family(unet_config) == "sdxl"
    xl_base = pipe_cls.__name__ == "StableDiffusionXLPipeline"
    if xl_unet != xl_base:
        raise ValueError(f"the UNet is an {'SDXL' if xl_unet else 'SD'} model but --base {base} is an {'SDXL' if xl_base else 'SD'} "
                         "pipeline (pass the teacher the UNet was distilled from)")


# UNet config fields that couple a UNet to its pipeline's text encoders: the base's own UNet has the widths they give.
_PROMPT_WIDTHS = {"cross_attention_dim": "prompt states",
                  "projection_class_embeddings_input_dim": "SDXL's pooled prompt and sizes"}


def check_unet_fits(unet_config: Any, base_config: Any, base: str, flag: str = "--base") -> None:
    """Refuse, in one line, a distilled UNet that takes other prompt-embedding widths than the text encoders of the base
    pipeline (`flag` `base`, whose own UNet's config is `base_config`) give: a teacher of the same family but another
    text encoder sampled into a "mat1 and mat2 shapes cannot be multiplied" traceback."""
    for key, what in _PROMPT_WIDTHS.items():
        if unet_config.get(key) != base_config.get(key):
            raise ValueError(f"the UNet takes {what} of width {unet_config.get(key)} ({key}) but the text encoders of {flag} "
                             f"{base} give {base_config.get(key)}; pass the teacher the UNet was distilled from as {flag}")


def read_prompts(prompts: list[str] | None, prompt_file: str | None, flag: str = "--prompt_file") -> list[str]:
    """`--prompt` values, then the non-empty lines of `prompt_file` (given as `flag`)."""
    out = list(prompts or [])
    if prompt_file:
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt
            text = Path(prompt_file).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:  # the bare codec message named neither the file nor the flag
            raise ValueError(f"{flag} {prompt_file} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ValueError(f"{flag} {prompt_file} cannot be read: {e.strerror or e}") from None
        out += [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not out:
        raise ValueError(f"no prompts in {flag} {prompt_file}" if prompt_file else "no prompts: pass --prompt (repeatable) or --prompt_file")
    return out


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "prompt"


@torch.no_grad()
def generate(args: argparse.Namespace) -> list[str]:
    """Sample every prompt (image i uses seed + i, so outputs do not depend on --batch_size); return the PNG paths."""
    device = str(resolve_device(args.device))  # a bad --device is the first thing reported
    prompts = read_prompts(args.prompt, args.prompt_file)
    check_seed("--seed", args.seed, TORCH_SEEDS, count=len(prompts), uses=f"for {len(prompts)} prompts (image i uses --seed + i)")
    unet, lora = local_output(args.unet), local_output(args.lora)
    run = run_config(unet or lora, lora is not None)  # first: a stopped run's folder is refused for why it has no weights
    if lora:
        lora_file(lora)  # a missing file, or a folder without the LoRA file: one line before any model loads
    base = args.base or run_teacher(run)
    if not base:
        raise ValueError("--base is required (no tcdistill_config.json next to --unet/--lora names the teacher)")
    vae = args.vae or run.get("pretrained_vae_model_name_or_path")
    for flag, given, path, what in (("--base", args.base, base, "teacher"), ("--vae", args.vae, vae, "VAE")):
        if not given:
            check_run_model_here(path, flag, what)
    check_not_single_file(base, "--base")
    check_not_single_file(vae, "--vae")
    dtype_name = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    dtype = DTYPES[dtype_name]
    sampling = run_sampling(run)
    if args.scheduler:
        sampling["distill_mode"] = args.scheduler
    # The prompt states the student was trained on (the run's --clip_skip) unless overridden; refused before any weights load.
    clip_skip, index = sampling_clip_skip(args.clip_skip, run), None
    if clip_skip is not None or (args.clip_skip is None and lora and not run):  # a lone kohya file's count needs the family
        index = base_index(base)
        family = "sdxl" if pipeline_class(base, index).__name__ == "StableDiffusionXLPipeline" else "sd"
        clip_skip = sampling_clip_skip(args.clip_skip, run, lora, family)
        if clip_skip is not None:
            check_clip_skip(clip_skip, base, family)
    lcm = sampling["distill_mode"] == "lcm"  # LCMScheduler re-noises fully: gamma does not apply
    if lcm and args.gamma is not None:  # it was dropped without a word (--lora_scale on a --unet is refused alike)
        why = "--scheduler lcm" if args.scheduler else "the run's --distill_mode lcm"
        raise ValueError(f"--gamma is TCD's; this samples with LCMScheduler ({why}), which has none: drop --gamma, or pass "
                         "--scheduler tcd")
    gamma = TCD_GAMMA if args.gamma is None else args.gamma
    grid = sampling["original_steps"]
    if args.steps > grid:
        raise ValueError(f"--steps {args.steps} exceeds the {grid} points of the training grid (the run's --num_ddim_timesteps)")
    check_output_dir(args.output_dir)  # the last check: it makes the folder
    # Two runs on one folder each rewrote metadata.jsonl without the lines of the images it replaces, dropping the lines
    # the other appended meanwhile: the second is refused in one line, before any weights load (released in `main`).
    lock_output_dir(args.output_dir, role="`tcdistill generate` run")
    # The run's VAE from the run's --cache_dir (where on this machine), as training loaded it; a --vae given here from the
    # default cache.
    pipe = load_pipeline(base, unet, lora, device, dtype, args.lora_scale, vae, sampling, index, None if args.vae else run_cache_dir(run))
    # diffusers' SD pipeline falls back to its default size for BOTH sides when either is None or 0: fill the
    # missing side here so that --height alone (or --width alone) is honoured, as the SDXL pipeline does. The default is
    # the size the run trained at; without a run config, the pipeline's (each side its own).
    size_h, size_w = sampling_hw(run.get("resolution"), pipe)
    height, width = args.height or size_h, args.width or size_w
    check_sample_size(pipe.unet.config, pipe.vae_scale_factor, height, width)  # before any image: a size the UNet cannot take
    gs = args.guidance_scale
    if gs is None:
        gs = run_guidance(run, FULL_MODEL_GUIDANCE) if unet and pipe.unet.config.time_cond_proj_dim else 0.0
    paths = []
    meta_path = Path(args.output_dir) / "metadata.jsonl"
    # An earlier run's lines of the images this one writes (by name) go first: a run killed part-way left its new images
    # described by the old run's lines (another seed, steps, model). Each batch's lines are added once its images are.
    drop_metadata_lines(meta_path, {_image_name(i, p) for i, p in enumerate(prompts)})
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        gens = [torch.Generator("cpu").manual_seed(args.seed + start + j) for j in range(len(batch))]
        images = pipe(**pipeline_prompts(pipe, batch, clip_skip), num_inference_steps=args.steps, guidance_scale=gs,
                      eta=gamma, generator=gens, height=height, width=width).images
        records = []
        for j, (prompt, image) in enumerate(zip(batch, images)):
            name = _image_name(start + j, prompt)
            with atomic_file(os.path.join(args.output_dir, name)) as tmp:  # a kill mid-save leaves no cut-short PNG
                image.save(tmp, format="PNG")
            paths.append(os.path.join(args.output_dir, name))
            # What sets the image (with the run's saved flags next to --unet/--lora): a line says how to make it again.
            records.append({"file_name": name, "prompt": prompt, "seed": args.seed + start + j, "steps": args.steps,
                            "scheduler": "lcm" if lcm else "tcd", "gamma": None if lcm else gamma, "guidance_scale": gs,
                            "height": height, "width": width, "dtype": dtype_name,
                            "base": args.base or run.get("pretrained_teacher_model"),
                            "base_revision": None if args.base else run.get("teacher_revision"), "unet": args.unet, "lora": args.lora,
                            "lora_scale": args.lora_scale if args.lora else None, "vae": vae, "clip_skip": clip_skip,
                            "train_step": run.get(FINAL_STEP)})  # which weights: the run's step at its final save
        with open(meta_path, "a", encoding="utf-8") as f:  # one write call: a kill leaves whole lines
            f.write("".join(json.dumps(r) + "\n" for r in records))
    return paths


def drop_metadata_lines(path: Path, names: set[str]) -> None:
    """Rewrite a metadata.jsonl (the imagefolder layout) without the lines of the files `names`, whole or not at all
    (a file made by hand may end without a newline: the lines appended next start on their own)."""
    old = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] if path.is_file() else []
    with atomic_file(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in old if _file_name(ln) not in names), encoding="utf-8")


def _image_name(i: int, prompt: str) -> str:
    return f"{i:05d}_{_slug(prompt)}.png"


def _file_name(line: str) -> Any:
    try:
        return json.loads(line).get("file_name")
    except (ValueError, AttributeError):  # a line that is not a JSON object is kept as it is
        return None


# What --unet / --lora take, in `generate` and `eval` alike (both resolve them with resolve_unet_dir / load_unet_lora).
UNET_HELP = "Distilled UNet folder (a full-model output folder means its unet_target/) or hub id (a UNet, or a pushed output)."
LORA_HELP = (f"LoRA output folder (with {LORA_WEIGHT_NAME}), a LoRA .safetensors file (diffusers or kohya keys), or the hub "
             "repo of a pushed output.")


VAE_HELP = ("Another VAE folder or hub id (default: the run's --pretrained_vae_model_name_or_path, a hub id read from its "
            "--cache_dir where that is on this machine; else the teacher's own).")
CLIP_SKIP_HELP = ("Encode prompts from the text encoder's hidden state this many layers before the last, as diffusers' "
                  "clip_skip; 0: none, the last layer (also for a run trained with --clip_skip). Default: the run's --clip_skip "
                  "from the tcdistill_config.json next to --unet/--lora; without one, a kohya --lora file's ss_clip_skip; else none.")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tcdistill generate", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--unet", help=UNET_HELP)
    src.add_argument("--lora", help=LORA_HELP)
    p.add_argument("--base", help="Base pipeline: diffusers folder or hub id (default: the teacher named in the run's tcdistill_config.json, at its --teacher_revision, from its --cache_dir where that is on this machine).")
    p.add_argument("--vae", help=VAE_HELP)
    p.add_argument("--prompt", action="append", help="A prompt (repeatable).")
    p.add_argument("--prompt_file", help="A text file with one prompt per line.")
    p.add_argument("--steps", type=int, default=4, help="TCD sampling steps (default: 4).")
    p.add_argument("--gamma", type=float, default=None,
                   help=f"TCD gamma, the scheduler's eta (0 = deterministic; default: {TCD_GAMMA}); refused with LCM sampling.")
    p.add_argument("--scheduler", choices=["tcd", "lcm"], default=None,
                   help="Sampler: tcd (TCDScheduler) or lcm (LCMScheduler; --gamma unused). Default: the run's --distill_mode, else tcd.")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help=f"Default: 0 for a LoRA (no CFG); {FULL_MODEL_GUIDANCE} for a full UNet with time_cond_proj_dim (embeds w = scale - 1), "
                        "moved into the run's [--w_min, --w_max] range of w.")
    p.add_argument("--lora_scale", type=float, default=1.0, help="Scale of the fused LoRA (default: 1).")
    p.add_argument("--clip_skip", type=int, default=None, help=CLIP_SKIP_HELP)
    p.add_argument("--seed", type=int, default=0, help="Image i uses seed + i (default: 0).")
    p.add_argument("--batch_size", type=int, default=1, help="Prompts per pipeline call (default: 1).")
    size = ("the run's --resolution (rounded down to a multiple of 8) from the tcdistill_config.json next to --unet/--lora, "
            "else the base pipeline's UNet sample_size x VAE factor")
    p.add_argument("--height", type=int, default=None, help=f"Image height (default: {size}).")
    p.add_argument("--width", type=int, default=None, help=f"Image width (default: {size}).")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Weights dtype (default: fp16 on CUDA, fp32 elsewhere).")
    p.add_argument("--output_dir", default="tcd-samples", help="Where the PNGs and metadata.jsonl go (default: tcd-samples).")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """`tcdistill generate (--unet DIR | --lora DIR) --prompt P [...]`: write PNGs and print their paths."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or not 0.0 <= (TCD_GAMMA if args.gamma is None else args.gamma) <= 1.0:
        p.error("need --steps >= 1, --batch_size >= 1 and --gamma in [0, 1]")
    if any(v is not None and v < 1 for v in (args.height, args.width)):
        p.error("--height and --width must be >= 1")
    if not all(math.isfinite(v) for v in (args.lora_scale, 0.0 if args.guidance_scale is None else args.guidance_scale)):
        p.error("--guidance_scale and --lora_scale must be finite")
    if args.unet and args.lora_scale != 1.0:  # it scales the fused LoRA: a full UNet has none, so it was silently ignored
        p.error("--lora_scale applies to --lora only (a full --unet has no LoRA to scale)")
    try:
        paths = generate(args)
    except (ValueError, OSError) as e:  # FileNotFoundError, a missing --base/--vae, an unreadable --prompt_file
        p.exit(2, f"{p.prog}: error: {first_line(e)}\n")
    finally:
        unlock_output_dir(args.output_dir)
    print("\n".join(paths))
