"""Train the demo's tiny SD-architecture teacher: a VAE (reconstruction + small KL), then an eps-prediction UNet
jointly with its CLIP text encoder.

The VAE must be trained: a random one's GroupNorms erase colour and intensity, leaving a latent space the UNet
cannot learn the world in. Distillation later keeps the text encoder frozen, as for any SD teacher.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..prompts import tokenize
from ..schedule import NoiseSchedule
from ..tcd import ema_update
from .classifier import to_tensor
from .world import bpe_merges, vocabulary

logger = logging.getLogger("tcdistill.demo")
Log = Callable[[str], None]


@dataclass
class TeacherSpec:
    """Architecture and budget of the demo teacher (32x32 images -> 8x8x4 latents: CPU-sized)."""

    image_size: int = 32
    vae_channels: tuple[int, ...] = (16, 32, 32)  # three levels: downscale factor 4
    unet_channels: tuple[int, ...] = (32, 64)  # 8x8 and 4x4 latents
    unet_heads: int = 2
    cross_attention_dim: int = 32
    max_length: int = 16
    vae_norm_groups: int = 1
    vae_steps: int = 300
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_batch_size: int = 32
    unet_steps: int = 1000
    unet_lr: float = 1e-3
    unet_ema: float = 0.995
    batch_size: int = 64
    p_uncond: float = 0.1  # caption dropout, so classifier-free guidance works


def build_teacher_pipeline(spec: TeacherSpec, seed: int) -> Any:
    """A random tiny SD pipeline whose tokenizer turns each world word into one token, with a VAE of few norm groups."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ..tiny import build_tiny_sd_pipeline

    factor = 2 ** (len(spec.vae_channels) - 1)
    pipe = build_tiny_sd_pipeline(
        sample_size=spec.image_size // factor, block_out_channels=spec.unet_channels,
        cross_attention_dim=spec.cross_attention_dim, vae_block_out_channels=spec.vae_channels,
        max_length=spec.max_length, seed=seed, merges=bpe_merges(vocabulary()),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # One GroupNorm group: a norm over one or two channels per group removes each channel's mean, i.e. the flat
        # colour of a region, and the encoder's last norm has no residual path around it (colours came out wrong).
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=spec.image_size,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels), up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
            block_out_channels=spec.vae_channels, norm_num_groups=spec.vae_norm_groups,
        )
        # Start the posterior narrow (std ~0.05, SD's VAE is as narrow): a short run otherwise spends its steps
        # teaching the decoder to ignore posterior noise, and blurs.
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels:] = -6.0
        # Cross-attention at both levels (SD has it at three of four) with wide heads: with 8 heads of width 4 the
        # teacher learned the prompt's words only slowly.
        unet = UNet2DConditionModel.from_config(
            dict(pipe.unet.config), down_block_types=("CrossAttnDownBlock2D",) * len(spec.unet_channels),
            up_block_types=("CrossAttnUpBlock2D",) * len(spec.unet_channels), attention_head_dim=spec.unet_heads,
        )
    pipe.register_modules(vae=vae, unet=unet)
    return pipe


def _lr_at(step: int, steps: int, base: float, warmup: int = 50) -> float:
    """Linear warmup then cosine decay to 10 % (a short run needs the decay to settle)."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p)))


def train_vae(vae: nn.Module, pixels: Tensor, spec: TeacherSpec, gen: torch.Generator, log: Log = logger.info) -> float:
    """Fit the VAE: `||D(z) - x||^2 + kl_weight * KL(q(z|x) || N(0, I))`, z ~ q(z|x); returns the last MSE."""
    vae.train().requires_grad_(True)
    device = next(vae.parameters()).device
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    mse = float("nan")
    for step in range(spec.vae_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec.vae_steps, spec.vae_lr)
        x = pixels[torch.randint(0, pixels.shape[0], (spec.vae_batch_size,), generator=gen)].to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        rec_loss = F.mse_loss(rec, x)
        loss = rec_loss + spec.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        mse = rec_loss.item()
        if step % 100 == 0 or step == spec.vae_steps - 1:
            log(f"  vae step {step:4d}/{spec.vae_steps}  recon mse {mse:.4f}")
    vae.eval().requires_grad_(False)
    return mse


@torch.no_grad()
def encode_posterior(vae: nn.Module, pixels: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image (unscaled), so UNet training can resample z cheaply."""
    means, stds = [], []
    device = next(vae.parameters()).device
    for chunk in pixels.split(batch):
        d = vae.encode(chunk.to(device)).latent_dist
        means.append(d.mean.cpu())
        stds.append(d.std.cpu())
    return torch.cat(means), torch.cat(stds)


def set_scaling_factor(vae: nn.Module, mean: Tensor) -> float:
    """Choose `scaling_factor = 1 / std(z)` so the UNet sees unit-variance latents (SD's 0.18215 plays this role)."""
    sf = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=sf)
    return sf


def train_unet(
    unet: nn.Module, text_encoder: nn.Module, latents: tuple[Tensor, Tensor], scaling_factor: float, ids: Tensor,
    uncond_ids: Tensor, schedule: NoiseSchedule, spec: TeacherSpec, gen: torch.Generator, log: Log = logger.info,
) -> tuple[nn.Module, nn.Module]:
    """Standard eps-prediction loss `||eps - eps_theta(a_t x0 + s_t eps, t, c)||^2`, 10 % empty captions.

    The text encoder trains jointly: a random one's features barely tell a colour word's role (object or
    background) apart, and the UNet alone learned to follow it only slowly. Returns the EMA UNet and text encoder.
    """
    modules = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder}).train().requires_grad_(True)
    device = next(unet.parameters()).device
    schedule = schedule.to(device)
    ema = copy.deepcopy(modules).requires_grad_(False).eval()
    opt = torch.optim.AdamW(modules.parameters(), lr=spec.unet_lr, weight_decay=0.0)
    mean, std = latents
    n, T = mean.shape[0], schedule.num_train_timesteps
    running = None
    for step in range(spec.unet_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec.unet_steps, spec.unet_lr)
        idx = torch.randint(0, n, (spec.batch_size,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        t = torch.randint(0, T, (spec.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(spec.batch_size, generator=gen) < spec.p_uncond
        tokens = torch.where(drop[:, None], uncond_ids.expand_as(ids[idx]), ids[idx])
        x0, t, eps, tokens = x0.to(device), t.to(device), eps.to(device), tokens.to(device)
        cond = text_encoder(tokens)[0]
        pred = unet(schedule.add_noise(x0, eps, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        # Warm the EMA up (decay grows with steps) so a short run is not dominated by the random init.
        ema_update(ema.parameters(), modules.parameters(), min(spec.unet_ema, (1 + step) / (10 + step)))
        value = loss.item()  # one host sync per step
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 100 == 0 or step == spec.unet_steps - 1:
            log(f"  unet step {step:4d}/{spec.unet_steps}  eps loss {running:.4f}")
    for b_ema, b in zip(ema.buffers(), modules.buffers()):
        b_ema.copy_(b)
    return ema["unet"], ema["text_encoder"]


def train_teacher(out_dir: str | Path, images: np.ndarray, captions: list[str], spec: TeacherSpec, seed: int,
                  log: Log = logger.info, device: str | None = None) -> dict[str, float]:
    """Build, train and save the teacher as a diffusers pipeline in `out_dir` (on a GPU if there is one); returns stats."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = build_teacher_pipeline(spec, seed).to(device)
    gen = torch.Generator().manual_seed(seed)
    pixels = to_tensor(images)  # the VAE's input range
    log(f"training the VAE ({spec.vae_steps} steps)")
    vae_mse = train_vae(pipe.vae, pixels, spec, gen, log)
    mean, std = encode_posterior(pipe.vae, pixels)
    sf = set_scaling_factor(pipe.vae, mean)
    schedule = NoiseSchedule.from_scheduler(pipe.scheduler)
    log(f"training the UNet and text encoder ({spec.unet_steps} steps, latents {tuple(mean.shape[1:])}, scaling factor {sf:.3f})")
    unet, text_encoder = train_unet(pipe.unet, pipe.text_encoder, (mean, std), sf, tokenize(pipe.tokenizer, captions),
                                    tokenize(pipe.tokenizer, [""]), schedule, spec, gen, log)
    pipe.unet.load_state_dict(unet.state_dict())
    pipe.text_encoder.load_state_dict(text_encoder.state_dict())
    for m in (pipe.unet, pipe.text_encoder):
        m.eval().requires_grad_(False)
    pipe.to("cpu").save_pretrained(str(out_dir), safe_serialization=True)
    return {"vae_recon_mse": vae_mse, "scaling_factor": sf}
