"""`tcdistill convert`: one original-format checkpoint file (A1111 / ComfyUI / CivitAI) -> a diffusers teacher folder.

A teacher distributed as a single `.safetensors` file becomes a diffusers pipeline folder, the form every tcdistill
command takes as the teacher (--pretrained_teacher_model, generate --base, eval --teacher, export --base).

The key conversion is diffusers' own (`StableDiffusionPipeline` / `StableDiffusionXLPipeline.from_single_file`). The file
holds only weights: the architecture, tokenizers and noise schedule come from a diffusers config (`--config`, a local
folder or hub id; without it diffusers infers the base model's hub repo from the file's keys, which needs the network
or a hub cache holding that repo's configs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import DefaultsHelpFormatter, OneLineParser, first_line

# Original-format checkpoints saved with torch.save: loading one unpickles it (code can run), so it is opt-in, as
# --allow_pickle_weights is for the other model flags.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."  # every SD / SDXL original-format checkpoint's UNet


def checkpoint_keys(path: str) -> list[str]:
    """The tensor names of an original-format checkpoint (a .safetensors header alone; a pickle's `state_dict`)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(sd, dict) and "state_dict" in sd:  # as diffusers' load_single_file_checkpoint unwraps it
        sd = sd["state_dict"]
    return list(sd) if isinstance(sd, dict) else []


def file_family(path: str, keys: Sequence[str]) -> str:
    """'sdxl' for SDXL's `conditioner.embedders.*` text encoders, else 'sd' (SD 1.x/2.x's `cond_stage_model.*`); a file
    without an original-format UNet (a LoRA, a lone VAE, a diffusers-format file) is refused."""
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ValueError(f"{path} holds no original-format Stable Diffusion UNet ({UNET_PREFIX}* weights): not an SD/SDXL "
                         "checkpoint (a LoRA, a lone VAE, or one model of a diffusers folder?)")
    return "sdxl" if any(k.startswith("conditioner.embedders.") for k in keys) else "sd"


def meta_weights(pipe: Any) -> dict[str, list[str]]:
    """Component -> its weights still on the meta device: diffusers leaves a text-encoder weight the file lacks there
    without a word, and the folder saved from it would fail to load (or train on garbage)."""
    out = {}
    for name, module in pipe.components.items():
        if hasattr(module, "state_dict"):
            missing = [k for k, t in module.state_dict().items() if t.is_meta]
            if missing:
                out[name] = missing
    return out


def convert(path: str, output_dir: str, config: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Load the single-file checkpoint `path` with diffusers' `from_single_file` (architecture from `config`) and save it
    as a diffusers folder at `output_dir` (written beside it and renamed into place); returns what was written."""
    import diffusers

    from .checkpoint import atomic_dir
    from .generate import PIPELINE_CLASSES, pipeline_class
    from .preflight import check_output_dir

    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: a diffusers pipeline folder is a teacher as it is (pass it as --pretrained_teacher_model)")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file (pass the .safetensors file of the model)")
    if path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise ValueError(f"{path} is a pickle checkpoint, whose loading can run code; use a .safetensors copy of it, or pass "
                         "--allow_pickle_weights if you trust its source")
    if not path.endswith((".safetensors", *PICKLE_SUFFIXES)):
        raise ValueError(f"{path}: expected a .safetensors checkpoint (or .ckpt with --allow_pickle_weights)")
    if os.path.isdir(output_dir) and any(os.scandir(output_dir)):  # the atomic rename would replace (delete) what is there
        raise ValueError(f"--output_dir {output_dir} exists and is not empty; name a new folder for the converted teacher")
    check_output_dir(output_dir, make=False)
    try:
        keys = checkpoint_keys(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError (a bad header), OSError, unpickling errors
        raise ValueError(f"{path} cannot be read as a checkpoint ({first_line(e)}): a file cut short or damaged?") from None
    family = file_family(path, keys)
    cls = getattr(diffusers, next(c for c, f in PIPELINE_CLASSES.values() if f == family))
    if config is not None:
        try:  # its model_index.json: a pipeline tcdistill samples, with its prompt encoders
            cls_config = pipeline_class(config)
        except (OSError, ValueError) as e:
            raise ValueError(f"--config {config}: not a diffusers pipeline folder or hub id this run can read ({first_line(e)})") from None
        if cls_config is not cls:
            raise ValueError(f"--config {config} is a {cls_config.__name__} but {path} is an {family.upper()} checkpoint; pass a "
                             f"config of its architecture")
    try:
        pipe = cls.from_single_file(path, config=config)
    except Exception as e:  # noqa: BLE001 - hub, key-mapping and size-mismatch errors of many types; the message matters
        if config is None:
            raise ValueError(f"cannot convert {path} without --config: diffusers found no configs for the base model it infers "
                             f"from the file's keys ({first_line(e)}); pass --config with a local diffusers folder of the same "
                             "architecture (the base model the fine-tune came from)") from None
        raise ValueError(f"cannot convert {path} with --config {config}: {first_line(e)}") from None
    missing = meta_weights(pipe)
    if missing:
        name, keys = next(iter(missing.items()))
        raise ValueError(f"{path} lacks {len(keys)} weight(s) of the {name} (such as {keys[0]}): a damaged or partial "
                         f"checkpoint, or --config of another architecture")
    with atomic_dir(output_dir) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return {"output_dir": output_dir, "family": family, "pipeline": cls.__name__,
            "prediction_type": pipe.scheduler.config.get("prediction_type")}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tcdistill convert", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoint", help="The model as one original-format .safetensors file (A1111 / ComfyUI / CivitAI).")
    p.add_argument("--output_dir", required=True, help="New folder for the diffusers pipeline (pass it as --pretrained_teacher_model).")
    p.add_argument("--config", default=None,
                   help="Diffusers folder or hub id of the same architecture (the fine-tune's base model); its tokenizers and "
                        "noise schedule (prediction type) are the converted teacher's. Default: the repo diffusers infers "
                        "from the file's keys (needs the network or a hub cache holding its configs).")
    p.add_argument("--allow_pickle_weights", action="store_true", help="Allow a pickle checkpoint (.ckpt/.pt/.pth/.bin).")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """`tcdistill convert FILE --output_dir DIR [--config DIR_OR_HUB_ID]`."""
    args = build_parser().parse_args(argv)
    try:
        out = convert(args.checkpoint, args.output_dir, args.config, args.allow_pickle_weights)
    except (ValueError, OSError) as e:
        sys.exit(f"tcdistill convert: error: {first_line(e)}")
    print(f"wrote {out['output_dir']}: a {out['pipeline']} (noise schedule and prediction_type {out['prediction_type']!r} "
          f"from {'--config' if args.config else 'the inferred base model'}); pass it as --pretrained_teacher_model "
          f"{Path(out['output_dir']).absolute()}")
