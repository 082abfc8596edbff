"""Webdataset input pipeline: resampled tar shards -> cropped image/caption batches with failure accounting."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import secrets
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shard_failures import DataError, FailureTracker, failed_shards
from .shard_stream import group_samples, missing_reason, open_shard, tar_members
from .stops import leave_ctrl_c_to_the_trainer

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt", "text", "caption")
JSON_CAPTION_FIELDS = ("caption", "text")
INTERPOLATIONS = {name: getattr(Image.Resampling, name.upper()) for name in ("bilinear", "bicubic", "box", "nearest", "hamming", "lanczos")}
INTERPOLATIONS["nearest_exact"] = Image.Resampling.NEAREST  # torchvision's NEAREST_EXACT on a PIL image (diffusers' resolve_interpolation_mode)


@dataclass
class DataConfig:
    """Options for the webdataset training loader (one instance per process)."""

    train_shards_path_or_url: str | list[str]  # brace pattern, '::'-joined, list, local paths or "pipe:..." urls
    resolution: int = 512
    interpolation_type: str = "bilinear"  # bilinear | bicubic | nearest | lanczos (PIL filters)
    center_crop: bool = False  # else random crop
    random_flip: bool = False
    train_batch_size: int = 16  # per process
    dataloader_num_workers: int = 0  # 0 loads in the main process
    proportion_empty_prompts: float = 0.0  # probability of replacing a caption with ""
    seed: int | None = None  # None: a fresh random stream per process
    rank: int = 0
    world_size: int = 1
    failure_patience: int = 1000  # consecutive failed samples/shards (per worker) before DataError
    shard_resample_seed_offset: int = 0  # added to the seed: a different stream for the same seed
    resume_state: dict | None = None  # StreamTracker.state() of this rank from a checkpoint: continue exactly there
    min_image_size: int = 0  # skip images whose original short side is below this (0 = off; SDXL scripts: 700)
    max_pwatermark: float = 1.0  # skip samples whose json pwatermark is above this (1.0 = off; SDXL scripts: 0.5)
    stall_timeout: float = 60.0  # seconds a pipe: shard (curl, ...) may send nothing before it counts as `stalled` (0 = wait)

    def __post_init__(self) -> None:
        """Reject configurations that would otherwise fail later, inside a worker, less clearly."""
        checks = [
            (self.resolution > 0, f"resolution must be positive, got {self.resolution}"),
            (self.interpolation_type in INTERPOLATIONS, f"interpolation_type must be one of {list(INTERPOLATIONS)}, got {self.interpolation_type!r}"),
            (self.train_batch_size > 0, f"train_batch_size must be positive, got {self.train_batch_size}"),
            (self.dataloader_num_workers >= 0, f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}"),
            (0.0 <= self.proportion_empty_prompts <= 1.0, f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}"),
            (self.failure_patience >= 1, f"failure_patience must be >= 1, got {self.failure_patience}"),
            (self.stall_timeout >= 0, f"stall_timeout must be >= 0, got {self.stall_timeout}"),
            (self.min_image_size >= 0, f"min_image_size must be >= 0, got {self.min_image_size}"),
            (0.0 <= self.max_pwatermark <= 1.0, f"max_pwatermark must be in [0, 1], got {self.max_pwatermark}"),
            (0 <= self.rank < self.world_size, f"need 0 <= rank < world_size, got rank={self.rank} world_size={self.world_size}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def expand_urls(spec: str | os.PathLike | list[str] | tuple[str, ...]) -> list[str]:
    """Expand a shard spec (braces, '::'-joined string, or list of either) into a flat url list."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, (list, tuple)):
        parts = [u for item in spec for u in expand_urls(item)] if spec else []
    elif isinstance(spec, str):
        # Split on '::' but not inside [...] so IPv6 hosts like http://[::1]/x.tar survive.
        chunks = [c.strip() for c in re.split(r"::(?![^\[]*\])", spec)]
        parts = [u for c in chunks if c for u in braceexpand.braceexpand(c)]
        # open() does not expand '~', and gopen treats scheme-less urls as local paths.
        parts = [os.path.expanduser(u) if u.startswith("~") else u for u in parts]
    else:
        raise TypeError(f"shard spec must be str or list of str, got {type(spec).__name__}")
    if not parts:
        raise ValueError(f"shard spec {spec!r} expands to no urls")
    return parts


class SkipSample(Exception):
    """A sample is unusable; `kind` is the counter it is reported under."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


def _describe(exn: BaseException) -> str:
    """Short `Type: message` text for failure reports."""
    if isinstance(exn, OSError) and exn.strerror:  # its args[0] is the errno: "FileNotFoundError: 2" said nothing
        return f"{type(exn).__name__}: {exn.strerror}" + (f": {exn.filename}" if exn.filename else "")
    return f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # PIL's own I->L conversion clips at 255 instead of scaling, turning 16-bit images white.
        # Integer modes come from 16-bit PNG/TIFF in practice, so scale from the 16-bit range.
        raw, key = np.asarray(img), img.info.get("transparency")  # a PNG's tRNS: the gray value that is transparent
        gray = np.clip(np.rint(raw.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(gray, "L") if key is None else Image.fromarray(np.dstack([gray, 255 * (raw != key)]).astype(np.uint8), "LA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to a fully loaded RGB image, keeping the decompression-bomb guard."""
    try:
        with warnings.catch_warnings():
            # Between 1x and 2x MAX_IMAGE_PIXELS PIL only warns; treat that as too large as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        raise SkipSample("too_large", str(exn)) from None
    except Image.UnidentifiedImageError:  # its message names only a BytesIO's address; the bytes say what came instead
        raise SkipSample("decode_error", f"not an image PIL reads: {len(data)} bytes starting {data[:12]!r}") from None
    except Exception as exn:
        raise SkipSample("decode_error", _describe(exn)) from None
    try:
        # Phone photos store rotation in EXIF; check first since exif_transpose always copies.
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # a malformed EXIF block should not cost the sample
    try:
        img = _to_rgb(img)
    except Exception as exn:
        raise SkipSample("decode_error", f"mode {img.mode}: {_describe(exn)}") from None
    if img.width <= 0 or img.height <= 0:
        raise SkipSample("decode_error", f"empty image {img.size}")
    return img


def _caption(sample: dict[str, Any]) -> str:
    """Return the caption from txt/text/caption members or a json member's caption/text field."""
    for key in CAPTION_KEYS:
        if key in sample:
            return sample[key].decode("utf-8-sig", errors="replace").strip()
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8-sig", errors="replace"))
        except ValueError as exn:
            raise SkipSample("caption_error", f"bad json: {exn}") from None
        if isinstance(meta, dict):
            for field in JSON_CAPTION_FIELDS:
                if isinstance(meta.get(field), str):
                    return meta[field].strip()
    raise SkipSample("missing_caption", missing_reason(sample, "caption", (*CAPTION_KEYS, "json")))


def _json_numbers(sample: dict[str, Any], fields: tuple[str, ...]) -> list[float | None]:
    """Numeric fields of the sample's json member; None for each one the member, field or value makes unusable."""
    try:
        meta = json.loads(sample["json"].decode("utf-8-sig", errors="replace")) if "json" in sample else None
    except ValueError:
        meta = None
    out: list[float | None] = []
    for field in fields:
        try:
            value = float(meta[field]) if isinstance(meta, dict) and meta.get(field) is not None else None
        except (ValueError, TypeError):
            value = None
        out.append(value if value is not None and np.isfinite(value) else None)
    return out


def _check_filters(sample: dict[str, Any], cfg: DataConfig, decoded_size: tuple[int, int] | None = None) -> bool:
    """Size and watermark filters of diffusers' SDXL LCM script; returns whether the size still needs the decoded image.

    Unlike the reference (which drops every sample lacking these json fields, so a dataset without them never
    yields a batch), a missing `pwatermark` passes and a missing `original_width/height` falls back to the decoded size.
    """
    if cfg.min_image_size <= 0 and cfg.max_pwatermark >= 1.0:
        return False
    pw, w, h = _json_numbers(sample, ("pwatermark", "original_width", "original_height"))
    if pw is not None and pw > cfg.max_pwatermark:
        raise SkipSample("watermark", f"pwatermark {pw} > --max_pwatermark {cfg.max_pwatermark}")
    if cfg.min_image_size <= 0:
        return False
    if w is None or h is None:
        if decoded_size is None:
            return True
        w, h = decoded_size
    if min(w, h) < cfg.min_image_size:
        raise SkipSample("too_small", f"original size {int(w)}x{int(h)} < --min_image_size {cfg.min_image_size}")
    return False


def _crop_resize(img: Image.Image, cfg: DataConfig, rng: random.Random) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize shorter side to R, crop R x R, maybe flip; return CHW [-1,1] tensor, (h, w), (top, left)."""
    r = cfg.resolution
    w, h = img.size
    # torchvision Resize(int) sizing: short side -> r, long side truncated, never below r.
    rw, rh = (r, max(r, int(r * h / w))) if w <= h else (max(r, int(r * w / h)), r)
    flip = cfg.random_flip and rng.random() < 0.5
    if cfg.center_crop:
        top, left = int(round((rh - r) / 2.0)), int(round((rw - r) / 2.0))
    else:
        top, left = rng.randint(0, rh - r), rng.randint(0, rw - r)
    # Resample only the crop's source box: same pixels as resize-then-crop, without materialising
    # the full resized image (which for extreme aspect ratios could be gigabytes).
    sx, sy = w / rw, h / rh
    box = (left * sx, top * sy, (left + r) * sx, (top + r) * sy)
    img = img.resize((r, r), INTERPOLATIONS[cfg.interpolation_type], box=box)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # Report the crop in the flipped frame (flip-then-crop, as diffusers' SDXL scripts do).
        left = rw - r - left
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float()
    return pixels.div_(127.5).sub_(1.0), (h, w), (top, left)


def _no_worker_seed() -> int:
    """Worker seed hook for ResampledShards; rank and worker are already mixed into our seed."""
    return 0


class ImageTextShards(IterableDataset):
    """Infinite stream of transformed samples from resampled webdataset shards."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.urls = expand_urls(cfg.train_shards_path_or_url)
        # Without a seed, draw one here so re-iterating this dataset repeats, but processes differ.
        base = secrets.randbits(62) if cfg.seed is None else cfg.seed
        self.base_seed = base + cfg.shard_resample_seed_offset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield samples forever, or raise DataError when nothing usable arrives."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from workers round-robin; on resume, physical worker 0 plays the logical
        # worker whose batch is due next, so the batch sequence continues exactly where the checkpoint left it.
        start, positions, fresh = 0, {}, ""
        rs = self.cfg.resume_state
        if rs and rs.get("num_workers") == num_workers and rs.get("world_size", self.cfg.world_size) == self.cfg.world_size:
            start, positions = int(rs["next_worker"]), rs.get("positions", {})
        elif rs:
            # Another worker count, or process count (each rank reads its own share of the shards): the saved positions
            # do not apply. Logical worker 0's key would be the one the checkpoint's run started from, replaying its
            # first samples; salt it with the saved state instead.
            fresh = ":resumed:" + json.dumps(rs, sort_keys=True)
        logical = (worker + start) % num_workers
        shard_skip, raw_skip, *widened = positions.get(str(logical), (0, 0))
        wide_at = widened[0] if widened else None  # the shard draw from which this worker reads its rank's whole share
        # String seeding hashes with sha512, so it is stable across processes (unlike hash()).
        key = f"tcdistill.data:{self.base_seed}:{self.cfg.rank}:{logical}{fresh}"
        seed = random.Random(key).getrandbits(62)
        # Each rank, then each of its loader workers, resamples from its own share of the shards: two streams drawing
        # the same shard at once would read its samples in the same order and yield identical batches (half the
        # steps with 2 shards and 2 ranks or 2 workers). With fewer shards than streams, the streams share them (read shuffled).
        ws = self.cfg.world_size
        rank_urls = self.urls[self.cfg.rank::ws] if ws > 1 and len(self.urls) >= ws else self.urls
        urls = rank_urls[logical::num_workers] if num_workers > 1 and len(rank_urls) >= num_workers else rank_urls
        share = f" (its share: {len(rank_urls)} of the {len(self.urls)} shards)" if len(rank_urls) < len(self.urls) else ""
        shared = (num_workers > 1 and len(rank_urls) < num_workers) or (ws > 1 and len(self.urls) < ws)
        tracker = FailureTracker(self.cfg.failure_patience, f"rank {self.cfg.rank} worker {worker}/{num_workers}{share}")
        draws = [iter(wds.ResampledShards(u, seed=seed + i, worker_seed=_no_worker_seed, deterministic=True)) for i, u in enumerate((urls, rank_urls))]
        for shard_idx in itertools.count():
            widened = wide_at is not None and shard_idx >= wide_at
            shard = next(draws[widened])
            if shard_idx < shard_skip:
                continue  # replaying the shard draws is cheap: RNG only, nothing is opened
            skip = raw_skip if shard_idx == shard_skip else 0
            try:
                for out in self._shard_samples(shard["url"], key, shard_idx, skip, tracker, widened or shared):
                    out["stream_pos"] = (logical, num_workers, shard_idx, out.pop("raw_next"), wide_at)
                    yield out
            except DataError:
                # Only bad shards in this worker's part of the rank's share (with 0 workers the rank would train on the
                # rest): from the next draw on it reads the whole share, which other workers read too; counted once.
                if wide_at is not None or len(urls) == len(rank_urls):
                    raise
                wide_at = shard_idx + 1
                tracker.restart("worker_share_widened")

    def _shard_samples(self, url: str, key: str, shard_idx: int, skip: int, tracker: FailureTracker, shuffle: bool = False) -> Iterator[dict[str, Any]]:
        """Yield the usable samples of one shard after its first `skip` raw samples, recording every failure."""
        shard_failed = False

        def tar_handler(exn: Exception) -> bool:
            # A tar stream that raised has lost its position: count the shard once and stop reading it.
            nonlocal shard_failed
            shard_failed = True
            tracker.fail("stalled" if getattr(stream, "stalled", False) else "shard_error", url, _describe(exn))
            return False

        def group_handler(exn: Exception) -> bool:
            # Grouping errors (duplicate member names) are local; the rest of the shard stays usable.
            tracker.fail("member_error", url, _describe(exn))
            return not tracker.exhausted

        stream: Any = None
        try:
            stream = open_shard(url, self.cfg.stall_timeout)
        except Exception as exn:
            tar_handler(exn)
            tracker.check()
            return
        n_raw = 0
        try:
            # webdataset's own grouping handles the end-of-shard marker that broke old copies.
            files = tar_members(url, stream, tar_handler)
            raws = group_samples(files, group_handler)
            # A widened worker, or a stream sharing its shards, reads shards another stream reads, in step with it: in tar order
            # both yield the same batch a step apart (a loader takes its workers' batches in turn; ranks train at once). It reads
            # them through a 32-sample shuffle seeded by the draw, which a resume's `skip` replays exactly.
            for raw in (wds.filters.shuffle(32, 32, rng=random.Random(f"{key}:{shard_idx}:order"))(raws) if shuffle else raws):
                n_raw += 1
                if n_raw <= skip:
                    continue  # already consumed before the checkpoint: read past it without decoding
                try:
                    out = self._process(raw, self._sample_rng(key, shard_idx, n_raw, raw))
                except SkipSample as bad:
                    tracker.fail(bad.kind, url, f"{raw.get('__key__')}: {bad}")
                    tracker.check()
                    continue
                out["skipped"], out["failed_shards"] = tracker.success(), tracker.take_shards()
                out["raw_next"] = n_raw
                yield out
        finally:
            try:
                stream.close()
            except Exception as exn:
                # A pipe: command that failed after its last whole member surfaces only here: count the shard once.
                if not shard_failed:
                    tar_handler(exn)
        if n_raw == 0 and not shard_failed:
            tracker.fail("empty_shard", url, "shard contains no samples")
        tracker.check()

    def _sample_rng(self, key: str, shard_idx: int, n_raw: int, raw: dict[str, Any]) -> random.Random:
        """One RNG per sample position, so crops/flips/empty prompts replay exactly after a resume."""
        return random.Random(f"{key}:{shard_idx}:{n_raw}")

    def _process(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """Turn one grouped tar sample into a transformed training sample or raise SkipSample."""
        image_key = next((k for k in IMAGE_KEYS if k in raw), None)
        if image_key is None:
            raise SkipSample("missing_image", missing_reason(raw, "image", IMAGE_KEYS))
        caption = _caption(raw)  # before decoding: cheap checks first
        size_pending = _check_filters(raw, self.cfg)
        img = _decode_image(raw[image_key])
        if size_pending:
            _check_filters(raw, self.cfg, decoded_size=img.size)
        try:
            pixels, original_size, crop_top_left = _crop_resize(img, self.cfg, rng)
        except Exception as exn:
            raise SkipSample("transform_error", _describe(exn)) from None
        if self.cfg.proportion_empty_prompts > 0 and rng.random() < self.cfg.proportion_empty_prompts:
            caption = ""
        return dict(pixel_values=pixels, caption=caption, original_size=original_size, crop_top_left=crop_top_left)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch and sum their skipped-sample deltas; keep the stream position after the batch."""
    skipped: Counter[str] = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    return dict(
        pixel_values=torch.stack([s["pixel_values"] for s in samples]),
        captions=[s["caption"] for s in samples],
        original_sizes=torch.tensor([s["original_size"] for s in samples], dtype=torch.long),
        crop_top_lefts=torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        skipped=dict(skipped),
        failed_shards=failed_shards(samples),
        stream_pos=samples[-1]["stream_pos"],
    )


class StreamTracker:
    """Follows the position of consumed batches so a checkpoint can restart the stream exactly there."""

    def __init__(self, state: dict | None = None):
        self.num_workers, self.next_worker, self.positions = 1, 0, {}
        # The stream's seed when the run has no --seed (drawn once by the trainer): a resume must read the same
        # resampled stream, or the saved positions would point into another one.
        self.base_seed: int | None = None
        self.world_size: int | None = None  # processes of the run that read the stream (the shards' split across ranks)
        if state:
            self.num_workers, self.next_worker = int(state["num_workers"]), int(state["next_worker"])
            self.positions = {str(k): list(v) for k, v in state["positions"].items()}
            self.base_seed = int(state["base_seed"]) if state.get("base_seed") is not None else None
            self.world_size = int(state["world_size"]) if state.get("world_size") is not None else None

    def consumed(self, batch: dict[str, Any]) -> None:
        """Record that `batch` was used for training."""
        logical, num_workers, shard_idx, raw_next, wide_at = batch["stream_pos"]
        self.num_workers = int(num_workers)
        self.positions[str(logical)] = [int(shard_idx), int(raw_next)] + ([] if wide_at is None else [int(wide_at)])
        self.next_worker = (int(logical) + 1) % self.num_workers

    def state(self) -> dict:
        """A weights_only-safe dict for DataConfig.resume_state."""
        state = {"num_workers": self.num_workers, "next_worker": self.next_worker, "positions": dict(self.positions)}
        if self.world_size is not None:
            state["world_size"] = self.world_size
        return state if self.base_seed is None else {**state, "base_seed": self.base_seed}


def build_train_dataloader(cfg: DataConfig) -> DataLoader:
    """Build the infinite per-process training DataLoader described by `cfg`."""
    workers = cfg.dataloader_num_workers
    # Batching happens inside each worker, so each batch carries that worker's skip counts.
    return DataLoader(
        ImageTextShards(cfg),
        batch_size=cfg.train_batch_size,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=leave_ctrl_c_to_the_trainer,
        pin_memory=torch.cuda.is_available(),  # lets the trainer's non_blocking host->device copy overlap
    )
