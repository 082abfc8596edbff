"""A tiny diffusers pipeline as one original-format (LDM / A1111 / CivitAI) checkpoint file, for the `tcdistill convert` tests.

diffusers converts only LDM -> diffusers, so this inverts its key mapping (the layout of diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, generalised from SD 1.5's 2 layers x 4 levels to any
`layers_per_block` and level count): each diffusers key gets the LDM name diffusers' `from_single_file` maps back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# (diffusers part, LDM part) inside a UNet resnet; VAE resnets only rename the shortcut.
_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
                ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
             "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP (SDXL's second text encoder) names inside a transformer layer.
_OPEN_CLIP = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
              ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _resnet(rest: str) -> str:
    for hf, ldm in _UNET_RESNET:
        rest = rest.replace(hf, ldm)
    return rest


def unet_to_ldm(sd: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    """A UNet2DConditionModel state dict under LDM names (`model.diffusion_model.` prefix)."""
    step = config["layers_per_block"] + 1  # LDM input/output blocks per level: its layers + the resampler slot
    has_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, t in sd.items():
        module, part = key.rsplit(".", 1)
        if module in _UNET_TOP:
            name = f"{_UNET_TOP[module]}.{part}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            name = f"input_blocks.{1 + i * step + j}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            name = f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            name = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            name = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            name = f"output_blocks.{i * step + j}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m[1])
            name = f"output_blocks.{i * step + step - 1}.{2 if i in has_attn else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + name] = t
    return out


def vae_to_ldm(sd: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    """An AutoencoderKL state dict under LDM names (`first_stage_model.`), mid-block attention as 1x1 convs as in SD's files."""
    n = len(config["up_block_types"])
    out = {}
    for key, t in sd.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", name)
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", name)
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key):
            name = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and t.ndim == 2:
                t = t[:, :, None, None]
        out["first_stage_model." + name] = t
    return out


def open_clip_to_ldm(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A CLIPTextModelWithProjection state dict as OpenCLIP's (SDXL's `conditioner.embedders.1.model.`): fused q/k/v."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    for part in ("weight", "bias"):
        out[prefix + f"ln_final.{part}"] = sd.pop(f"final_layer_norm.{part}")
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")}
    for n in sorted(layers):
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for part in ("weight", "bias"):
            out[dst + f"attn.in_proj_{part}"] = torch.cat([sd.pop(f"{src}self_attn.{x}_proj.{part}") for x in "qkv"])
        for k in [k for k in sd if k.startswith(src)]:
            rest = k[len(src):]
            for hf, ldm in _OPEN_CLIP:
                rest = rest.replace(hf, ldm)
            out[dst + rest] = sd.pop(k)
    if sd:
        raise KeyError(f"no OpenCLIP name for {sorted(sd)[:3]}")
    return out


def pipeline_to_ldm(pipe: Any, open_clip: bool = False) -> dict[str, Tensor]:
    """The whole SD or SDXL pipeline as one LDM state dict (what a CivitAI / A1111 checkpoint holds); `open_clip`: an SD
    text encoder in SD 2.x's OpenCLIP layout (`cond_stage_model.model.`, with the projection SD 2's files carry)."""
    out = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config), **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)}
    te = {"text_model." + k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    if getattr(pipe, "text_encoder_2", None) is None:
        if open_clip:
            eye = torch.eye(pipe.text_encoder.config.hidden_size)
            return out | open_clip_to_ldm({**te, "text_projection.weight": eye}, "cond_stage_model.model.")
        return out | {"cond_stage_model.transformer." + k: v for k, v in te.items()}
    out |= {"conditioner.embedders.0.transformer." + k: v for k, v in te.items()}
    return out | open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")


def save_ldm(pipe: Any, path: Path, open_clip: bool = False) -> Path:
    """`pipeline_to_ldm(pipe, open_clip)` written as one .safetensors file at `path`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in pipeline_to_ldm(pipe, open_clip).items()}, str(path))
    return path


def save_ldm_vae(vae: Any, path: Path) -> Path:
    """A lone AutoencoderKL as one original-format VAE file (unprefixed keys, as vae-ft-mse-840000-ema-pruned.safetensors)."""
    from safetensors.torch import save_file

    ldm = vae_to_ldm(vae.state_dict(), vae.config)
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in ldm.items()}, str(path))
    return path
