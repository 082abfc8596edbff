"""Validation: fixed prompts and seeds, TCD sampling at several step counts, a PNG grid and every tracker."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from .families import ModelFamily
    from .trainer import Trainer

logger = logging.getLogger(__name__)


def make_grid(rows: list[list[np.ndarray]]) -> Image.Image:
    """Tile HWC uint8 images row by row into one PIL image."""
    h, w = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    canvas = np.full((h * len(rows), w * n_cols, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas[i * h:(i + 1) * h, j * w:(j + 1) * w] = img
    return Image.fromarray(canvas)


def sampling_size(resolution: int | None) -> int | None:
    """The square pixel size a run's student samples at, from its --resolution (None: unknown): that size rounded down to
    the multiple of 8 pipelines need. Validation grids, `tcdistill generate` and `eval` defaults and the card's code all
    sample there; a teacher's own default (UNet sample_size x VAE factor) need not be the size the student trained at."""
    return None if resolution is None else max(8, int(resolution) // 8 * 8)


def sampling_hw(resolution: int | None, pipe: Any) -> tuple[int, int]:
    """(height, width) in pixels that `generate` and `eval` sample a run at through `pipe`: the run's `sampling_size`,
    else (no run config) the pipeline's default, UNet sample_size x VAE factor (a non-square config's [height, width])."""
    from .families import unet_sample_hw

    if (size := sampling_size(resolution)) is not None:
        return size, size
    h, w = unet_sample_hw(pipe.unet.config)
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


UNCLIPPED = {"clip_sample": False, "thresholding": False}  # LCMScheduler fields that would alter x0


def sampling_scheduler(scheduler_config: Any, distill_mode: str = "tcd", original_steps: int = 50,
                       timestep_scaling: float = 10.0) -> Any:
    """The scheduler a student samples with: TCDScheduler on its training grid; for --distill_mode lcm, LCMScheduler
    with the run's boundary scalings (the student was trained to output through them, so TCD's sampler would not fit)."""
    from diffusers import LCMScheduler, TCDScheduler

    from .families import schedule_fields

    # The schedule fields explicitly: from_config alone would replace those the config took from its class's defaults
    # (e.g. DDIM's linear 0.0001..0.02 betas) with TCDScheduler's own, not the schedule the student was trained on.
    fields = schedule_fields(scheduler_config)
    if distill_mode == "lcm":
        # No clipping or thresholding of x0: the student was trained on the unclipped consistency map, and latents are
        # not bounded by [-1, 1] (a teacher config that sets clip_sample would otherwise pass it on; SDXL's pipeline,
        # unlike SD's, does not reset it).
        return LCMScheduler.from_config(scheduler_config, original_inference_steps=original_steps, timestep_scaling=timestep_scaling,
                                        **fields, **UNCLIPPED)
    return TCDScheduler.from_config(scheduler_config, original_inference_steps=original_steps, **fields)


def build_pipeline(family: ModelFamily, unet: torch.nn.Module, cfg: Any) -> Any:
    """The family's pipeline over `unet`, with the run's sampling scheduler on its training grid."""
    scheduler = sampling_scheduler(family.scheduler_config, cfg.distill_mode, cfg.num_ddim_timesteps, cfg.timestep_scaling_factor)
    return family.pipeline(unet, scheduler)


@contextlib.contextmanager
def fp32_vae_decode(vae: torch.nn.Module) -> Iterator[None]:
    """A VAE held in fp32 (SDXL's own under fp16: `SDXLFamily.to`, force_upcast) decodes in fp32, outside the enclosing
    autocast: under validation's fp16 autocast its convs ran in fp16 and overflow there (NaN, black validation images;
    diffusers issues 4325, 5209). The pipeline hands it latents in the prompt dtype, so they are cast to the VAE's."""
    if next(vae.parameters()).dtype != torch.float32:
        yield
        return
    decode = vae.decode

    def decode_fp32(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(z.device.type, enabled=False):
            return decode(z.float(), *args, **kwargs)

    vae.decode = decode_fp32  # an instance attribute over the method, removed again below
    try:
        yield
    finally:
        del vae.decode


@torch.no_grad()
def sample_grid(pipe: Any, prompts: list[str], steps: list[int], guidance_scale: float, gamma: float, seed: int, resolution: int,
                clip_skip: int | None = None) -> list[list[np.ndarray]]:
    """Rows = prompts, columns = step counts; the same seed per prompt across columns; prompts encoded under the run's
    --clip_skip (`clip_skip`), as training conditioned the student."""
    from .prompts import pipeline_prompts

    rows = []
    with fp32_vae_decode(pipe.vae):
        for p_idx, prompt in enumerate(prompts):
            row, encoded = [], pipeline_prompts(pipe, prompt, clip_skip)  # once per prompt: the same for every step count
            for n in steps:
                gen = torch.Generator(device="cpu").manual_seed(seed + p_idx)
                out = pipe(**encoded, num_inference_steps=n, guidance_scale=guidance_scale, eta=gamma,
                           generator=gen, height=resolution, width=resolution, output_type="np").images[0]
                row.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
            rows.append(row)
    return rows


def log_images(accelerator: Any, tag: str, grid: Image.Image, images: list[np.ndarray], captions: list[str], step: int) -> None:
    """Send the validation samples to every active tracker, each under its own tag: tensorboard the grid (rows = prompts,
    columns = step counts, as the PNG), wandb the captioned images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            # The grid, not the batch: tensorboard tiles a batch 8 to a row without captions (3 prompts x 2 step counts
            # made one row of 6), so no one could tell which sample was which.
            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
        else:
            logger.info("tracker %s takes no images; grid is on disk", tracker.name)


def run_validation(trainer: "Trainer", step: int) -> list[str]:
    """Sample each student view at the configured step counts; write `validation/<tag>-step<N>.png`."""
    from .models import eager_unets

    cfg = trainer.cfg
    prompts = cfg.validation_prompt_list
    steps = cfg.inference_steps
    out_dir = os.path.join(cfg.output_dir, "validation")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for tag, unet, gs in trainer.strategy.validation_unets():
        was_training = unet.training
        unet.eval()
        pipe = build_pipeline(trainer.family, unet, cfg)
        pipe.set_progress_bar_config(disable=True)
        with trainer.accelerator.autocast(), eager_unets(cfg):  # eager even under --compile_unet
            size = sampling_size(cfg.resolution)
            rows = sample_grid(pipe, prompts, steps, gs, cfg.validation_gamma, cfg.validation_seed, size, cfg.clip_skip)
        unet.train(was_training)
        path = os.path.join(out_dir, f"{tag}-step{step:06d}.png")
        grid = make_grid(rows)
        grid.save(path)
        written.append(path)
        flat = [im for row in rows for im in row]
        caps = [f"{p} | {n} steps" for p in prompts for n in steps]
        log_images(trainer.accelerator, f"validation/{tag}", grid, flat, caps, step)
    logger.info("validation at step %d: %s", step, ", ".join(written))
    return written
