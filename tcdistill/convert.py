"""`tcdistill convert`: one original-format checkpoint file (A1111 / ComfyUI / CivitAI) -> a diffusers teacher folder.

A teacher distributed as a single `.safetensors` file becomes a diffusers pipeline folder, the form every tcdistill
command takes as the teacher (--pretrained_teacher_model, generate --base, eval --teacher, export --base); a lone VAE
file becomes a VAE folder (--pretrained_vae_model_name_or_path, generate --vae).

The key conversion is diffusers' own (`StableDiffusionPipeline` / `StableDiffusionXLPipeline.from_single_file`). The file
holds only weights: the architecture, tokenizers and noise schedule come from a diffusers config (`--config`, a local
folder or hub id; without it diffusers infers the base model's hub repo from the file's keys, which needs the network
or a hub cache holding that repo's configs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import pickle
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from .argparsing import DefaultsHelpFormatter, OneLineParser
from .config import first_line

# Original-format checkpoints saved with torch.save: loading one unpickles it (code can run), so it is opt-in, as
# --allow_pickle_weights is for the other model flags.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."  # every SD / SDXL original-format checkpoint's UNet
VAE_PREFIX = "first_stage_model."
# A file holds a second, EMA copy of the UNet (SD 1.5's v1-5-pruned: `model_ema.*`, dots dropped from the names) past this
# many `model_ema` keys: diffusers' own rule (convert_ldm_unet_checkpoint), which the choice below must agree with.
EMA_MIN_KEYS = 100
UNET_WEIGHTS = ("ema", "non_ema")


def has_ema(keys: Sequence[str]) -> bool:
    """Whether the file holds both EMA and training (non-EMA) UNet weights, as diffusers decides it."""
    return sum(k.startswith("model_ema") for k in keys) > EMA_MIN_KEYS


class _DropExtractEmaAdvice(logging.Filter):
    """diffusers' EMA notice advises an `--extract_ema` flag of its own scripts; convert says which set it took itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "extract_ema" not in record.getMessage()


class _Inert:
    """What an object of a class outside torch loads as from a trusted pickle checkpoint: its state is kept, nothing runs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


@functools.cache
def _weights_only_globals() -> frozenset[str]:
    """The globals torch's weights_only load allows (tensor rebuilds, storages, dtypes, containers), as `module.name`."""
    from torch import _weights_only_unpickler

    return frozenset(_weights_only_unpickler._get_allowed_globals())


class _InertUnpickler(pickle.Unpickler):
    """Lightning `.ckpt` files (the original SD releases) pickle their callbacks' classes beside the weights, such as
    pytorch_lightning's ModelCheckpoint: torch's weights_only load refuses them, and Lightning is not installed here. Only
    what weights_only allows loads as itself; any other global loads as `_Inert`, so nothing in the file runs. (Allowing
    every `torch.*` name let a file call any function reachable from torch, `torch.serialization` + `os.system` included.)"""

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" in _weights_only_globals():
            return super().find_class(module, name)
        return _Inert


def load_pickle_checkpoint(path: str) -> tuple[dict[str, Any], bool]:
    """A pickle checkpoint's tensors, its `state_dict` wrapper(s) unwrapped as diffusers' load_single_file_checkpoint does,
    and whether torch's weights_only load (diffusers' own) read it."""
    import torch

    try:
        sd, safe = torch.load(path, map_location="cpu", weights_only=True), True
    except pickle.UnpicklingError:  # a class weights_only refuses: the caller opted in to pickles (--allow_pickle_weights)
        inert = ModuleType("inert_pickle")
        inert.Unpickler, inert.load = _InertUnpickler, pickle.load
        sd, safe = torch.load(path, map_location="cpu", weights_only=False, pickle_module=inert), False
    while isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return ({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(sd, dict) else {}), safe


def safetensors_keys(path: str) -> list[str]:
    """The tensor names of a .safetensors checkpoint, from its header alone (a damaged header raises)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def file_kind(path: str, keys: Sequence[str]) -> str:
    """'sdxl' for SDXL's `conditioner.embedders.*` text encoders, 'sd' for SD 1.x/2.x (`cond_stage_model.*`), 'vae' for a
    lone VAE (`encoder.*` / `decoder.*`, as vae-ft-mse or sdxl_vae.safetensors); anything else is refused."""
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "sdxl" if any(k.startswith("conditioner.embedders.") for k in keys) else "sd"
    if any(k.startswith(("encoder.conv_in.", "first_stage_model.encoder.conv_in.")) for k in keys):
        return "vae"
    raise ValueError(f"{path} holds no original-format Stable Diffusion UNet ({UNET_PREFIX}* weights) or VAE: not an SD/SDXL "
                     "checkpoint (a LoRA, or one model of a diffusers folder?)")


def meta_weights(modules: dict[str, Any]) -> dict[str, list[str]]:
    """Component -> its weights still on the meta device: diffusers leaves a text-encoder weight the file lacks there
    without a word, and the folder saved from it would fail to load (or train on garbage)."""
    out = {}
    for name, module in modules.items():
        if hasattr(module, "state_dict"):
            missing = [k for k, t in module.state_dict().items() if t.is_meta]
            if missing:
                out[name] = missing
    return out


def _config_error(path: str, config: str, e: Exception) -> ValueError:
    """A failed `from_single_file` with --config as one line; a size mismatch (an inpainting file on a text-to-image config)
    loses diffusers' advice to load it with random weights instead and says which flag to change."""
    msg = first_line(e)
    if "expected shape" in msg:
        msg = msg.split(". If you want")[0] + "; pass the --config of the model this file was fine-tuned from"
    return ValueError(f"cannot convert {path} with --config {config}: {msg}")


def _load_pipeline(path: str, family: str, config: str | None, keys: Sequence[str], unet_weights: str) -> tuple[Any, str]:
    """The checkpoint as the family's diffusers pipeline (the UNet's `unet_weights` set where the file holds both, --config's
    VAE where it holds none), and a line on where its schedule and weights came from."""
    import diffusers

    from .generate import PIPELINE_CLASSES, base_index, pipeline_class

    cls = getattr(diffusers, next(c for c, f in PIPELINE_CLASSES.values() if f == family))
    if config is not None:
        try:  # its model_index.json: a pipeline tcdistill samples, with its prompt encoders
            cls_config = pipeline_class(config, base_index(config))
        except (OSError, ValueError) as e:
            raise ValueError(f"--config {config}: not a diffusers pipeline folder or hub id this run can read ({first_line(e)})") from None
        if cls_config is not cls:
            raise ValueError(f"--config {config} is a {cls_config.__name__} but {path} is an {family.upper()} checkpoint; pass a "
                             f"config of its architecture")
    extra, notes = {}, []
    if not any(k.startswith(VAE_PREFIX) for k in keys):  # many fine-tunes ship without one: they kept their base model's
        if config is None:
            raise ValueError(f"{path} holds no VAE ({VAE_PREFIX}* weights): pass --config, the base model it was fine-tuned "
                             "from, whose VAE the converted teacher then uses")
        try:
            extra["vae"] = diffusers.AutoencoderKL.from_pretrained(config, subfolder="vae")
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} holds no VAE and --config {config} gives none ({first_line(e)}); pass a --config with "
                             "its vae/ weights") from None
        notes.append("VAE from --config: the file holds none")
    if has_ema(keys):
        extra["extract_ema"] = unet_weights == "ema"
        notes.append({"ema": "UNet: the file's EMA weights (--unet_weights non_ema for its training weights)",
                      "non_ema": "UNet: the file's non-EMA training weights, not its EMA ones"}[unet_weights])
    advice = _DropExtractEmaAdvice()
    logging.getLogger("diffusers.loaders.single_file_utils").addFilter(advice)
    try:
        pipe = cls.from_single_file(path, config=config, **extra)
    except Exception as e:  # noqa: BLE001 - hub, key-mapping and size-mismatch errors of many types; the message matters
        if config is None:
            raise ValueError(f"cannot convert {path} without --config: diffusers found no configs for the base model it infers "
                             f"from the file's keys ({first_line(e)}); pass --config with a local diffusers folder of the same "
                             "architecture (the base model the fine-tune came from)") from None
        raise _config_error(path, config, e) from None
    finally:
        logging.getLogger("diffusers.loaders.single_file_utils").removeFilter(advice)
    source = "--config" if config else "the inferred base model"
    notes.insert(0, f"noise schedule and prediction_type {pipe.scheduler.config.get('prediction_type')!r} from {source}")
    return pipe, f"a {cls.__name__} ({'; '.join(notes)}); pass it as --pretrained_teacher_model"


def _load_vae(path: str, config: str | None) -> tuple[Any, str]:
    """A lone VAE file as an AutoencoderKL, its config (scaling factor) from --config: a pipeline's vae/ or a VAE folder."""
    from diffusers import AutoencoderKL

    if config is None:  # diffusers would take SD 1.5's VAE config for any VAE file: an SDXL VAE's scaling factor differs
        raise ValueError(f"{path} is a lone VAE: pass --config, the diffusers folder or hub id of its base model (or of a VAE), "
                         "whose config gives its latent scaling factor (SD's and SDXL's differ)")
    errors = []
    for sub in ("vae", None):  # a pipeline's VAE, else a VAE folder itself
        try:
            name = AutoencoderKL.load_config(config, subfolder=sub).get("_class_name")
        except (OSError, ValueError) as e:
            errors.append(first_line(e))
            continue
        if name not in (None, "AutoencoderKL"):  # load_config reads any config.json: a UNet's built no VAE
            errors.append(f"{sub or 'its'} config.json is a {name}'s")
            continue
        try:
            vae = AutoencoderKL.from_single_file(path, config=config, subfolder=sub)
        except Exception as e:  # noqa: BLE001 - key-mapping and size-mismatch errors
            raise _config_error(path, config, e) from None
        return vae, (f"an AutoencoderKL (scaling_factor {vae.config.scaling_factor} from --config); pass it as "
                     "--pretrained_vae_model_name_or_path or generate --vae")
    raise ValueError(f"--config {config}: no VAE config in it or its vae/ ({errors[-1]})")


def convert(path: str, output_dir: str, config: str | None = None, allow_pickle: bool = False, unet_weights: str = "ema") -> str:
    """Load the single-file checkpoint `path` with diffusers' `from_single_file` (architecture from `config`; of a file
    holding EMA and training UNet weights, the `unet_weights` set) and save it as a diffusers folder (a pipeline, or a lone
    VAE's model folder) at `output_dir`, written beside it and renamed into place; returns a line on what was written."""
    from .checkpoint import atomic_dir
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
        raise ValueError(f"--output_dir {output_dir} exists and is not empty; name a new folder for the converted model")
    check_output_dir(output_dir, make=False)
    tensors, safe = None, True
    try:
        if path.endswith(".safetensors"):
            keys = safetensors_keys(path)
        else:
            tensors, safe = load_pickle_checkpoint(path)
            keys = list(tensors)
    except Exception as e:  # noqa: BLE001 - SafetensorError (a bad header), OSError, unpickling errors
        raise ValueError(f"{path} cannot be read as a checkpoint ({first_line(e)}): a file cut short or damaged?") from None
    kind = file_kind(path, keys)
    with contextlib.ExitStack() as stack:
        source = path
        if not safe:  # diffusers loads pickles weights_only: it gets the tensors read above as a .safetensors copy
            from safetensors.torch import save_file

            parent = Path(output_dir).absolute().parent  # beside the output: /tmp may be too small for a model
            parent.mkdir(parents=True, exist_ok=True)
            source = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(dir=parent)), Path(path).stem + ".safetensors")
            save_file({k: v.contiguous() for k, v in tensors.items()}, source)
        del tensors
        try:
            model, what = _load_vae(source, config) if kind == "vae" else _load_pipeline(source, kind, config, keys, unet_weights)
        except ValueError as e:  # its messages name the file the user gave
            raise ValueError(str(e).replace(source, path)) from None
        missing = meta_weights({"vae": model} if kind == "vae" else model.components)
        if missing:
            name, names = next(iter(missing.items()))
            raise ValueError(f"{path} lacks {len(names)} weight(s) of the {name} (such as {names[0]}): a damaged or partial "
                             f"checkpoint, or --config of another architecture")
        with atomic_dir(output_dir) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
    return f"wrote {output_dir}: {what} {Path(output_dir).absolute()}"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tcdistill convert", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoint", help="The model (or a lone VAE) as one original-format .safetensors file (A1111 / ComfyUI / CivitAI).")
    p.add_argument("--output_dir", required=True, help="New folder for the diffusers pipeline (pass it as --pretrained_teacher_model) "
                   "or VAE (--pretrained_vae_model_name_or_path, generate --vae).")
    p.add_argument("--config", default=None,
                   help="Diffusers folder or hub id of the same architecture (the fine-tune's base model); its tokenizers and "
                        "noise schedule (prediction type) are the converted teacher's. Default: the repo diffusers infers "
                        "from the file's keys (needs the network or a hub cache holding its configs); a lone VAE needs it, as does a "
                        "file without a VAE, which then takes --config's.")
    p.add_argument("--unet_weights", choices=UNET_WEIGHTS, default="ema",
                   help="For a file holding two UNets (SD 1.5's v1-5-pruned: model_ema.* beside the training weights): ema, the "
                        "published model's (what an emaonly file holds), or non_ema, the raw training weights. A file with one set "
                        "takes it either way.")
    p.add_argument("--allow_pickle_weights", action="store_true", help="Allow a pickle checkpoint (.ckpt/.pt/.pth/.bin).")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """`tcdistill convert FILE --output_dir DIR [--config DIR_OR_HUB_ID]`."""
    args = build_parser().parse_args(argv)
    try:
        print(convert(args.checkpoint, args.output_dir, args.config, args.allow_pickle_weights, args.unet_weights))
    except (ValueError, OSError) as e:
        sys.exit(f"tcdistill convert: error: {first_line(e)}")
