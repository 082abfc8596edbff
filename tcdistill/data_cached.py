"""Training from cached shards written by `tcdistill cache`: VAE posterior moments and prompt embeddings per sample.

Layout of a cached dataset directory (the sidecar files sit next to the shards):

- `NNNNN.tar`: per sample `latents.npy` (posterior mean x scaling_factor, [C, h, w]), `latents_std.npy` (posterior
  std x scaling_factor), one `<key>.npy` per conditioning tensor (SD: `encoder_hidden_states.npy`, [L, D]; SDXL adds
  `text_embeds.npy` and `time_ids.npy`, the latter always fp32) and `txt` (the caption, kept for reference);
- `tcdistill_cache.json`: how it was made (teacher, resolution, scaling factor, VAE encoder fingerprint, dtypes, conditioning keys, counts) and
  the shards it covers; written last, it marks a complete cache (a re-run removes it before overwriting a shard);
- `uncond.safetensors`: stored once (one row per key), the unconditional conditioning that is the same for every
  sample and, as `empty.<key>`, the encoding of "" (for --proportion_empty_prompts); keys listed in the metadata's
  `uncond_from_cond` (SDXL's time ids) take the sample's own conditioning.

Training draws `x0 = mean + std * n`, `n ~ N(0, I)`, at every step: the reference's `latent_dist.sample() *
scaling_factor` (step 1 of the TCD step) without running the VAE encoder, and with the same RNG draw.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from webdataset.gopen import gopen

from .config import ConfigError, TrainConfig, local_model_path
from .data import DataConfig, ImageTextShards, SkipSample, expand_urls
from .shard_failures import failed_shards
from .stops import leave_ctrl_c_to_the_trainer

if TYPE_CHECKING:
    from .families import ModelFamily

logger = logging.getLogger(__name__)

FORMAT = "tcdistill-latents-v1"
META_NAME = "tcdistill_cache.json"
UNCOND_NAME = "uncond.safetensors"
LATENTS, LATENTS_STD = "latents.npy", "latents_std.npy"


def cache_root(spec: str | list[str]) -> str:
    """Directory (or url prefix) holding the sidecar files: that of the first shard."""
    url = expand_urls(spec)[0]
    if url.startswith("pipe:"):
        raise ConfigError("--train_latents_path_or_url: pipe: urls are not supported (the sidecar files cannot be located).")
    return _split(url)[0]


def _split(url: str) -> tuple[str, str]:
    """(folder, shard name) of a shard url."""
    folder, _, name = url.rpartition("/")
    return (folder if "/" in url else "."), name


def _read(url: str) -> bytes:
    with gopen(url, "rb") as f:
        return f.read()


def read_sidecar(spec: str | list[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The cache's metadata and its unconditional conditioning ({key: [1, ...]})."""
    from safetensors.torch import load

    root = cache_root(spec)
    try:
        meta = json.loads(_read(f"{root}/{META_NAME}").decode("utf-8"))
        uncond = load(_read(f"{root}/{UNCOND_NAME}"))
    except Exception as e:  # noqa: BLE001 - OSError, JSON errors and safetensors' SafetensorError (not a ValueError)
        raise ConfigError(f"--train_latents_path_or_url: cannot read {META_NAME}/{UNCOND_NAME} in {root!r} "
                          f"(write them with `tcdistill cache`): {type(e).__name__}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{root}/{META_NAME}: format {meta.get('format')!r}, expected {FORMAT!r}.")
    missing = [k for k in ("resolution", "latent_shape", "cond_keys") if k not in meta]
    if missing:
        raise ConfigError(f"{root}/{META_NAME} lacks {missing} (re-run `tcdistill cache`).")
    if "shards" in meta:
        # A smaller re-run into the same folder leaves the earlier run's higher-numbered shards (made, maybe, with another
        # teacher); the metadata describes only the shards it lists, so a pattern reaching past them is refused.
        listed = set(meta["shards"])
        foreign = [u for u in expand_urls(spec) if _split(u)[0] != root or _split(u)[1] not in listed]
        if foreign:
            raise ConfigError(f"--train_latents_path_or_url: {foreign[0]!r} is not one of the {len(listed)} shard(s) that "
                              f"{root}/{META_NAME} lists ({', '.join(sorted(listed)[:3])}{', ...' if len(listed) > 3 else ''}): "
                              "a leftover of an earlier `tcdistill cache` run, or another cache; use the pattern it printed.")
    _check_shard_sizes(spec, meta.get("shard_bytes") or {})
    return meta, uncond


def _check_shard_sizes(spec: str | list[str], sizes: dict[str, int]) -> None:
    """Refuse a local cached shard whose size is not the one `tcdistill cache` wrote (caches from before it recorded the
    sizes are not checked): a shard cut short or deleted after caching was read in part, or not at all, as shard errors
    counted among the skipped samples, and the run trained on part of the cache."""
    from .preflight import local_shards

    for url, path in local_shards(expand_urls(spec)):
        want = sizes.get(_split(url)[1])
        if want is None:
            continue
        try:
            have: int | None = os.path.getsize(path)
        except OSError:
            have = None
        if have != want:
            state = "is missing" if have is None else f"holds {have} bytes"
            raise ConfigError(f"--train_latents_path_or_url: {url} {state} where `tcdistill cache` wrote {want} (deleted, cut "
                              "short or replaced since); re-run `tcdistill cache`.")


def check_cache_record(cfg: TrainConfig) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The cache's sidecar (`read_sidecar`), refused in one line before any weights load where its record alone tells it
    from this run's: another family, clip skip, resolution or SDXL time-id setting (the refusal came after the teacher
    load, minutes on SD 1.5). The checks that need the teacher's VAE and UNet: `prepare_cached_training`."""
    meta, uncond = read_sidecar(cfg.train_latents_path_or_url)
    if meta.get("model_family", "sd") != cfg.model_family:
        raise ConfigError(f"the cache was made for a {meta.get('model_family')!r} teacher; this run trains {cfg.model_family!r}.")
    # The cached prompt states were taken at the cache's layer (a cache from before the flag: the last, None).
    made, asked = meta.get("clip_skip"), cfg.clip_skip
    if made != asked:
        use = "leave --clip_skip out" if made is None else f"pass --clip_skip {made}"
        rerun = "`tcdistill cache` without --clip_skip" if asked is None else f"`tcdistill cache --clip_skip {asked}`"
        raise ConfigError(f"--clip_skip {asked or 'unset'}: the cache's prompt states were made with clip skip {made or 'unset'}; "
                          f"{use} or re-run {rerun}.")
    if int(meta["resolution"]) != cfg.resolution:
        raise ConfigError(f"--resolution {cfg.resolution} differs from the cache's {meta['resolution']} (re-run `tcdistill cache`).")
    if cfg.model_family == "sdxl" and bool(meta.get("use_fix_crop_and_size", False)) != bool(cfg.use_fix_crop_and_size):
        # The cached time ids were computed under the cache's setting; training cannot change them afterwards.
        raise ConfigError(f"--use_fix_crop_and_size {cfg.use_fix_crop_and_size} differs from the cache's "
                          f"{bool(meta.get('use_fix_crop_and_size', False))} (its time ids are fixed; re-run `tcdistill cache`).")
    return meta, uncond


def prepare_cached_training(cfg: TrainConfig, family: ModelFamily,
                            sidecar: tuple[dict[str, Any], dict[str, Tensor]] | None = None) -> dict[str, Any]:
    """Check the cache against the teacher and config (one-line errors), then drop the VAE encoder. `sidecar`: what
    `check_cache_record` returned before the teacher loaded (read and checked here when not given).

    The step never encodes; validation still decodes (VAE decoder) and encodes its prompts (text encoder).
    """
    meta, uncond = sidecar or check_cache_record(cfg)
    _check_cache_shapes(cfg, family, meta, uncond)
    _check_cache_models(cfg, family, meta)
    _warn_fixed_data_flags(cfg, meta)
    vae = family.vae
    vae.encoder = None  # ~34M parameters the step no longer needs; decode() uses only post_quant_conv + decoder
    if getattr(vae, "quant_conv", None) is not None:
        vae.quant_conv = None
    return meta


def _check_cache_shapes(cfg: TrainConfig, family: ModelFamily, meta: dict[str, Any], uncond: dict[str, Tensor]) -> None:
    """Refuse a cache whose latent shape or prompt-embedding widths this teacher cannot take."""
    unet_cfg = family.unet.config
    if int(meta["latent_shape"][0]) != int(unet_cfg.in_channels):
        raise ConfigError(f"cached latents have {meta['latent_shape'][0]} channels; the teacher UNet takes {unet_cfg.in_channels}.")
    from .teacher_checks import sdxl_pooled_width, vae_scale_factor

    # Same resolution, another VAE depth (a cache made with another teacher): latents of another size would train the
    # student at a scale that validation and sampling (resolution // the VAE's factor) never use.
    side = cfg.resolution // vae_scale_factor(family.vae.config)
    if [int(x) for x in meta["latent_shape"][1:]] != [side, side]:
        raise ConfigError(f"cached latents are {'x'.join(str(x) for x in meta['latent_shape'][1:])}; this teacher's VAE makes "
                          f"{side}x{side} latents at --resolution {cfg.resolution} (the cache was made with another VAE: "
                          f"{meta.get('teacher')!r}; re-run `tcdistill cache`).")
    ehs = uncond.get("encoder_hidden_states")
    # cross_attention_dim may be one width per block (a list); every block attends to the same prompt states.
    cad = unet_cfg.cross_attention_dim
    if ehs is not None and any(int(d) != ehs.shape[-1] for d in (cad if isinstance(cad, (list, tuple)) else [cad])):
        raise ConfigError(f"cached prompt embeddings are {ehs.shape[-1]}-dim; the teacher UNet wants {cad}.")
    # SDXL: the same cross-attention width over another text_encoder_2 projection failed in the first step with a matmul
    # shape traceback.
    pooled, want = uncond.get("text_embeds"), sdxl_pooled_width(unet_cfg)
    if pooled is not None and want is not None and pooled.shape[-1] != want:
        raise ConfigError(f"cached pooled prompt embeddings (text_embeds) are {pooled.shape[-1]}-dim; the teacher UNet's added "
                          f"conditioning wants {want} (the cache was made with another teacher: "
                          f"{meta.get('teacher')!r}; re-run `tcdistill cache`).")


def _check_cache_models(cfg: TrainConfig, family: ModelFamily, meta: dict[str, Any]) -> None:
    """Warn on another teacher name; refuse latents that this run's VAE would not have made. A cache records its VAE
    encoder's fingerprint (`vae_encoder_fingerprint`): another one, and the student learned another VAE's latent space
    while validation, `generate` and the model card decode with this run's VAE (a warning let that train). A decoder-only
    fine-tune (sd-vae-ft-mse) makes the same latents and is accepted. An older cache without the fingerprint is checked by
    its scaling factor and warned on by name."""
    if local_model_path(meta.get("teacher")) != cfg.pretrained_teacher_model:  # an older cache's relative folder is the same
        logger.warning("Cache was made with teacher %r; training with %r.", meta.get("teacher"), cfg.pretrained_teacher_model)
    vae, made = family.vae, meta.get("vae_encoder_sha256")
    sf = float(vae.config.scaling_factor)
    if "scaling_factor" in meta and abs(float(meta["scaling_factor"]) - sf) > 1e-6 * sf:
        # Latents of another VAE: the student would learn in one latent space and validation decode in another.
        raise ConfigError(f"the cache's latents come from a VAE with scaling_factor {meta['scaling_factor']} "
                          f"(--pretrained_vae_model_name_or_path {meta.get('vae')!r}); this run's VAE has {sf} "
                          f"({cfg.pretrained_vae_model_name_or_path!r}): use the cache's VAE or re-run `tcdistill cache`.")
    if made is not None and made != vae_encoder_fingerprint(vae):
        ours = cfg.pretrained_vae_model_name_or_path or f"the vae/ of {cfg.pretrained_teacher_model!r}"
        theirs = meta.get("vae") or f"the vae/ of {meta.get('teacher')!r}"
        raise ConfigError(f"the cache's latents were made by another VAE encoder ({theirs}) than this run's ({ours}): the student "
                          "would learn latents its samples are not decoded from; train with the cache's VAE "
                          "(--pretrained_vae_model_name_or_path) or re-run `tcdistill cache` with this run's.")
    if made is None and local_model_path(meta.get("vae")) != cfg.pretrained_vae_model_name_or_path:
        logger.warning("Cache was made with --pretrained_vae_model_name_or_path %r; training with %r (validation decodes with it).",
                       meta.get("vae"), cfg.pretrained_vae_model_name_or_path)


def vae_encoder_fingerprint(vae: Any) -> str:
    """sha256 of what turns pixels into a cache's latents: the VAE's encoder and quant_conv weights (as fp16, so a VAE
    saved or loaded at either precision matches itself) and the config fields that scale latents. Equal fingerprints make
    the same latents whatever the decoders."""
    h = hashlib.sha256(json.dumps({k: vae.config.get(k) for k in ("scaling_factor", "shift_factor", "latents_mean", "latents_std")},
                                  sort_keys=True).encode())
    for part in ("encoder", "quant_conv"):
        module = getattr(vae, part, None)
        for name, t in sorted((module.state_dict() if module is not None else {}).items()):
            h.update(f"{part}.{name}".encode())
            h.update(t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()


def _warn_fixed_data_flags(cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """Warn on crop, flip and filter flags that the cache fixed when it was made (they have no effect here)."""
    for key in ("center_crop", "random_flip", "interpolation_type"):
        if key in meta and meta[key] != getattr(cfg, key):
            logger.warning("--%s %s has no effect: the cache fixed the crops with %s=%s (re-run `tcdistill cache` to change it).",
                           key, getattr(cfg, key), key, meta[key])
    # The cached samples keep no image size or watermark score: the filters were applied (or not) when the cache was made.
    for key, off in (("min_image_size", 0), ("max_pwatermark", 1.0)):
        made, asked = meta.get(key), getattr(cfg, key)
        if asked != (off if made is None else made):
            logger.warning("--%s %s has no effect: the cache's samples were filtered when it was made (%s=%s); re-run "
                           "`tcdistill cache --%s %s` to filter them so.", key, asked, key,
                           "not recorded" if made is None else made, key, asked)


def _npy(data: bytes) -> Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


class CachedLatentShards(ImageTextShards):
    """The same resampled, resumable, failure-counting shard stream as the pixel loader, over cached samples."""

    def __init__(self, cfg: DataConfig, meta: dict[str, Any], uncond: dict[str, Tensor]) -> None:
        super().__init__(cfg)
        self.cond_keys = list(meta["cond_keys"])
        self.from_cond = set(meta.get("uncond_from_cond", []))
        self.latent_shape = tuple(int(x) for x in meta["latent_shape"])
        self.uncond = uncond

    def _process(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """One cached sample, or SkipSample; --proportion_empty_prompts swaps in the stored encoding of ""."""
        missing = [k for k in (LATENTS, *(f"{c}.npy" for c in self.cond_keys)) if k not in raw]
        if missing:
            raise SkipSample("missing_member", f"cached sample lacks {missing}")
        try:
            latents = _npy(raw[LATENTS])
            std = _npy(raw[LATENTS_STD]) if LATENTS_STD in raw else None
            cond = {c: _npy(raw[f"{c}.npy"]) for c in self.cond_keys}
        except Exception as exn:  # noqa: BLE001 - any unreadable member costs only this sample
            raise SkipSample("decode_error", f"{type(exn).__name__}: {exn}") from None
        if tuple(latents.shape) != self.latent_shape or (std is not None and std.shape != latents.shape):
            raise SkipSample("shape_mismatch", f"latents {tuple(latents.shape)}, expected {self.latent_shape}")
        caption = raw["txt"].decode("utf-8", errors="replace") if "txt" in raw else ""
        if self.cfg.proportion_empty_prompts > 0 and rng.random() < self.cfg.proportion_empty_prompts:
            cond = {c: v if c in self.from_cond else self.uncond.get(f"empty.{c}", self.uncond[c])[0].to(v.dtype)
                    for c, v in cond.items()}
            caption = ""
        return dict(latents=latents, latents_std=std, cond=cond, caption=caption)


def collate_cached(samples: list[dict[str, Any]], uncond: dict[str, Tensor], from_cond: Sequence[str] = ()) -> dict[str, Any]:
    """Stack cached samples; `uncond` is the stored unconditional conditioning expanded to the batch, plus the
    `from_cond` keys taken from each sample's own conditioning."""
    skipped: Counter[str] = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    n = len(samples)
    # fp32, like the encoders' output under fp32 weights: an fp16 cache must not meet a bf16 autocast (CPU rejects
    # the mix); each denoiser casts to its UNet's dtype anyway. Cast here, in the loader, not in the training step.
    cond = {k: torch.stack([s["cond"][k] for s in samples]).float() for k in samples[0]["cond"]}
    batch: dict[str, Any] = dict(
        latents=torch.stack([s["latents"] for s in samples]),
        cond=cond,
        # contiguous: an expanded view shares memory across rows, which pin_memory (CUDA loaders) rejects.
        uncond={**{k: v.to(cond[k].dtype).expand(n, *v.shape[1:]).contiguous() for k, v in uncond.items() if k in cond},
                **{k: cond[k] for k in from_cond}},
        captions=[s["caption"] for s in samples],
        skipped=dict(skipped),
        failed_shards=failed_shards(samples),
    )
    if all(s["latents_std"] is not None for s in samples):
        batch["latents_std"] = torch.stack([s["latents_std"] for s in samples])
    if "stream_pos" in samples[-1]:
        batch["stream_pos"] = samples[-1]["stream_pos"]
    return batch


def build_cached_dataloader(cfg: DataConfig) -> DataLoader:
    """The infinite per-process loader over cached shards (`cfg.train_shards_path_or_url` names them)."""
    meta, uncond = read_sidecar(cfg.train_shards_path_or_url)
    workers = cfg.dataloader_num_workers
    return DataLoader(
        CachedLatentShards(cfg, meta, uncond),
        batch_size=cfg.train_batch_size,
        collate_fn=partial(collate_cached, uncond=uncond, from_cond=tuple(meta.get("uncond_from_cond", []))),
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=leave_ctrl_c_to_the_trainer,
        pin_memory=torch.cuda.is_available(),
    )


def cached_inputs(batch: dict[str, Any], device: torch.device) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """`(x0, cond, uncond)` of a cached batch: `x0 = mean + std * n`, n ~ N(0, I) (the VAE posterior sample, scaled)."""
    mean = batch["latents"].to(device, non_blocking=True).float()
    x0 = mean
    if "latents_std" in batch:
        # Same draw as DiagonalGaussianDistribution.sample() on an fp32 posterior: one randn of the latent shape.
        n = torch.randn(mean.shape, device=device, dtype=torch.float32)
        x0 = mean + batch["latents_std"].to(device, non_blocking=True).float() * n
    cond = {k: v.to(device, non_blocking=True) for k, v in batch["cond"].items()}
    uncond = {k: v.to(device, non_blocking=True) for k, v in batch["uncond"].items()}
    return x0, cond, uncond
