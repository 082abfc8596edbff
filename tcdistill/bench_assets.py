"""The benchmark's inputs: the SD 1.5 architecture with random weights (nothing downloaded), synthetic shards at the
preset's resolution, and their `tcdistill cache`; all reused from a work folder when already there."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


# SD 1.5's published component configs (runwayml/stable-diffusion-v1-5), written here so nothing is downloaded.
SD15_UNET: dict[str, Any] = dict(
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
    scaling_factor=0.18215,
)
SD15_TEXT: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
SD15_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, prediction_type="epsilon",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)


@dataclasses.dataclass
class Assets:
    """What the modes train from: a teacher folder, pixel shards and (optimised mode) cached shards."""

    teacher: str
    shards: str
    cached: str | None = None
    cache_info: dict[str, Any] | None = None


def build_sd15_pipeline(save_dir: Path, resolution: int) -> None:
    """SD 1.5's UNet, VAE and CLIP text encoder with random weights, saved as a diffusers pipeline folder.

    The tokenizer is the tiny offline one with SD's 77-token length; its ids stay inside CLIP's 49408-token vocab.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import build_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tiny_tokenizer(tmp, model_max_length=77)
    # Random init on the GPU when there is one: initialising ~1.1B parameters on the CPU takes a while.
    with torch.random.fork_rng(devices=[]), torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=resolution // 8, **SD15_UNET)
        vae = AutoencoderKL(sample_size=resolution, **SD15_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id))
    unet, vae, text = unet.cpu(), vae.cpu(), text.cpu()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDPMScheduler.from_config(SD15_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(save_dir), safe_serialization=True)


def prepare_assets(preset: str, work: Path, resolution: int, need_cache: bool, need_teacher: bool = True,
                   clip_skip: int | None = None) -> Assets:
    """Teacher (if needed: `--data-only` reads only the shards), synthetic shards at the preset's resolution and (if
    needed) their cache, its prompt states at `clip_skip` (the cached mode's --clip_skip); reused when already in `work`."""
    from .tiny import build_tiny_sd_pipeline, shard_pattern, write_tiny_shards

    teacher = work / f"{preset}-teacher-{resolution}"
    # sd15's random SD 1.5 (1.1B weights, ~4 GB written) was built for a data-loader benchmark that never loads it
    if (need_teacher or need_cache) and not (teacher / ".complete").exists():
        shutil.rmtree(teacher, ignore_errors=True)
        if preset == "sd15":
            build_sd15_pipeline(teacher, resolution)
        else:
            build_tiny_sd_pipeline(teacher, sample_size=resolution // 2)
        (teacher / ".complete").touch()
    n_shards, per_shard = (4, 24) if preset == "sd15" else (2, 16)
    shards_dir = work / f"shards-{resolution}"
    if not (shards_dir / ".complete").exists():
        # Source images larger than the training size, so the loader's resize does real work.
        write_tiny_shards(shards_dir, n_shards=n_shards, per_shard=per_shard, image_size=(resolution * 5 // 4, resolution * 3 // 2))
        (shards_dir / ".complete").touch()
    assets = Assets(teacher=str(teacher), shards=shard_pattern(shards_dir, n_shards))
    if need_cache:
        from .cache import build_parser as cache_parser, run_cache

        # Training refuses a cache of another clip skip than its own: one folder per value (`--set clip_skip=N`).
        cache_dir = work / f"{preset}-cache-{resolution}{f'-clip_skip{clip_skip}' if clip_skip is not None else ''}"
        meta_path = cache_dir / "tcdistill_cache.json"
        if meta_path.exists():
            info = json.loads(meta_path.read_text())
        else:
            info = run_cache(cache_parser().parse_args([
                "--pretrained_teacher_model", str(teacher), "--train_shards_path_or_url", assets.shards,
                "--output_dir", str(cache_dir), "--resolution", str(resolution),
                *(["--clip_skip", str(clip_skip)] if clip_skip is not None else [])]))
        assets.cached, assets.cache_info = shard_pattern(cache_dir, len(info["shards"])), info
    return assets
