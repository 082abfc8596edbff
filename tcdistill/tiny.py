"""Tiny, offline-buildable Stable Diffusion components and data shards for tests and smoke runs."""

from __future__ import annotations

import inspect
import io
import json
import math
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch
from PIL import Image, ImageDraw

from .schedule import PREDICTION_TYPES

if TYPE_CHECKING:  # heavy imports are deferred to call time so importing this module stays cheap
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

# Colours and shapes used for the procedural dataset; names go straight into the captions.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# A handful of merges so the BPE actually merges something (words from the captions);
# order matters: a merge may only use pieces produced by earlier merges.
_MERGES: tuple[tuple[str, str], ...] = (
    ("r", "e"),
    ("re", "d</w>"),
    ("o", "n</w>"),
    ("b", "l"),
    ("bl", "u"),
    ("blu", "e</w>"),
    ("c", "i"),
    ("ci", "r"),
    ("a", "c"),
    ("ac", "k</w>"),
    ("g", "r"),
    ("s", "q"),
)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _tiny_vocab(merges: Sequence[tuple[str, str]] = _MERGES) -> dict[str, int]:
    """Build a CLIP-ordered vocab: bytes, bytes+</w>, merge results, then BOS/EOS last."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    # dict.fromkeys drops repeats (a merge may rebuild a single-byte word such as "a</w>") keeping ids dense.
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build_tiny_tokenizer(
    save_dir: str | Path, model_max_length: int = 16, merges: Sequence[tuple[str, str]] | None = None
) -> CLIPTokenizer:
    """Write a tiny byte-level BPE vocab.json/merges.txt into save_dir and return a CLIPTokenizer on it.

    `merges` (default: a handful of built-in ones) must be ordered so each uses only pieces of earlier ones.
    """
    merges = tuple(_MERGES if merges is None else merges)
    from transformers import CLIPTokenizer

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    vocab = _tiny_vocab(merges)
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The "#version" header matches CLIP's merges.txt; the BPE loader skips it.
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (save_dir / "merges.txt").write_text(merges_txt, encoding="utf-8")
    # transformers 5 CLIPTokenizer takes in-memory vocab/merges (merges as tuples), not file paths,
    # and passing objects keeps the tokenizer valid even if save_dir is a deleted temp dir;
    # transformers 4's (vocab_file, merges_file) reads the two files at once, so that holds there too.
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:
        source: dict[str, Any] = {"vocab_file": str(save_dir / "vocab.json"), "merges_file": str(save_dir / "merges.txt")}
    else:
        source = {"vocab": vocab, "merges": list(merges)}
    tokenizer = CLIPTokenizer(
        **source,
        model_max_length=model_max_length,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    # Also save tokenizer.json/tokenizer_config.json so from_pretrained(save_dir) keeps model_max_length.
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def _num_groups(channels: Sequence[int], cap: int = 8) -> int:
    """Return the largest power of two <= cap dividing every channel count (GroupNorm needs it)."""
    g = math.gcd(*channels)
    n = cap
    while n > 1 and g % n:
        n //= 2
    return n


def _finish(pipe: Any, save_dir: str | Path | None) -> Any:
    """Quiet the progress bar and, if asked, save the pipeline as a safetensors diffusers folder."""
    pipe.set_progress_bar_config(disable=True)
    if save_dir is not None:
        pipe.save_pretrained(str(save_dir), safe_serialization=True)
    return pipe


# SD 1.5's training schedule (scheduler config fields), shared by the tiny SD and SDXL teachers.
SD_SCHEDULE: dict[str, Any] = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                               "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def _check_shape(block_out_channels: Sequence[int], sample_size: int, prediction_type: str) -> None:
    """Refuse a latent size the UNet's levels cannot halve, or a prediction type no scheduler knows."""
    if sample_size % 2 ** (len(block_out_channels) - 1):
        raise ValueError(f"sample_size {sample_size} must be divisible by {2 ** (len(block_out_channels) - 1)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")


def _tiny_unet(sample_size: int, block_out_channels: Sequence[int], **extra: Any) -> Any:
    """A one-layer-per-level UNet2DConditionModel with attention off its highest-resolution level (it dominates CPU time
    there); `extra`: the family's conditioning arguments."""
    from diffusers import UNet2DConditionModel

    n_levels = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_levels - 1) + ("UpBlock2D",),
        block_out_channels=tuple(block_out_channels), layers_per_block=1, norm_num_groups=_num_groups(block_out_channels),
        # diffusers' legacy `attention_head_dim` on the UNet is really the head count; it must divide every width, and
        # the same bound keeps head dims >= 1.
        attention_head_dim=_num_groups(block_out_channels), **extra,
    )


def _tiny_vae(vae_block_out_channels: Sequence[int], sample_size: int, **extra: Any) -> Any:
    """A one-layer-per-level AutoencoderKL whose latents are `sample_size` square for its pixel size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_block_out_channels), block_out_channels=tuple(vae_block_out_channels),
        layers_per_block=1, latent_channels=4, norm_num_groups=_num_groups(vae_block_out_channels),
        sample_size=sample_size * 2 ** (len(vae_block_out_channels) - 1), **extra,
    )


def build_tiny_sd_pipeline(
    save_dir: str | Path | None = None,
    *,
    prediction_type: str = "epsilon",
    max_length: int = 16,
    sample_size: int = 16,
    block_out_channels: Sequence[int] = (32, 64),
    cross_attention_dim: int = 32,
    vae_block_out_channels: Sequence[int] = (16, 32),
    seed: int = 0,
    merges: Sequence[tuple[str, str]] | None = None,
    text_layers: int = 2,
) -> StableDiffusionPipeline:
    """Build a randomly initialised, tiny StableDiffusionPipeline offline (a `text_layers`-layer text encoder); optionally save it."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    if len(block_out_channels) < 1 or len(vae_block_out_channels) < 1:
        raise ValueError("block_out_channels and vae_block_out_channels must be non-empty")
    _check_shape(block_out_channels, sample_size, prediction_type)

    # fork_rng so building a tiny model does not perturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(sample_size, block_out_channels, cross_attention_dim=cross_attention_dim)
        vae = _tiny_vae(vae_block_out_channels, sample_size)
        # The tokenizer lives in memory after construction, so a throwaway dir is enough here.
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_tiny_tokenizer(tmp, model_max_length=max_length, merges=merges)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=cross_attention_dim,
                num_hidden_layers=text_layers,
                num_attention_heads=_num_groups([cross_attention_dim], cap=4),
                intermediate_size=64,
                vocab_size=len(tokenizer),
                max_position_embeddings=max_length,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    # from_config, not __init__: DDPMScheduler has no `set_alpha_to_one`, but from_config keeps it as a
    # hidden key that is saved and reaches DDIM/TCD schedulers built from this config (SD 1.5 semantics).
    scheduler = DDPMScheduler.from_config({**SD_SCHEDULE, "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe, save_dir)


def _draw_sample(rng: random.Random, width: int, height: int) -> tuple[Image.Image, str]:
    """Draw one coloured shape on a differently coloured background and caption it."""
    names = list(COLORS)
    bg, fg = rng.sample(names, 2)  # distinct so the shape is always visible
    shape = rng.choice(SHAPES)
    img = Image.new("RGB", (width, height), COLORS[bg])
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    r = rng.uniform(0.2, 0.4) * side
    cx = rng.uniform(r, width - r)
    cy = rng.uniform(r, height - r)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[fg])
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=COLORS[fg])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
    return img, f"a {fg} {shape} on a {bg} background"


def shard_pattern(out_dir: str | Path, n_shards: int) -> str:
    """Return the brace pattern, e.g. '/path/{00000..00001}.tar', naming n_shards shards."""
    if n_shards < 1:
        raise ValueError("n_shards must be >= 1")
    return f"{Path(out_dir)}/{{00000..{n_shards - 1:05d}}}.tar"


def write_tiny_shards(
    out_dir: str | Path,
    *,
    n_shards: int = 2,
    per_shard: int = 8,
    image_size: int | tuple[int, int] = 32,
    seed: int = 0,
    ext: str = "jpg",
) -> list[str]:
    """Write webdataset tar shards of captioned procedural images; image_size is int or (height, width)."""
    import webdataset as wds

    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = image_size
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(ext.lower())
    if fmt is None:
        raise ValueError(f"unsupported image extension {ext!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths: list[str] = []
    for s in range(n_shards):
        path = out_dir / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                img, caption = _draw_sample(rng, width, height)
                buf = io.BytesIO()
                # Encode ourselves so the quality is fixed and output is independent of webdataset's encoders.
                img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
                # Keys avoid dots: webdataset splits the key from the extension at the first dot.
                sink.write({"__key__": f"{s:05d}_{i:06d}", ext: buf.getvalue(), "txt": caption})
        paths.append(str(path))
    return paths


def build_tiny_sdxl_pipeline(
    save_dir: str | Path | None = None,
    *,
    prediction_type: str = "epsilon",
    max_length: int = 16,
    sample_size: int = 16,
    block_out_channels: Sequence[int] = (32, 64),
    text_hidden_sizes: tuple[int, int] = (16, 32),
    projection_dim: int = 16,
    addition_time_embed_dim: int = 8,
    vae_block_out_channels: Sequence[int] = (16, 32),
    seed: int = 0,
) -> StableDiffusionXLPipeline:
    """Build a randomly initialised, tiny StableDiffusionXLPipeline offline (the layout of diffusers' SDXL tests)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if len(block_out_channels) < 2:
        raise ValueError("SDXL's UNet needs at least two levels (cross-attention is kept off the first)")
    _check_shape(block_out_channels, sample_size, prediction_type)

    def clip_config(hidden: int, vocab: int, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
        return CLIPTextConfig(
            hidden_size=hidden, num_hidden_layers=3, num_attention_heads=_num_groups([hidden], cap=4), intermediate_size=2 * hidden,
            vocab_size=vocab, max_position_embeddings=max_length, projection_dim=projection_dim, hidden_act="gelu",
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet(
            sample_size, block_out_channels, use_linear_projection=True,
            # SDXL's conditioning: prompt states of both encoders side by side, and an added embedding of the pooled
            # prompt plus six micro-conditioning numbers (original size, crop, target size).
            cross_attention_dim=sum(text_hidden_sizes), addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim, projection_class_embeddings_input_dim=projection_dim + 6 * addition_time_embed_dim,
        )
        vae = _tiny_vae(vae_block_out_channels, sample_size, scaling_factor=0.13025, force_upcast=True)  # SDXL's scaling
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_tiny_tokenizer(Path(tmp) / "1", model_max_length=max_length)
            tokenizer_2 = build_tiny_tokenizer(Path(tmp) / "2", model_max_length=max_length)
        text_encoder = CLIPTextModel(clip_config(text_hidden_sizes[0], len(tokenizer), tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(text_hidden_sizes[1], len(tokenizer_2), tokenizer_2))
    # SDXL ships an EulerDiscreteScheduler config with SD's betas; schedulers built from it keep these keys.
    scheduler = EulerDiscreteScheduler.from_config(
        {**SD_SCHEDULE, "prediction_type": prediction_type, "timestep_spacing": "leading", "interpolation_type": "linear"}
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _finish(pipe, save_dir)
