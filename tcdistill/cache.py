"""`tcdistill cache`: encode image/caption shards once into latent + prompt-embedding shards.

Train from the result with `--train_latents_path_or_url` on the same scripts: the training step then runs no VAE
encoder and no text encoder (the layout is described in `tcdistill.data_cached`). The crop (and flip, with
`--random_flip`) is drawn once here, not per epoch; the VAE posterior is stored as (mean, std) so training still
draws a fresh `x0 ~ N(mean, std^2)` at every step, as the reference does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_file
from .argparsing import DefaultsHelpFormatter, OneLineParser
from .config import ConfigError, TrainConfig
from .data import INTERPOLATIONS, DataConfig, ImageTextShards, expand_urls
from .data_cached import FORMAT, LATENTS, LATENTS_STD, META_NAME, UNCOND_NAME, vae_encoder_fingerprint
from .models import DTYPES
from .preflight import lock_output_dir
from .shard_failures import FailureTracker, ShardFailureLog

if TYPE_CHECKING:
    from .families import ModelFamily

STORAGE = {"fp16": np.float16, "fp32": np.float32}
# Stored in fp32 whatever --storage_dtype says: SDXL's time ids are pixel counts, embedded sinusoidally per pixel, and fp16
# holds integers exactly only up to 2048 (an original width of 2051 would cache as 2052: another conditioning than live).
EXACT_KEYS = ("time_ids",)
SHARD_NAME = r"\d{5,}\.tar"  # the cached shards' names (00000.tar, ...; past 5 digits at shard 100000)


class _OnePass(ImageTextShards):
    """The training loader's shard reader, reading each shard exactly once, in order."""

    # Training's reader (decode/crop/caption transform, failure kinds) as it is: a sample the cache skips is one training
    # would skip, and the other way round.
    last_failure = ""  # "url: reason" of the last skip, for the error of a run that finds no usable sample

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.shard_log = ShardFailureLog()  # names each failing source shard, as training does

    def read_once(self, url: str, skipped: Counter[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (key, sample) for the usable samples of `url`; failures are counted in `skipped`."""
        tracker = FailureTracker(sys.maxsize, url)  # never gives up: every source shard is read to its end once
        for out in self._shard_samples(url, "", 0, 0, tracker):
            skipped.update(out.pop("skipped"))
            self.shard_log.report(out.pop("failed_shards"))
            yield out.pop("key"), out
        skipped.update(tracker.pending)  # the failures after the shard's last usable sample
        self.shard_log.report(tracker.take_shards())
        if tracker.last_msg:
            self.last_failure = f"{url}: {tracker.last_msg}"

    def _sample_rng(self, key: str, shard_idx: int, n_raw: int, raw: dict[str, Any]) -> random.Random:
        # One RNG per sample key: the cached crop does not depend on shard order.
        return random.Random(f"tcdistill.cache:{self.base_seed}:{raw.get('__key__', '')}")

    def _process(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        return {**super()._process(raw, rng), "key": raw.get("__key__", "")}


def build_parser() -> argparse.ArgumentParser:
    """Flags of `tcdistill cache` (data flags mean what they mean for training)."""
    p = OneLineParser(prog="tcdistill cache", description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--pretrained_teacher_model", required=True, help="Teacher pipeline: hub id or local diffusers folder.")
    p.add_argument("--model_family", default="sd", choices=["sd", "sdxl"], help="Teacher family (as the entry script sets it).")
    p.add_argument("--pretrained_vae_model_name_or_path", default=None, help="A different VAE (as for training).")
    p.add_argument("--clip_skip", type=int, default=None, help="Prompt states this many layers before the text encoder's last "
                   "(as training's --clip_skip; recorded, and a run with another value is refused). Default: none.")
    p.add_argument("--teacher_revision", default=None, help="Revision of the teacher on the hub (as for training).")
    p.add_argument("--cache_dir", default=None, help="Download cache for hub models.")
    p.add_argument("--train_shards_path_or_url", required=True, help="Source image/caption webdataset shards.")
    p.add_argument("--output_dir", required=True, help="Where the cached shards and sidecar files go.")
    p.add_argument("--resolution", type=int, default=None, help="Default: 512 (SDXL: 1024), as the training scripts.")
    p.add_argument("--interpolation_type", default="bilinear", choices=list(INTERPOLATIONS), help="Resize interpolation (as training's).")
    p.add_argument("--center_crop", action="store_true", help="Center crop (default: a random crop, drawn once per sample).")
    p.add_argument("--random_flip", action="store_true", help="Flip half the samples (drawn once per sample).")
    p.add_argument("--use_fix_crop_and_size", action="store_true", help="SDXL: micro-condition on (resolution, resolution) and crop (0, 0).")
    p.add_argument("--min_image_size", type=int, default=None, help="Skip images smaller than this (default 0; SDXL: 700, as its scripts).")
    p.add_argument("--max_pwatermark", type=float, default=None, help="Skip samples whose json pwatermark exceeds this (default 1.0 = off; SDXL: 0.5, as its scripts).")
    p.add_argument("--batch_size", type=int, default=32, help="Images per VAE/text-encoder call.")
    p.add_argument("--encode_dtype", default="fp32", choices=list(DTYPES), help="Dtype of the VAE and text encoder while caching "
                   "(an SDXL VAE whose config sets force_upcast, as SDXL's own, stays fp32 under fp16, as in training).")
    p.add_argument("--storage_dtype", default="fp16", choices=list(STORAGE), help="Dtype of the stored arrays.")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the crops/flips.")
    p.add_argument("--data_timeout", type=float, default=60.0, help="Seconds a pipe: shard may send no data before it is "
                   "given up (its command killed) and counted as `stalled`, as in training (0 = wait forever).")
    return p


def _npy_bytes(a: Tensor, dtype: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.detach().float().cpu().numpy().astype(dtype), allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def _encode(family: ModelFamily, batch: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Posterior (mean, std) x scaling_factor, and the prompt conditioning of a batch."""
    from .models import latent_normalization, scale_latents

    vae = family.vae
    # The VAE's own dtype, not --encode_dtype: SDXL's VAE stays fp32 under fp16 (family.to, as in training).
    dist = vae.encode(batch["pixel_values"].to(device, next(vae.parameters()).dtype)).latent_dist
    norm = latent_normalization(vae.config, family.name)  # as training encodes (SDXL VAEs with latents_mean/std)
    return scale_latents(dist.mean, vae.config, norm), scale_latents(dist.std, vae.config, norm, std_only=True), family.encode(batch, device)


def _batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """What the families' encode()/uncond() read from a training batch (SDXL's time ids need sizes and crops)."""
    return dict(pixel_values=torch.stack([s["pixel_values"] for s in samples]), captions=[s["caption"] for s in samples],
                original_sizes=torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
                crop_top_lefts=torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long))


@torch.no_grad()
def _uncond_layout(family: ModelFamily, batch: dict[str, Any], device: torch.device) -> tuple[dict[str, Tensor], list[str]]:
    """The sidecar's tensors and the keys whose unconditional value is the sample's own conditioning (SDXL's time ids).

    Stored once: the unconditional conditioning of every other key, and `empty.<key>`, the encoding of "" that
    --proportion_empty_prompts puts in (for SD the same as the unconditional; SDXL's unconditional is zeros unless
    the teacher sets `force_zeros_for_empty_prompt` false).
    Probed with the caption "a", so empty captions in the data cannot make an embedding look sample-specific.
    """
    n = len(batch["captions"])
    cond, uncond = family.encode(dict(batch, captions=["a"] * n), device), family.uncond(batch, device)
    empty = family.encode(dict(batch, captions=[""] * n), device)
    shared, from_cond = {}, []
    for k, u in uncond.items():
        if torch.equal(u, cond[k]):
            from_cond.append(k)
            continue
        for name, v in ((k, u), (f"empty.{k}", empty[k])):
            if not all(torch.equal(v[0], row) for row in v):
                raise ConfigError(f"{name!r} varies per sample but is not the sample's conditioning; cannot cache it.")
            shared[name] = v[:1]
    return shared, sorted(from_cond)


def fill_family_defaults(args: argparse.Namespace) -> None:
    """--resolution, --min_image_size, --max_pwatermark left unset: the defaults of the family's training scripts (SDXL:
    1024 px, 700, 0.5), so a cache made with the defaults holds what a run with the defaults would train on."""
    from .families import script_defaults

    defaults = script_defaults(args.model_family)
    for key in ("resolution", "min_image_size", "max_pwatermark"):
        if getattr(args, key, None) is None:
            setattr(args, key, defaults[key])


def run_cache(args: argparse.Namespace) -> dict[str, Any]:
    """Encode every usable sample of every source shard once; returns the summary also written to the sidecar."""
    from safetensors.torch import save

    from .families import load_family

    fill_family_defaults(args)
    cfg, tokenizers, device = _check_cache_flags(args)
    dtype, store = DTYPES[args.encode_dtype], STORAGE[args.storage_dtype]
    os.makedirs(args.output_dir, exist_ok=True)
    # Two caches into one folder wrote the same NNNNN.tar.tmp names, and each removes the ones it finds at its start: one
    # run published the other's shard in progress as whole, under its own metadata. Locked as a training run's folder is.
    lock_output_dir(args.output_dir, role="`tcdistill cache` run")
    family = load_family(cfg, tokenizers)
    family.unet = None  # only the encoders are needed here
    vae_encoder = vae_encoder_fingerprint(family.vae)  # as loaded, before the cast to --encode_dtype (training checks it as loaded)
    family.to(device, dtype)
    ds = _OnePass(DataConfig(train_shards_path_or_url=args.train_shards_path_or_url, resolution=args.resolution,
                             interpolation_type=args.interpolation_type, center_crop=args.center_crop,
                             random_flip=args.random_flip, seed=args.seed, min_image_size=args.min_image_size,
                             max_pwatermark=args.max_pwatermark, stall_timeout=args.data_timeout))
    # A killed run (SIGKILL, power loss: no chance to remove it) leaves its shard in progress as NNNNN.tar.tmp, which no
    # metadata lists and training refuses; one this run would not overwrite stayed in the folder for good.
    for name in os.listdir(args.output_dir):
        if re.fullmatch(SHARD_NAME + r"\.tmp", name):
            os.remove(os.path.join(args.output_dir, name))
    skipped: Counter[str] = Counter()
    layout = _Layout()
    t0 = time.perf_counter()
    shards, n_samples = _cache_shards(args, ds, store, family, device, skipped, layout)
    ds.shard_log.summary()
    if n_samples == 0:
        raise ConfigError(f"no usable sample in {args.train_shards_path_or_url!r} (skipped: {dict(skipped)}; "
                          f"last error: {ds.last_failure}).")
    elapsed = time.perf_counter() - t0
    uncond = {k: v.to(DTYPES[args.storage_dtype]).cpu().contiguous() for k, v in layout.uncond.items()}
    meta = {
        "format": FORMAT, "teacher": cfg.pretrained_teacher_model, "vae": cfg.pretrained_vae_model_name_or_path,
        "resolution": args.resolution, "scaling_factor": float(family.vae.config.scaling_factor), "vae_encoder_sha256": vae_encoder, "latent_shape": layout.latent_shape,
        "cond_keys": layout.cond_keys, "uncond_from_cond": layout.from_cond, "model_family": args.model_family, "clip_skip": args.clip_skip,
        "use_fix_crop_and_size": args.use_fix_crop_and_size, "storage_dtype": args.storage_dtype, "encode_dtype": args.encode_dtype,
        "center_crop": args.center_crop, "random_flip": args.random_flip, "interpolation_type": args.interpolation_type,
        "min_image_size": args.min_image_size, "max_pwatermark": args.max_pwatermark,
        "seed": args.seed, "num_samples": n_samples, "skipped": dict(skipped), "shards": shards,
        # Training refuses a listed shard of another size: one cut short later was read in part, its loss only counted.
        "shard_bytes": {name: os.path.getsize(os.path.join(args.output_dir, name)) for name in shards},
        "seconds": round(elapsed, 3), "samples_per_s": round(n_samples / max(elapsed, 1e-9), 3),
    }
    _atomic_write(os.path.join(args.output_dir, UNCOND_NAME), save(uncond, metadata={"format": FORMAT}))
    _atomic_write(os.path.join(args.output_dir, META_NAME), json.dumps(meta, indent=2).encode("utf-8"))
    meta["pattern"] = os.path.join(args.output_dir, f"{{00000..{len(shards) - 1:05d}}}.tar")
    return meta


def _check_cache_flags(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any], torch.device]:
    """The refusals before the teacher loads (training's own checks of these flags); returns the config, the checked
    tokenizers and the device."""
    from .preflight import check_shards, local_shards, resolve_device
    from .teacher_checks import check_teacher_config

    cfg = TrainConfig(pretrained_teacher_model=args.pretrained_teacher_model, train_shards_path_or_url=args.train_shards_path_or_url,
                      pretrained_vae_model_name_or_path=args.pretrained_vae_model_name_or_path, teacher_revision=args.teacher_revision,
                      cache_dir=args.cache_dir, resolution=args.resolution, max_train_steps=1, report_to="none",
                      model_family=args.model_family, use_fix_crop_and_size=args.use_fix_crop_and_size,
                      data_timeout=args.data_timeout, clip_skip=args.clip_skip)  # its checks are this command's too
    check_shards(args.train_shards_path_or_url)  # as training does: after the flags, before the teacher loads
    out = os.path.realpath(args.output_dir)
    for url, path in local_shards(expand_urls(args.train_shards_path_or_url)):
        # Cached shard k was written over the source of that name once read: the images were gone.
        if os.path.dirname(os.path.realpath(path)) == out and re.fullmatch(SHARD_NAME, os.path.basename(path)):
            raise ConfigError(f"--output_dir {args.output_dir!r} holds the source shard {url}, which a cached shard of its name "
                              "would replace; pick another --output_dir.")
    tokenizers = check_teacher_config(cfg)
    if args.batch_size < 1:
        raise ConfigError("--batch_size must be >= 1.")
    return cfg, tokenizers, resolve_device(args.device)


@dataclass
class _Layout:
    """What the encoded batches tell the sidecar: latent shape, conditioning keys, the shared unconditional tensors and
    the keys whose unconditional value is the sample's own conditioning (the last two from the first batch)."""

    latent_shape: list[int] | None = None
    cond_keys: list[str] | None = None
    uncond: dict[str, Tensor] | None = None
    from_cond: list[str] | None = None


def _cache_shards(args: argparse.Namespace, ds: _OnePass, store: Any, family: ModelFamily, device: torch.device,
                  skipped: Counter[str], layout: _Layout) -> tuple[list[str], int]:
    """Each source shard with a usable sample becomes the next cached shard, published whole; returns (names, samples)."""
    shards, n_samples = [], 0
    for url in expand_urls(args.train_shards_path_or_url):
        # Sequential names: source shards from several folders may share a basename.
        name = f"{len(shards):05d}.tar"
        tmp = os.path.join(args.output_dir, name + ".tmp")
        written = _write_shard(tmp, ds.read_once(url, skipped), args.batch_size, store, family, device, layout)
        if written == 0:  # a missing or failing source (counted in skipped): no empty shard for the loader
            os.remove(tmp)
            continue
        n_samples += written
        if not shards:
            # The metadata is the completion marker, written last: drop an earlier run's before overwriting its shards, so
            # a run killed or failing from here leaves a folder training refuses, not old metadata over old and new shards.
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(args.output_dir, META_NAME))
        os.replace(tmp, os.path.join(args.output_dir, name))  # a killed run leaves only *.tmp, never a short shard
        shards.append(name)
    return shards, n_samples


def _write_shard(tmp: str, samples: Iterator[tuple[str, dict[str, Any]]], batch_size: int, store: Any, family: ModelFamily,
                 device: torch.device, layout: _Layout) -> int:
    """Encode `samples` in batches of `batch_size` into the tar `tmp`; returns how many it wrote."""
    import webdataset as wds

    written = 0
    try:
        with wds.TarWriter(tmp) as sink:
            pending: list[tuple[str, dict[str, Any]]] = []
            for key, sample in samples:
                pending.append((key, sample))
                if len(pending) >= batch_size:
                    written += _write_batch(sink, pending, store, family, device, layout)
                    pending = []
            if pending:
                written += _write_batch(sink, pending, store, family, device, layout)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a partial shard (disk full, an error) is not left behind
        raise
    return written


def _write_batch(sink: Any, pending: list[tuple[str, dict[str, Any]]], store: Any, family: ModelFamily, device: torch.device,
                 layout: _Layout) -> int:
    """Encode one batch and write its records (latent mean/std, conditioning, caption) to `sink`; returns its size."""
    batch = _batch([s for _, s in pending])
    captions = batch["captions"]
    mean, std, cond = _encode(family, batch, device)
    layout.latent_shape, layout.cond_keys = list(mean.shape[1:]), sorted(cond)
    if layout.uncond is None:
        layout.uncond, layout.from_cond = _uncond_layout(family, batch, device)
    for j, (key, _) in enumerate(pending):
        rec = {"__key__": key, LATENTS: _npy_bytes(mean[j], store), LATENTS_STD: _npy_bytes(std[j], store),
               "txt": captions[j].encode("utf-8")}
        rec.update({f"{k}.npy": _npy_bytes(cond[k][j], np.float32 if k in EXACT_KEYS else store) for k in layout.cond_keys})
        sink.write(rec)
    return len(pending)


def _atomic_write(path: str, data: bytes) -> None:
    with atomic_file(path) as tmp:  # a full disk leaves no partial file behind
        tmp.write_bytes(data)


def main(argv: Sequence[str] | None = None) -> None:
    """`tcdistill cache --pretrained_teacher_model M --train_shards_path_or_url S --output_dir D [...]`."""
    args = build_parser().parse_args(argv)
    try:
        meta = run_cache(args)
    except ConfigError as e:
        sys.exit(f"tcdistill cache: error: {e}")
    except OSError as e:  # read-only or full --output_dir: one line, not a traceback
        sys.exit(f"tcdistill cache: error: writing to {args.output_dir!r} failed: {type(e).__name__}: {e}")
    print(f"cached {meta['num_samples']} samples into {len(meta['shards'])} shard(s) in {meta['seconds']:.1f}s "
          f"({meta['samples_per_s']:.1f} samples/s); skipped: {meta['skipped'] or 'none'}")
    print(f"train with: {' '.join(train_flags(meta))}")


def train_flags(meta: dict[str, Any]) -> list[str]:
    """The training flags that match the cache `meta` describes (pattern, resolution, family, clip skip, fixed data settings)."""
    # Each data setting the cache fixed that the family's scripts would not is named (their defaults left out): a run given
    # them gets neither a "has no effect" warning nor the --use_fix_crop_and_size refusal of prepare_cached_training.
    from .families import script_defaults

    family = meta.get("model_family", "sd")
    defaults = script_defaults(family)
    flags = [f"--train_latents_path_or_url={shlex.quote(meta['pattern'])}", f"--resolution={meta['resolution']}"]
    if family != defaults["model_family"]:  # the SDXL scripts take it as given; `tcdistill train-*` needs it
        flags.append(f"--model_family={family}")
    if meta.get("clip_skip") is not None:  # the cached prompt states' layer: training refuses a run without it
        flags.append(f"--clip_skip={meta['clip_skip']}")
    for key in ("center_crop", "random_flip", "use_fix_crop_and_size"):
        if meta.get(key) and not defaults[key]:
            flags.append(f"--{key}")
    for key in ("interpolation_type", "min_image_size", "max_pwatermark"):
        if meta.get(key) is not None and meta[key] != defaults[key]:
            flags.append(f"--{key}={meta[key]}")
    return flags


if __name__ == "__main__":
    main(sys.argv[1:])
