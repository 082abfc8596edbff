"""`tcdistill export`: a trained LoRA's diffusers file -> the kohya key format that ComfyUI and A1111 load.

Keys go `unet.<module>.lora_A.weight` -> `lora_unet_<module_with_underscores>.lora_down.weight` (and lora_B ->
lora_up) through diffusers' own `convert_state_dict_to_kohya`; each module gets an `.alpha` so that kohya's scale
`alpha / rank` equals the scale PEFT trained with (diffusers' converter writes alpha = rank, i.e. scale 1, which is
wrong whenever --lora_alpha != --lora_rank).

SDXL modules are named as kohya's own SDXL LoRAs name them, after the original (sgm) UNet: `lora_unet_input_blocks_4_1_...`,
`lora_unet_output_blocks_2_2_conv`. A1111 maps diffusers-style names to its UNet with SD 1.x's block layout, and so
silently dropped SDXL's first up-block upsampler (its `output_blocks.2.2.conv`, not SD 1.x's `.2.1.conv`); sgm names it
matches directly, as ComfyUI and diffusers' kohya loader do.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import atomic_file, checkpoint_hint
from .argparsing import DefaultsHelpFormatter, OneLineParser
from .config import check_not_single_file, first_line

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_SOURCE_KEY = "tcdistill_lora_file"  # a kohya export's metadata: the name of the diffusers LoRA file it was made from


def lora_file(path: str | os.PathLike) -> Path:
    """The diffusers LoRA file of a training output (a folder) or the file itself."""
    p = Path(path)
    f = p / LORA_WEIGHT_NAME if p.is_dir() else p
    if not f.is_file():
        # A full-model run's folder is a training output too: say what it holds, not only what was expected.
        unet = next((d for d in (p / "unet_target", p / "unet") if (d / "config.json").is_file()), None)
        hint = (f"; {p} is a full-model output (its UNet: {unet}), not a LoRA: `tcdistill export` converts LoRAs only (a full "
                "UNet loads in diffusers as it is; sample it with generate --unet)") if unet else checkpoint_hint(p)
        raise FileNotFoundError(f"no LoRA weights at {f} (expected a training output folder or a .safetensors file){hint}")
    return f


def load_unet_lora(pipe: Any, lora: str | os.PathLike, onto: str, flag: str = "--base") -> Path:
    """`pipe.load_lora_weights` of `lora_file(lora)`, with its failures as one ValueError (a size mismatch: a LoRA of
    another base model, `onto`, given as `flag`) and a file that gave the UNet no adapter refused: diffusers only warns
    ("No LoRA keys associated to UNet2DConditionModel found") and the base model would sample as if it were the student.
    Returns the file."""
    f = lora_file(lora)  # a missing path is one line here, not diffusers' hub/offline message
    unmappable = _sgm_unmappable(f, pipe.unet.config)
    if unmappable:
        raise ValueError(f"cannot load the LoRA {lora} onto {onto}: its kohya keys name the original SDXL UNet's blocks, which "
                         f"diffusers maps back only for SDXL's layout: {unmappable}; load the diffusers file {LORA_WEIGHT_NAME} "
                         "of its training output instead")
    try:
        pipe.load_lora_weights(str(f.parent), weight_name=f.name)
    except (RuntimeError, ValueError, KeyError, OSError) as e:  # size mismatch (an SDXL LoRA on SD), not a LoRA file...
        if "size mismatch" in str(e):  # diffusers' first line names no module ("Error(s) in loading state_dict for ...")
            from safetensors.torch import load_file

            check_lora_fits(_peft_keys(load_file(str(f))), dict(pipe.unet.config), f"{flag} {onto}", flag)
        hint = " (size mismatch: a LoRA trained on another base model?)" if "size mismatch" in str(e) else ""
        raise ValueError(f"cannot load the LoRA {lora} onto {onto}: {first_line(e)}{hint}") from None
    if not getattr(pipe.unet, "peft_config", None):
        raise ValueError(f"{f} has no UNet LoRA weights in diffusers or kohya form (a training checkpoint's "
                         f"lora.safetensors is resume state, not a LoRA to load; use an output's {LORA_WEIGHT_NAME})")
    # A file lacking some modules' lora_A or lora_B loads without a word, those weights left on the meta device: sampling
    # then failed in `pipe.to()` with a "Cannot copy out of meta tensor" traceback.
    missing = [n for n, t in [*pipe.unet.named_parameters(), *pipe.unet.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{f} is not a complete LoRA file: {len(missing)} adapter weight(s) are missing from it, such as "
                         f"{missing[:2]}; copy it again from its training output")
    return f


def safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]] | None:
    """A .safetensors file's tensor names and metadata, from its header alone; None where it cannot be read as one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys()), fh.metadata() or {}
    except Exception:  # noqa: BLE001 - safetensors' SafetensorError is neither an OSError nor a ValueError
        return None


def _sgm_unmappable(f: Path, unet_config: Any) -> str | None:
    """What of the UNet's layout diffusers cannot map the kohya file `f`'s original-UNet (sgm) module names back onto, or
    None (also for a file without such names: SD's kohya names are diffusers'). diffusers' mapping assumes SDXL's own
    layout: it adds 1 to `layers_per_block` (a per-level list failed with a TypeError traceback), gathers each block's keys
    by its number as a prefix (10 or more blocks failed with a KeyError), and takes an output block's second module for
    attention, so the upsampler of an up block without cross-attention went to a module that does not exist (diffusers
    only warns: the LoRA loaded without it, silently)."""
    header = safetensors_header(f)
    if header is None:  # an unreadable file is reported by the load that follows
        return None
    modules = {k.split(".")[0] for k in header[0]}
    if not any(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for m in modules):
        return None
    per = unet_config["layers_per_block"]
    if isinstance(per, (list, tuple)):
        return f"one layers_per_block on every level (this UNet's is {list(per)})"
    for kind in ("input_blocks", "output_blocks"):  # diffusers gathers block N's keys by substring: N = 1 takes 10's too
        ids = {int(m.split("_")[4]) for m in modules if m.startswith(f"lora_unet_{kind}_")}
        clash = sorted((a, b) for a in ids for b in ids if a != b and str(b).startswith(str(a)))
        if clash:
            return (f"at most 10 {kind.replace('_', ' ')} (this UNet has {max(ids) + 1}; diffusers reads the keys of {kind}.{clash[0][1]} "
                    f"as {kind}.{clash[0][0]}'s)")
    for i, kind in enumerate(unet_config["up_block_types"][:-1]):  # the last up block has no upsampler
        name = "lora_unet_" + sgm_module_name(f"up_blocks.{i}.upsamplers.0.conv", unet_config).replace(".", "_")
        if "CrossAttn" not in kind and name in modules:
            return f"upsamplers only in cross-attention up blocks (this UNet's up block {i}, a {kind}, has one)"
    return None


def _unet_adapter_config(metadata: dict[str, str] | None) -> dict[str, Any]:
    """The UNet adapter's PEFT config from the file's `lora_adapter_metadata` ({} when the file has none)."""
    if not metadata or _METADATA_KEY not in metadata:
        return {}
    packed = json.loads(metadata[_METADATA_KEY])
    return {k[len("unet."):]: v for k, v in packed.items() if k.startswith("unet.")}


def _peft_scale(module: str, rank: int, conf: dict[str, Any]) -> float:
    """PEFT's LoRA scale for `module` (lora_alpha / r, or / sqrt(r) with rsLoRA, honouring rank/alpha patterns)."""
    if not conf:
        return 1.0  # diffusers loads a file without metadata with lora_alpha = r
    from peft.utils.other import get_pattern_key

    alpha = conf.get("lora_alpha", rank)
    if conf.get("alpha_pattern"):
        alpha = conf["alpha_pattern"].get(get_pattern_key(conf["alpha_pattern"].keys(), module), alpha)
    return alpha / (rank**0.5 if conf.get("use_rslora") else rank)


_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_SGM_BASIC = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sgm_module_name(module: str, unet_config: Any) -> str:
    """A diffusers UNet module path -> its name in the original (sgm/ldm) UNet: `down_blocks.1.attentions.0.x` ->
    `input_blocks.4.1.x` for SDXL's layout (input/output block numbers from `layers_per_block`; an up block's upsampler
    follows its attention, if it has one)."""
    if module in _SGM_BASIC:
        return _SGM_BASIC[module]
    n_blocks = len(unet_config["down_block_types"])
    per = unet_config["layers_per_block"]
    per = list(per) if isinstance(per, (list, tuple)) else [per] * n_blocks
    parts = module.split(".")

    def inner(kind: str, rest: list[str]) -> str:
        rest = [*_SGM_RESNET.get(rest[0], rest[0]).split("."), *rest[1:]] if kind == "resnets" else rest
        return ".".join(rest)

    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        first = 1 + sum(p + 1 for p in per[:i])
        if kind == "downsamplers":
            return f"input_blocks.{first + per[i]}.0.op"
        return f"input_blocks.{first + int(parts[3])}.{1 if kind == 'attentions' else 0}.{inner(kind, parts[4:])}"
    if parts[0] == "mid_block":
        j = int(parts[2])
        return f"middle_block.1.{inner('attentions', parts[3:])}" if parts[1] == "attentions" else f"middle_block.{2 * j}.{inner('resnets', parts[3:])}"
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        rev = per[::-1]
        first = sum(p + 1 for p in rev[:i])  # an up block has one layer more than its down block
        if kind == "upsamplers":
            return f"output_blocks.{first + rev[i]}.{2 if 'CrossAttn' in unet_config['up_block_types'][i] else 1}.conv"
        return f"output_blocks.{first + int(parts[3])}.{1 if kind == 'attentions' else 0}.{inner(kind, parts[4:])}"
    raise ValueError(f"no original-UNet name for the LoRA module {module!r}")


def _peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Files written through convert_state_dict_to_diffusers name the attention projections `.lora.down/.lora.up`: the
    state dict with PEFT's `lora_A/lora_B` names throughout."""
    return {k.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight"): v
            for k, v in state_dict.items()}


def check_lora_fits(state_dict: dict[str, torch.Tensor], unet_config: Any, base: str, flag: str = "--base") -> None:
    """Refuse a diffusers UNet LoRA (PEFT's key names, `_peft_keys`) whose modules are not in the UNet of `unet_config`
    (the model `base`, given as `flag`), or have other in/out widths there: an SD LoRA exported with an SDXL --base got
    SDXL's module names and base tag, silently."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the layout only: no weights allocated
        modules = dict(UNet2DConditionModel.from_config(unet_config).named_modules())
    for key, down in state_dict.items():
        if not (key.startswith("unet.") and key.endswith(".lora_A.weight")):
            continue  # to_kohya names what it cannot convert
        name = key[len("unet."):-len(".lora_A.weight")]
        weight = getattr(modules.get(name), "weight", None)
        up = state_dict.get(key.replace(".lora_A.", ".lora_B."))
        if weight is None or down.shape[1] != weight.shape[1] or (up is not None and up.shape[0] != weight.shape[0]):
            found = "no such module" if weight is None else f"weight {list(weight.shape)}"
            raise ValueError(f"the LoRA does not fit the UNet of {base}: its module {name} ({found} there) belongs to another "
                             f"base model; pass the model it was trained on as {flag}")


def to_kohya(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
             unet_config: Any = None, base: str | None = None) -> dict[str, torch.Tensor]:
    """Diffusers/PEFT UNet LoRA state dict -> kohya keys with per-module `alpha` = PEFT scale x rank. With an SDXL
    `unet_config` (text_time added conditioning) the modules get their original-UNet names, as kohya's SDXL LoRAs.
    With `base` (the model of `unet_config`), first refuse a LoRA that does not fit that UNet (`check_lora_fits`)."""
    from diffusers.utils import convert_state_dict_to_kohya

    state_dict = _peft_keys(state_dict)
    if unet_config is not None and base is not None:
        check_lora_fits(state_dict, unet_config, base)
    conf = _unet_adapter_config(metadata)
    if conf.get("use_dora"):
        raise ValueError("DoRA adapters have no faithful kohya LoRA form; export the plain LoRA only")
    bad = [k for k in state_dict if not k.startswith("unet.") or not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise ValueError(f"not a diffusers UNet LoRA file (unexpected keys such as {bad[:3]})")
    unpaired = sorted({k.rsplit(".lora_", 1)[0] for k in state_dict} - {k[:-len(".lora_A.weight")] for k in state_dict
                       if k.endswith(".lora_A.weight") and k[:-len("A.weight")] + "B.weight" in state_dict})
    if unpaired:
        raise ValueError(f"not a complete LoRA file: {len(unpaired)} module(s) lack their lora_A or lora_B weight, such as {unpaired[:3]}")
    from .families import unet_family

    sgm = unet_config is not None and unet_family(unet_config) == "sdxl"
    out: dict[str, torch.Tensor] = {}
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        up_key = key.replace(".lora_A.weight", ".lora_B.weight")
        pair = convert_state_dict_to_kohya({key: down, up_key: state_dict[up_key]})
        rank = down.shape[0]
        module = key[len("unet."):-len(".lora_A.weight")]
        if sgm:
            name = "lora_unet_" + sgm_module_name(module, unet_config).replace(".", "_")
            pair = {name + k[k.index("."):]: v for k, v in pair.items()}
        for k, v in pair.items():
            # kohya scales by alpha / rank: pick alpha so that equals the scale the adapter was trained with.
            out[k] = torch.tensor(_peft_scale(module, rank, conf) * rank, dtype=torch.float32) if k.endswith(".alpha") else v.contiguous()
    return out


# Cross-attention width -> kohya's base-model tags (sd-scripts' ss_base_model_version, and ss_v2 for the SD versions).
_KOHYA_BASE = {768: {"ss_base_model_version": "sd_v1", "ss_v2": "False"}, 1024: {"ss_base_model_version": "sd_v2", "ss_v2": "True"},
               2048: {"ss_base_model_version": "sdxl_base_v1-0"}}


def kohya_base_tags(state_dict: dict[str, torch.Tensor], unet_config: Any = None) -> dict[str, str]:
    """The metadata by which A1111 tells an SD 1.x, 2.x and SDXL LoRA apart. Its Lora tab hides, by default, a LoRA of
    another version than the loaded model's, and it takes a file with metadata but no such tag for SD 1.x: an SDXL or SD 2.x
    kohya file was hidden while its own base model was loaded. From the UNet config, else from the cross-attention width
    of the LoRA's attn2.to_k/to_v (768 SD 1.x, 1024 SD 2.x, 2048 SDXL); {} when neither tells."""
    if unet_config is not None:
        from .families import unet_family

        if unet_family(unet_config) == "sdxl":
            return dict(_KOHYA_BASE[2048])
        dim = unet_config.get("cross_attention_dim")
        width = {dim} if isinstance(dim, int) else set()  # a per-block list: no single width to go by
    else:
        width = {v.shape[1] for k, v in state_dict.items() if re.search(r"attn2\.to_[kv]\.lora(_A|\.down)\.weight$", k)}
    return dict(_KOHYA_BASE.get(width.pop(), {})) if len(width) == 1 else {}


def a1111_clip_skip(clip_skip: int, family: str) -> int:
    """diffusers' clip_skip N (--clip_skip) in kohya's and A1111's count, whose "Clip skip" K takes hidden_states[-K] (2:
    the penultimate layer; ComfyUI's CLIPSetLastLayer: -K): N + 1 on SD, N + 2 on SDXL (whose default is the penultimate)."""
    return clip_skip + (2 if family == "sdxl" else 1)


def kohya_file_clip_skip(lora: str | os.PathLike, family: str) -> int | None:
    """diffusers' clip_skip that a LoRA file's own ss_clip_skip (kohya's count, `a1111_clip_skip`) names, else None (no or
    "None" tag, a diffusers file, the family's default layer): what a kohya file away from its run record was trained at."""
    try:
        header = safetensors_header(lora_file(lora))
    except FileNotFoundError:  # loading it says so in one line
        return None
    tag = header[1].get("ss_clip_skip", "None") if header else "None"  # not a safetensors file: loading it says so
    n = int(tag) - a1111_clip_skip(0, family) if tag.isdigit() else 0
    return n if n >= 1 else None


def kohya_clip_skip_tag(run: dict[str, Any]) -> dict[str, str]:
    """sd-scripts' ss_clip_skip (its `str(args.clip_skip)`: "None" without clip skip), which A1111 and ComfyUI users read
    from the file, in its count (`a1111_clip_skip`); {} where no run record (`run`, the run's saved flags) tells."""
    if not run:
        return {}
    n = run.get("clip_skip")  # a record from before the flag: none
    return {"ss_clip_skip": "None" if n is None else str(a1111_clip_skip(int(n), run.get("model_family", "sd")))}


def run_unet_config(run: dict[str, Any]) -> dict[str, Any] | None:
    """The UNet config of the teacher an SDXL training output was distilled from, named by its saved flags `run` (the
    tcdistill_config.json beside or above the LoRA file, `run_outputs.run_config`); None for an SD run or no run config."""
    if run.get("model_family") != "sdxl":
        return None
    from diffusers import UNet2DConditionModel

    from .run_outputs import run_cache_dir

    teacher = run.get("pretrained_teacher_model")
    try:  # the run's --cache_dir only where it is on this machine, as generate reads the teacher (`run_teacher`)
        return dict(UNet2DConditionModel.load_config(teacher, subfolder="unet", revision=run.get("teacher_revision"),
                                                     cache_dir=run_cache_dir(run)))
    except Exception as e:  # noqa: BLE001 - a missing folder, an uncached hub id offline...
        # diffusers-style names still load in ComfyUI and diffusers (A1111 misses SDXL's first up-block upsampler)
        print(f"warning: cannot read the UNet config of the SDXL teacher {teacher!r} ({type(e).__name__}); the kohya file "
              "keeps diffusers-style module names, which A1111 maps only in part for SDXL", file=sys.stderr)
        return None


def _sdxl_like(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the LoRA's attention layers sit where SDXL's do (none in down block 0, some in block 1)."""
    # SD 1.x/2.x have attention in down block 0. Only a hint: a small SD-family UNet may be laid out so too.
    return (any(k.startswith("unet.down_blocks.1.attentions.") for k in state_dict)
            and not any(k.startswith("unet.down_blocks.0.attentions.") for k in state_dict))


def base_unet_config(base: str) -> dict[str, Any]:
    """The UNet config of the pipeline `base` (a diffusers folder or hub id), for naming an SDXL LoRA's modules."""
    from diffusers import UNet2DConditionModel

    check_not_single_file(base, "--base")
    try:
        return dict(UNet2DConditionModel.load_config(base, subfolder="unet"))
    except Exception as e:  # noqa: BLE001 - a missing folder, an uncached hub id offline, not a pipeline...
        raise ValueError(f"--base {base}: cannot read its unet/config.json ({first_line(e)})") from None


def export_kohya(src: str | os.PathLike, dst: str | os.PathLike | None = None, unet_config: Any = None,
                 base: str = "the given UNet config", run: dict[str, Any] | None = None) -> str:
    """Write the kohya-format copy of a diffusers LoRA file (default: `pytorch_lora_weights_kohya.safetensors` beside it).
    `unet_config`: the LoRA's UNet config, of the model `base` (default: an SDXL run's teacher's, `run_unet_config`).
    `run`: the run's flags (default: the tcdistill_config.json beside or above the file, `run_outputs.run_config`)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    f = lora_file(src)
    dst = Path(dst) if dst else f.with_name(KOHYA_WEIGHT_NAME)
    if dst.is_dir():
        raise ValueError(f"--output {dst} is a directory (give the file to write)")
    if dst.exists() and dst.resolve() == f.resolve():
        raise ValueError(f"--output {dst} is the input file: exporting would overwrite the diffusers LoRA")
    try:
        with safe_open(str(f), framework="pt") as fh:
            metadata = fh.metadata()
            state_dict = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError is neither an OSError nor a ValueError
        raise ValueError(f"cannot read {f} as a safetensors file: {type(e).__name__}: {e}") from None
    if run is None:  # a folder a live run holds has no finished LoRA (an earlier run's): refused
        from .run_outputs import refuse_live_run, run_config

        refuse_live_run(f)
        try:
            run = run_config(str(f))
        except ValueError as e:  # a damaged record: with `unet_config` (--base) only ss_clip_skip needs it, left out
            if unet_config is None:
                raise
            print(f"warning: {first_line(e).split(';')[0]}; the kohya file gets no ss_clip_skip", file=sys.stderr)
            run = {}
    if unet_config is None:
        unet_config, base = run_unet_config(run), f"the run's teacher {run.get('pretrained_teacher_model')}"
        if unet_config is None and _sdxl_like(state_dict) and not run.get("model_family"):
            print(f"warning: no tcdistill_config.json beside {f} names its base model; if it is an SDXL LoRA, pass --base "
                  "SDXL_MODEL so that its modules get kohya's SDXL names (A1111 maps diffusers-style names only in part for "
                  "SDXL)", file=sys.stderr)
    try:
        out = to_kohya(state_dict, metadata, unet_config, base)
    except ValueError as e:  # a checkpoint's lora.safetensors (bare PEFT keys) is resume state: say where the LoRA is
        raise ValueError(f"{e}{checkpoint_hint(f.parent)}") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dst) as tmp:  # never a half-written file under the final name
        # The source by name only where it is the LoRA beside the export (`folder_exports`): another folder's LoRA has the
        # same default name, and its export here was taken for this folder's and rewritten at the next save.
        beside = {_SOURCE_KEY: f.name} if dst.parent.resolve() == f.parent.resolve() else {}
        tags = {"format": "pt", "ss_network_module": "networks.lora", **beside, **kohya_base_tags(state_dict, unet_config),
                **kohya_clip_skip_tag(run)}
        save_file(out, str(tmp), metadata=tags)
    return str(dst)


def folder_exports(lora: str | os.PathLike) -> list[str]:
    """The names of the kohya exports of the diffusers LoRA file `lora` in its own folder: KOHYA_WEIGHT_NAME and each
    .safetensors there whose metadata names `lora` as its source (`tcdistill export --output` into the folder). Training
    rewrites them with the LoRA it saves: a re-run left them exports of the earlier LoRA, off its card but in its push."""
    def source(p: Path) -> str | None:
        header = safetensors_header(p)  # None: not a safetensors file, so not an export
        return header[1].get(_SOURCE_KEY) if header else None

    lora = Path(lora)
    return [p.name for p in sorted(lora.parent.glob("*.safetensors"))
            if p.name != lora.name and (p.name == KOHYA_WEIGHT_NAME or source(p) == lora.name)]


def main(argv: Sequence[str] | None = None) -> None:
    """`tcdistill export --lora DIR_OR_FILE [--output PATH]`."""
    p = OneLineParser(prog="tcdistill export", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--lora", required=True, help=f"A LoRA training output folder (with {LORA_WEIGHT_NAME}) or a diffusers LoRA .safetensors file.")
    p.add_argument("--output", default=None, help=f"Output file (default: {KOHYA_WEIGHT_NAME} beside the input). Written into a "
                   "training output folder, it is added to the file list of the model card (README.md) there.")
    p.add_argument("--base", default=None, help="Base pipeline (diffusers folder or hub id) of an SDXL LoRA, whose UNet names "
                   "its modules as kohya's SDXL LoRAs (default: the teacher in the run's tcdistill_config.json).")
    args = p.parse_args(argv)
    try:
        from .run_outputs import refuse_live_run
        from .modelcard import list_in_card

        # With --base too: the LoRA in a folder a live run holds, or a stopped one's (`refuse_unfinished_run`), is an earlier
        # run's, which the card that run rewrites would not list. First: a stopped run's folder is refused for why it has no
        # LoRA file. (export_kohya checks only where it is given no `run`: training's --export_kohya passes its own, before
        # its run record has its final step.)
        refuse_live_run(args.lora)
        dst = export_kohya(args.lora, args.output, base_unet_config(args.base) if args.base else None, f"--base {args.base}")
        list_in_card(dst)
        print(dst)
    except (OSError, ValueError) as e:  # OSError: an unwritable --output
        p.exit(2, f"{p.prog}: error: {e}\n")
