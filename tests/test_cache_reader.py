"""`tcdistill cache`'s shard reader (the training loader's, reading each shard once) and the training flags it prints."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shards_util import good_sample, image_bytes, write_shard

from tcdistill.cache import _OnePass, train_flags
from tcdistill.data import DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _reader(url: str, **kw: object) -> _OnePass:
    return _OnePass(DataConfig(train_shards_path_or_url=url, resolution=16, seed=0, **kw))


def test_the_cache_reads_a_shard_past_any_run_of_bad_samples(tmp_path: Path) -> None:
    """Mutation QA: a reader that gave a shard up after a few consecutive bad samples (as a training stream does at its
    --data_failure_patience) passed every test; the cache reads every source shard to its end once, whatever the patience."""
    bad = [(f"n{j}", {"txt": "no image"}) for j in range(3)]
    shard = write_shard(tmp_path / "s.tar", [*bad, good_sample("g", "good"), ("n9", {"txt": "no image"})])
    skipped: Counter[str] = Counter()
    assert [k for k, _ in _reader(shard, failure_patience=2).read_once(shard, skipped)] == ["g"]
    assert skipped == {"missing_image": 4}


def test_a_cached_samples_crop_follows_its_key_and_the_seed_not_its_place(tmp_path: Path) -> None:
    """Mutation QA: drawing the cached crop/flip by position in the shard (as training does, for its resume) instead of by
    sample key passed every test: the same sample then got another crop in another shard, and --seed changed no crop."""
    ramp = np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (16, 64, 3))  # a crop shows where it is
    samples = [(f"k{j}", {"png": image_bytes(Image.fromarray(np.ascontiguousarray(ramp)), "PNG"), "txt": f"c{j}"}) for j in range(6)]
    one, other = write_shard(tmp_path / "a.tar", samples), write_shard(tmp_path / "b.tar", samples[::-1])

    def pixels(url: str, seed: int) -> dict[str, torch.Tensor]:
        ds = _OnePass(DataConfig(train_shards_path_or_url=url, resolution=16, seed=seed, random_flip=True))
        return {k: s["pixel_values"] for k, s in ds.read_once(url, Counter())}

    a, b = pixels(one, 0), pixels(other, 0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reseeded = pixels(one, 1)
    assert any(not torch.equal(a[k], reseeded[k]) for k in a)


def test_printed_train_flags_name_the_family_and_only_what_differs_from_its_scripts_defaults() -> None:
    """Mutation QA: the SDXL cache's --model_family, and leaving out settings equal to the family scripts' defaults,
    were pinned by no test (the fit test passes the SDXL defaults itself). A pattern with a space is shell-quoted."""
    meta = dict(pattern="my cache/{00000..00001}.tar", resolution=64, model_family="sd", center_crop=True, random_flip=False,
                use_fix_crop_and_size=False, interpolation_type="bilinear", min_image_size=0, max_pwatermark=1.0)
    assert train_flags(meta) == ["--train_latents_path_or_url='my cache/{00000..00001}.tar'", "--resolution=64", "--center_crop"]
    sdxl = dict(meta, model_family="sdxl", center_crop=False, random_flip=True, min_image_size=700, max_pwatermark=0.3,
                interpolation_type="lanczos")
    assert train_flags(sdxl)[2:] == ["--model_family=sdxl", "--random_flip", "--interpolation_type=lanczos", "--max_pwatermark=0.3"]


def test_printed_train_flags_carry_the_caches_clip_skip() -> None:
    """QA review: a cache made with --clip_skip printed `train with:` flags without it, and the run they gave was refused
    ("the cache's prompt states were made with clip skip 2")."""
    meta = dict(pattern="c/{00000..00001}.tar", resolution=32, model_family="sd", clip_skip=2)
    assert "--clip_skip=2" in train_flags(meta)
    assert not any(f.startswith("--clip_skip") for f in train_flags(dict(meta, clip_skip=None)))
