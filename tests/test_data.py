"""Offline tests for the webdataset training loader in tcdistill.data."""

from __future__ import annotations

import gc
import io
import os
import re
import sys
import time
import traceback
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # shards_util lives next to this file

from shards_util import caption_json, commands_mentioning, good_sample, gray16, image_bytes, solid, within, write_shard  # noqa: E402

from tcdistill.cli import error_line  # noqa: E402
from tcdistill.data import DataConfig, DataError, build_train_dataloader, expand_urls  # noqa: E402

R = 16


def cfg_for(urls, **kw) -> DataConfig:
    """A small, seeded config for tests."""
    kw.setdefault("resolution", R)
    kw.setdefault("train_batch_size", 4)
    kw.setdefault("seed", 0)
    kw.setdefault("failure_patience", 50)
    return DataConfig(train_shards_path_or_url=urls, **kw)


def batches(cfg: DataConfig, n: int) -> list[dict]:
    """The first n batches of a fresh loader."""
    return list(islice(iter(build_train_dataloader(cfg)), n))


def total_skipped(bs: list[dict]) -> Counter:
    """Sum of the per-batch skipped counts."""
    out: Counter = Counter()
    for b in bs:
        out.update(b["skipped"])
    return out


@pytest.fixture
def modes_shard(tmp_path: Path) -> str:
    """One shard with one good sample per PIL mode / caption container, in a fixed order."""
    p = image_bytes(solid("P", (30, 20), 0), "PNG", transparency=0)  # palette entry 0 is transparent
    cmyk = image_bytes(solid("CMYK", (20, 30), (0, 0, 0, 0)), "JPEG")
    samples = [
        ("s0", {"jpg": image_bytes(solid("RGB", (40, 20), (255, 0, 0)), "JPEG"), "txt": "rgb jpg\n"}),
        ("s1", {"png": image_bytes(solid("RGBA", (20, 20), (0, 0, 0, 0)), "PNG"), "json": caption_json("rgba")}),
        ("s2", {"png": image_bytes(solid("L", (24, 24), 0), "PNG"), "json": caption_json("gray", "text")}),
        ("s3", {"png": p, "caption": "palette"}),
        ("s4", {"png": image_bytes(gray16((20, 20), 65535), "PNG"), "text": "sixteen"}),
        ("s5", {"jpeg": cmyk, "txt": b"cmyk \xff\xfe bytes"}),
        ("s6", {"png": image_bytes(solid("LA", (20, 20), (0, 0)), "PNG"), "txt": "la"}),
        ("s7", {"png": image_bytes(solid("1", (20, 20), 0), "PNG"), "txt": "bilevel"}),
        ("s8", {"webp": image_bytes(solid("RGB", (20, 20), (0, 0, 255)), "WEBP"), "txt": "webp"}),
    ]
    return write_shard(tmp_path / "modes.tar", samples)


@pytest.fixture
def mixed_shard(tmp_path: Path) -> str:
    """Good samples interleaved with one failure of each kind."""
    samples = [
        ("a0", {"jpg": b"this is not a jpeg", "txt": "corrupt"}),
        good_sample("a1", "good one"),
        ("a2", {"jpg": image_bytes(solid("RGB", (20, 20), 0), "JPEG")}),  # no caption
        ("a3", {"txt": "no image here"}),
        ("a4", {"png": image_bytes(solid("RGB", (20, 20), 0), "PNG"), "json": b'{"url": "x"}'}),
        good_sample("a5", "good two"),
    ]
    return write_shard(tmp_path / "mixed.tar", samples)


def test_expand_urls_braces_lists_and_pipes() -> None:
    assert expand_urls("/d/s-{000..002}.tar") == ["/d/s-000.tar", "/d/s-001.tar", "/d/s-002.tar"]
    assert expand_urls("/a.tar::/b-{0..1}.tar") == ["/a.tar", "/b-0.tar", "/b-1.tar"]
    assert expand_urls(["/x-{0..1}.tar", "/y.tar"]) == ["/x-0.tar", "/x-1.tar", "/y.tar"]
    pipes = expand_urls("pipe:curl -s -L https://h/s-{00..01}.tar || true")
    assert pipes == ["pipe:curl -s -L https://h/s-00.tar || true", "pipe:curl -s -L https://h/s-01.tar || true"]
    assert expand_urls("pipe:curl -s http://[::1]:8/a.tar") == ["pipe:curl -s http://[::1]:8/a.tar"]
    assert expand_urls("~/s-{0..1}.tar") == [os.path.expanduser("~/s-0.tar"), os.path.expanduser("~/s-1.tar")]
    with pytest.raises(ValueError):
        expand_urls([])


def test_all_modes_decode_to_rgb(modes_shard: str) -> None:
    (b,) = batches(cfg_for(modes_shard, train_batch_size=9, center_crop=True), 1)
    px = b["pixel_values"]
    assert px.shape == (9, 3, R, R) and px.dtype == torch.float32
    assert px.min() >= -1.0 and px.max() <= 1.0
    assert b["captions"][:5] == ["rgb jpg", "rgba", "gray", "palette", "sixteen"]
    assert b["captions"][5].startswith("cmyk ") and "\ufffd" in b["captions"][5]  # errors="replace"
    assert b["skipped"] == {}
    assert b["original_sizes"].dtype == torch.long and b["original_sizes"].shape == (9, 2)
    assert b["original_sizes"][0].tolist() == [20, 40] and b["original_sizes"][5].tolist() == [30, 20]
    assert b["crop_top_lefts"][0].tolist() == [0, (32 - R) // 2]
    mean = px.mean(dim=(2, 3))
    assert torch.allclose(mean[0], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)  # red
    assert torch.allclose(mean[1], torch.ones(3))  # transparent RGBA composited on white
    assert torch.allclose(mean[2], -torch.ones(3))  # black L
    assert torch.allclose(mean[3], torch.ones(3))  # transparent palette on white
    assert torch.allclose(mean[4], torch.ones(3))  # 16-bit full scale is white, not clipped garbage
    assert torch.allclose(mean[5], torch.ones(3), atol=0.05)  # CMYK (0,0,0,0) is white
    assert torch.allclose(mean[6], torch.ones(3))  # transparent LA on white
    assert torch.allclose(mean[7], -torch.ones(3))  # black 1-bit
    assert torch.allclose(mean[8], torch.tensor([-1.0, -1.0, 1.0]), atol=0.05)  # blue webp


def test_sixteen_bit_is_scaled(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "g.tar", [("g", {"png": image_bytes(gray16((20, 20), 32896), "PNG"), "txt": "g"})])
    (b,) = batches(cfg_for(shard, train_batch_size=1), 1)
    assert b["pixel_values"].abs().max() < 0.01  # 32896/257 = 128 -> ~0


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = solid("RGB", (40, 20), (0, 255, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    shard = write_shard(tmp_path / "e.tar", [("e", {"jpg": image_bytes(img, "JPEG", exif=exif.tobytes()), "txt": "e"})])
    (b,) = batches(cfg_for(shard, train_batch_size=1), 1)
    assert b["original_sizes"][0].tolist() == [40, 20]


def test_truncated_shard_keeps_leading_samples(tmp_path: Path) -> None:
    path = Path(write_shard(tmp_path / "t.tar", [good_sample(f"k{i}", f"c{i}") for i in range(3)]))
    path.write_bytes(path.read_bytes()[:3500])  # cuts through k1.jpg's data
    bs = batches(cfg_for(str(path), train_batch_size=1), 3)
    assert [b["captions"][0] for b in bs] == ["c0"] * 3
    # one per pass; k0 is only complete once k1's member is read, so it already carries its pass's error
    assert [b["skipped"] for b in bs] == [{"shard_error": 1}] * 3


def test_duplicate_member_is_counted_not_fatal(tmp_path: Path) -> None:
    key, members = good_sample("d0", "dup")
    shard = write_shard(tmp_path / "dup.tar", [(key, members), (key, {"txt": "again"}), good_sample("d1", "next")])
    (b,) = batches(cfg_for(shard, train_batch_size=2), 1)
    assert b["captions"] == ["dup", "next"] and b["skipped"] == {"member_error": 1}


def test_bad_samples_skipped_and_counted(mixed_shard: str) -> None:
    (b,) = batches(cfg_for(mixed_shard, train_batch_size=2), 1)
    assert b["captions"] == ["good one", "good two"]
    assert b["skipped"] == {"decode_error": 1, "missing_caption": 2, "missing_image": 1}


def test_captions_lose_a_bom_and_skip_json_fields_that_are_not_text(tmp_path: Path) -> None:
    img = image_bytes(solid("RGB", (20, 20), 0), "JPEG")
    shard = write_shard(tmp_path / "c.tar", [("a", {"jpg": img, "txt": b"\xef\xbb\xbfwith a BOM"}),
                                             ("b", {"jpg": img, "json": b'{"caption": null, "text": "from text"}'})])
    (b,) = batches(cfg_for(shard, train_batch_size=2), 1)
    assert b["captions"] == ["with a BOM", "from text"] and b["skipped"] == {}


def test_patience_counts_consecutive_failures_only(tmp_path: Path) -> None:
    """Bad samples between good ones never add up to --data_failure_patience."""
    samples = [s for j in range(6) for s in (("bad%d" % j, {"jpg": b"not a jpeg", "txt": "x"}), good_sample(f"k{j}", f"good {j}"))]
    bs = batches(cfg_for(write_shard(tmp_path / "alt.tar", samples), train_batch_size=2, failure_patience=2), 6)
    assert total_skipped(bs)["decode_error"] >= 6


def test_unseeded_streams_differ_and_ranks_sharing_a_shard_read_it_differently(tmp_path: Path) -> None:
    from tcdistill.data import ImageTextShards

    url = write_shard(tmp_path / "one.tar", [good_sample(f"k{j}", f"c{j}") for j in range(8)])
    assert ImageTextShards(cfg_for(url, seed=None)).base_seed != ImageTextShards(cfg_for(url, seed=None)).base_seed
    b0, b1 = (batches(cfg_for(url, rank=r, world_size=2), 4) for r in (0, 1))  # one shard: both ranks read it
    assert [b["crop_top_lefts"].tolist() for b in b0] != [b["crop_top_lefts"].tolist() for b in b1]


def test_decompression_bomb_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    shard = write_shard(
        tmp_path / "bomb.tar",
        [
            ("b0", {"png": image_bytes(solid("RGB", (64, 64), 0), "PNG"), "txt": "error-size bomb"}),
            ("b1", {"png": image_bytes(solid("RGB", (40, 40), 0), "PNG"), "txt": "warning-size bomb"}),
            good_sample("b2", "small", size=(20, 20)),
        ],
    )
    (b,) = batches(cfg_for(shard, train_batch_size=1), 1)
    assert b["captions"] == ["small"] and b["skipped"] == {"too_large": 2}


def test_brace_list_and_pipe_urls(tmp_path: Path) -> None:
    for i in range(3):
        write_shard(tmp_path / f"s-{i:03d}.tar", [good_sample(f"k{j}", f"shard{i}") for j in range(2)])
    brace = str(tmp_path / "s-{000..002}.tar")
    listed = [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    pipe = f"pipe:cat {tmp_path / 's-{000..002}.tar'}"
    for spec in (brace, listed, pipe):
        caps = {c for b in batches(cfg_for(spec), 8) for c in b["captions"]}
        assert caps == {"shard0", "shard1", "shard2"}, spec


def test_two_workers_report_skips_to_main(mixed_shard: str) -> None:
    bs = batches(cfg_for(mixed_shard, train_batch_size=2, dataloader_num_workers=2), 6)
    assert all(b["pixel_values"].shape == (2, 3, R, R) for b in bs)
    assert {c for b in bs for c in b["captions"]} == {"good one", "good two"}
    skipped = total_skipped(bs)
    # every batch covers one pass over the shard, so each pass contributes its four failures
    assert skipped == {"decode_error": 6, "missing_caption": 12, "missing_image": 6}


def test_deterministic_and_distinct_streams(tmp_path: Path) -> None:
    for i in range(4):
        write_shard(tmp_path / f"d-{i}.tar", [good_sample(f"k{j}", f"s{i}-{j}", size=(50, 20)) for j in range(2)])
    spec = str(tmp_path / "d-{0..3}.tar")

    def stream(**kw):
        bs = batches(cfg_for(spec, **kw), 6)
        return [c for b in bs for c in b["captions"]], torch.cat([b["crop_top_lefts"] for b in bs])

    caps, crops = stream()
    caps2, crops2 = stream()
    assert caps == caps2 and torch.equal(crops, crops2)
    assert stream(rank=1, world_size=2)[0] != caps
    assert stream(shard_resample_seed_offset=1)[0] != caps
    assert stream(seed=1)[0] != caps


def test_ranks_never_train_on_identical_batches(tmp_path: Path) -> None:
    """Two ranks with the same --seed: no step where both get the same batch (they used to whenever their
    resampled streams drew the same shard at once; seed 2 gave identical batches at 12 of 16 steps; with 2 loader
    workers and seed 0 every batch came twice)."""
    for i in range(2):
        write_shard(tmp_path / f"r-{i}.tar", [good_sample(f"k{j}", f"s{i}-{j}") for j in range(8)])
    spec = str(tmp_path / "r-{0..1}.tar")
    for seed in (0, 2):
        b0, b1 = (batches(cfg_for(spec, seed=seed, rank=r, world_size=2, train_batch_size=2), 16) for r in (0, 1))
        same = [i for i, (x, y) in enumerate(zip(b0, b1)) if x["captions"] == y["captions"]]
        assert same == [], (seed, same)
        # Nor do two loader workers of one rank (the loader takes their batches in turn).
        bs = batches(cfg_for(spec, seed=seed, dataloader_num_workers=2, train_batch_size=2), 16)
        same = [i for i in range(0, 16, 2) if bs[i]["captions"] == bs[i + 1]["captions"]]
        assert same == [], (seed, same)
    # Each rank reads its share of the shards, so a stream's saved position holds only for the same process count.
    from tcdistill.data import StreamTracker

    tracker = StreamTracker()
    tracker.world_size = 2
    assert StreamTracker(tracker.state()).world_size == 2


def test_center_vs_random_crop(tmp_path: Path) -> None:
    # 64x16 image with a black / white / black band layout: the centre band is white.
    arr = np.zeros((16, 64, 3), dtype=np.uint8)
    arr[:, 24:40] = 255
    shard = write_shard(tmp_path / "c.tar", [("c", {"png": image_bytes(Image.fromarray(arr), "PNG"), "txt": "c"})])
    (b,) = batches(cfg_for(shard, center_crop=True, train_batch_size=8), 1)
    assert (b["crop_top_lefts"] == torch.tensor([0, 24])).all()
    assert b["pixel_values"].min() > 0.9  # exactly the white band
    (b,) = batches(cfg_for(shard, train_batch_size=32), 1)
    lefts = b["crop_top_lefts"][:, 1]
    assert (b["crop_top_lefts"][:, 0] == 0).all() and lefts.min() >= 0 and lefts.max() <= 64 - R
    assert len(set(lefts.tolist())) > 5
    # each crop shows the band where its reported left says it should be
    for px, left in zip(b["pixel_values"], lefts.tolist()):
        col = 30 - left  # a column well inside the white band
        if 0 <= col < R:
            assert px[:, :, col].min() > 0.9


def test_random_flip(tmp_path: Path) -> None:
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, 8:] = 255  # right half white
    shard = write_shard(tmp_path / "f.tar", [("f", {"png": image_bytes(Image.fromarray(arr), "PNG"), "txt": "f"})])

    def right_is_white(**kw) -> list[bool]:
        (b,) = batches(cfg_for(shard, train_batch_size=32, **kw), 1)
        return [bool(px[:, :, -1].mean() > 0) for px in b["pixel_values"]]

    assert all(right_is_white())
    flags = right_is_white(random_flip=True)
    assert 0 < sum(flags) < len(flags)


def test_empty_prompts(mixed_shard: str) -> None:
    (b,) = batches(cfg_for(mixed_shard, proportion_empty_prompts=1.0), 1)
    assert b["captions"] == [""] * 4


@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_shards_raise_data_error(tmp_path: Path, workers: int) -> None:
    corrupt = write_shard(tmp_path / "corrupt.tar", [(f"x{i}", {"jpg": b"\x00garbage", "txt": "x"}) for i in range(3)])
    missing = str(tmp_path / "missing.tar")
    cfg = cfg_for([missing, corrupt], failure_patience=10, dataloader_num_workers=workers)
    with within(60), pytest.raises(DataError) as info:
        next(iter(build_train_dataloader(cfg)))
    msg = str(info.value)
    # The traceback pins the worker iterator; left to the cyclic GC, torch's queue finalizers run
    # before its shutdown and the workers only exit after a 5 s join timeout each.
    traceback.clear_frames(info.tb)
    assert "missing.tar" in msg or "corrupt.tar" in msg
    assert "failure_patience=10" in msg
    # QA: the run's error line kept a worker's `tcdistill.data.DataError: ` prefix (its traceback's last line).
    assert re.match(r"rank 0 worker \d/\d: no usable sample in 10 consecutive failures", error_line(info.value)), msg


def _junk_shard(d: Path) -> str:
    (d / "junk.tar").write_bytes(b"not a tar archive" * 100)
    return str(d / "junk.tar")


@pytest.mark.parametrize(
    "url_of, kind",
    [
        (lambda d: str(d / "nope.tar"), "shard_error"),  # missing file
        (lambda d: f"pipe:cat {d / 'nope.tar'}", "shard_error"),  # failing pipe command
        (lambda d: write_shard(d / "empty.tar", []), "empty_shard"),  # valid tar, no members
        (_junk_shard, "shard_error"),  # not a tar at all
    ],
    ids=["missing", "pipe", "empty", "junk"],
)
def test_single_bad_shard_kinds(tmp_path: Path, url_of, kind: str) -> None:
    url = url_of(tmp_path)
    with pytest.raises(DataError, match=kind) as info:
        next(iter(build_train_dataloader(cfg_for(url, failure_patience=3))))
    assert Path(url.split()[-1]).name in str(info.value)


def test_dots_in_a_members_basename_are_named_in_the_skip_reason(tmp_path: Path) -> None:
    """QA: "img.v2.jpg" is field "v2.jpg" of sample "img" to webdataset (its key ends at the first dot), so a dataset named
    so was all `missing_image`, and the error said only "no image among ['v2.jpg', 'v2.txt']"."""
    _, members = good_sample("x", "dotted")
    shard = write_shard(tmp_path / "dots.tar", [("img.v2", members)])
    with pytest.raises(DataError, match=r"missing_image.*img\.v2\.jpg is field 'v2\.jpg'; drop the dots before the extension"):
        next(iter(build_train_dataloader(cfg_for(shard, failure_patience=2))))


@pytest.mark.parametrize("data", [b"", b"<html>404 Not Found</html>"], ids=["zero_bytes", "html"])
def test_bytes_that_are_no_image_are_described_in_the_skip_reason(tmp_path: Path, data: bytes) -> None:
    """QA: the reason was PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>", which said nothing."""
    shard = write_shard(tmp_path / "junk.tar", [("k", {"jpg": data, "txt": "x"})])
    with pytest.raises(DataError, match=re.escape(f"decode_error=1; shards: {shard}; last error: k: not an image PIL reads: "
                                                  f"{len(data)} bytes starting {data[:12]!r}")):
        next(iter(build_train_dataloader(cfg_for(shard, failure_patience=1))))


def test_invalid_config_rejected(mixed_shard: str) -> None:
    for bad in (
        dict(resolution=0),
        dict(train_batch_size=0),
        dict(interpolation_type="area"),
        dict(proportion_empty_prompts=1.5),
        dict(failure_patience=0),
        dict(rank=2, world_size=2),
        dict(stall_timeout=-1.0),
    ):
        with pytest.raises(ValueError):
            build_train_dataloader(cfg_for(mixed_shard, **bad))


@pytest.mark.parametrize("interp", ["bilinear", "bicubic", "nearest", "lanczos"])
def test_interpolations(mixed_shard: str, interp: str) -> None:
    (b,) = batches(cfg_for(mixed_shard, interpolation_type=interp, train_batch_size=2), 1)
    assert b["pixel_values"].shape == (2, 3, R, R)
    assert b["pixel_values"].min() >= -1 and b["pixel_values"].max() <= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(tmp_path: Path, workers: int) -> None:
    """A loader rebuilt from StreamTracker.state() yields exactly the batches an uninterrupted loader yields next."""
    from tcdistill.data import StreamTracker

    urls = [
        write_shard(tmp_path / f"s{i}.tar", [good_sample(f"k{i}_{j:02d}", f"cap {i} {j}") for j in range(5)])
        for i in range(3)
    ]
    cfg = cfg_for(urls, dataloader_num_workers=workers, train_batch_size=3, random_flip=True, proportion_empty_prompts=0.3)
    full = batches(cfg, 9)
    tracker = StreamTracker()
    for b in full[:5]:
        tracker.consumed(b)
    state = tracker.state()
    resumed = batches(cfg_for(urls, dataloader_num_workers=workers, train_batch_size=3, random_flip=True,
                              proportion_empty_prompts=0.3, resume_state=state), 4)
    for a, b in zip(full[5:], resumed):
        assert a["captions"] == b["captions"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["crop_top_lefts"], b["crop_top_lefts"])
    # Without the state the stream starts over (the check above is not vacuous).
    assert batches(cfg, 1)[0]["captions"] == full[0]["captions"] != full[5]["captions"]


def test_a_worker_whose_shards_are_all_bad_reads_the_whole_share_and_resumes_exactly(tmp_path: Path) -> None:
    """QA: with 2 loader workers and the shards [good, missing], worker 1 read the missing shard alone (each worker reads
    its part of the shards) and stopped the run with a data error, where 0 workers trained on the good shard. It now
    reads every shard from then on (counted as worker_share_widened), and a resume continues its stream exactly."""
    from tcdistill.data import StreamTracker

    good = write_shard(tmp_path / "good.tar", [good_sample(f"k{j}", f"good {j}") for j in range(3)])
    urls = [good, str(tmp_path / "missing.tar")]
    kw = dict(dataloader_num_workers=2, train_batch_size=2, failure_patience=5, random_flip=True)
    with within(60):
        full = batches(cfg_for(urls, **kw), 6)
    assert {c for b in full for c in b["captions"]} <= {f"good {j}" for j in range(3)}
    assert total_skipped(full)["worker_share_widened"] == 1 and total_skipped(full)["shard_error"] >= 5
    tracker = StreamTracker()
    for b in full[:3]:  # worker 1's batch 1 came after its widening
        tracker.consumed(b)
    with within(60):
        resumed = batches(cfg_for(urls, resume_state=tracker.state(), **kw), 3)
    for a, b in zip(full[3:], resumed):
        assert a["captions"] == b["captions"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_a_stalled_pipe_shard_is_given_up_and_counted(tmp_path: Path) -> None:
    """QA: a `pipe:` shard whose command sends nothing (a hung curl) blocked the loader forever, whatever
    --data_failure_patience said. Now it is abandoned after stall_timeout, counted as `stalled`, its command killed;
    good shards still train, and only stalled shards stop the run with a DataError naming them."""
    good = write_shard(tmp_path / "good.tar", [good_sample(f"k{j}", "good") for j in range(2)])
    stall = f"pipe:sleep 60 && cat {good}"
    start = time.monotonic()
    bs = batches(cfg_for([stall, good], train_batch_size=2, stall_timeout=0.5, seed=3), 4)
    assert {c for b in bs for c in b["captions"]} == {"good"}
    assert total_skipped(bs)["stalled"] >= 1, total_skipped(bs)  # seed 3 draws the stalled shard first
    with pytest.raises(DataError, match="stalled=2") as info:
        next(iter(build_train_dataloader(cfg_for(stall, stall_timeout=0.5, failure_patience=2))))
    traceback.clear_frames(info.tb)
    assert time.monotonic() - start < 10 and "pipe:sleep 60" in str(info.value)


def test_pipe_streams_read_whole_wait_with_timeout_0_and_fail_on_a_command_error(tmp_path: Path) -> None:
    from tcdistill.shard_stream import open_shard

    assert len(open_shard("pipe:head -c 3000000 /dev/zero", 5).read()) == 3000000  # read() is every byte, not one chunk
    assert open_shard("pipe:sleep 0.3; printf abc", 0).read() == b"abc"  # --data_timeout 0: wait forever
    failing = open_shard("pipe:printf abc; exit 3", 5)
    time.sleep(0.5)  # the command has exited: the read sees its status
    with pytest.raises(OSError, match="exit 3"):
        failing.read(10)


def test_a_stalled_pipe_commands_children_are_killed_too(tmp_path: Path) -> None:
    """`sh -c` may fork the command: a surviving child would go on downloading (and hold the trainer's stdout open)."""
    from tcdistill.shard_stream import open_shard

    pid_file = tmp_path / "pid"
    stream = open_shard(f"pipe:sleep 60 & echo $! > {pid_file}; wait", 0.5)
    with pytest.raises(TimeoutError):
        stream.read(10)
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
    for _ in range(50):  # SIGKILL is asynchronous: give the kernel a moment
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the pipe command's child survived its stalled shard")


def test_file_urls_pass_the_shard_check(tmp_path: Path) -> None:
    """QA: `file:/path/x.tar` (which gopen opens) was refused as 'none of the shard file(s) exists'."""
    from tcdistill.config import ConfigError
    from tcdistill.preflight import check_shards

    write_shard(tmp_path / "s-0.tar", [good_sample("k", "file url")])
    check_shards(f"file:{tmp_path}/s-{{0..0}}.tar")
    with pytest.raises(ConfigError, match="none of the 1 shard"):
        check_shards(f"file:{tmp_path}/missing.tar")
    (b,) = batches(cfg_for(f"file:{tmp_path}/s-0.tar", train_batch_size=1), 1)
    assert b["captions"] == ["file url"]
    check_shards(f"{tmp_path}/missing.tar::pipe:cat {tmp_path}/s-0.tar")  # the loader judges a spec with a pipe: url
    with pytest.raises(ConfigError, match=r"none of the 5 shard file\(s\) exists: .*/m-0.tar, .*/m-2.tar \(\+2 more\)$"):
        check_shards(f"{tmp_path}/m-{{0..4}}.tar")
    # QA: shards listed as other tools list them (commas, spaces) are one path that does not exist: say how to join them.
    for sep in (",", " "):
        with pytest.raises(ConfigError, match=r"^--train_latents_path_or_url: none of the 1 .* join several shards with '::'"):
            check_shards(f"{tmp_path}/s-0.tar{sep}{tmp_path}/s-0.tar", "--train_latents_path_or_url")


def test_missing_shard_error_says_what_went_wrong(tmp_path: Path) -> None:
    """QA: an OSError was reported by its errno ('last error: FileNotFoundError: 2')."""
    with pytest.raises(DataError, match="No such file or directory") as info:
        next(iter(build_train_dataloader(cfg_for(str(tmp_path / "nope.tar"), failure_patience=1))))
    traceback.clear_frames(info.tb)


def test_resume_with_another_worker_count_does_not_replay_the_first_batches(tmp_path: Path) -> None:
    """QA: a checkpoint's stream read by 1 worker, resumed with 2 ("starts fresh", says the warning): worker 0's
    stream was the checkpoint run's own from its first sample, so the resumed run trained on those batches again."""
    from tcdistill.data import StreamTracker

    urls = [write_shard(tmp_path / f"s{i}.tar", [good_sample(f"k{i}_{j}", f"cap {i} {j}") for j in range(3)]) for i in range(8)]
    first = batches(cfg_for(urls, train_batch_size=3), 4)
    tracker = StreamTracker()
    for b in first:
        tracker.consumed(b)
    resumed = batches(cfg_for(urls, train_batch_size=3, dataloader_num_workers=2, resume_state=tracker.state()), 4)
    def key(bs: list[dict]) -> list:
        return [(b["captions"], b["crop_top_lefts"].tolist()) for b in bs]

    assert key(resumed[::2]) != key(first[:2])  # worker 0's batches are not the run's first ones again
    # Also where the workers do not split the shards (fewer shards than workers): the stream is a new one.
    first = batches(cfg_for(urls[:1], train_batch_size=3), 2)
    tracker = StreamTracker()
    for b in first:
        tracker.consumed(b)
    resumed = batches(cfg_for(urls[:1], train_batch_size=3, dataloader_num_workers=2, resume_state=tracker.state()), 2)
    assert key(resumed[:1]) != key(first[:1])


def test_cache_gives_up_a_stalled_pipe_shard(tmp_path: Path) -> None:
    """`tcdistill cache` reads each shard once through the same guard: a hung pipe: command is killed after
    --data_timeout and counted as `stalled` (as training counts it), instead of hanging the cache run."""
    from tcdistill.cache import _OnePass

    good = write_shard(tmp_path / "good.tar", [good_sample(f"k{j}", "good") for j in range(2)])
    ds = _OnePass(cfg_for(good, stall_timeout=0.5))
    skipped: Counter[str] = Counter()
    start = time.monotonic()
    assert list(ds.read_once(f"pipe:sleep 60 && cat {good}", skipped)) == [] and skipped == {"stalled": 1}
    assert time.monotonic() - start < 10
    assert [k for k, _ in ds.read_once(good, skipped)] == ["k0", "k1"]


def test_cache_reads_a_shard_as_training_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: `tcdistill cache` grouped a shard's members with a handler that gave the whole shard up at a duplicate member
    name (training counts one member_error and reads on), so every later sample of the shard was silently left out of
    the cache; and a shard with no samples was no failure to it (training counts empty_shard)."""
    import tcdistill.data as data_mod
    from tcdistill.cache import _OnePass

    key, members = good_sample("d0", "dup")
    shard = write_shard(tmp_path / "dup.tar", [(key, members), (key, {"txt": "again"}), ("n", {"txt": "no image"}),
                                               good_sample("d1", "next")])
    empty = write_shard(tmp_path / "empty.tar", [])
    ds, skipped = _OnePass(cfg_for(shard)), Counter()
    assert [(k, s["caption"]) for k, s in ds.read_once(shard, skipped)] == [("d0", "dup"), ("d1", "next")]
    assert list(ds.read_once(empty, skipped)) == []
    (b,) = batches(cfg_for(shard, train_batch_size=2), 1)  # training reads the same samples and counts the same kinds
    assert b["captions"] == ["dup", "next"] and b["skipped"] == {"member_error": 1, "missing_image": 1}
    assert skipped == {**b["skipped"], "empty_shard": 1}
    # A pipe: command that fails after its last whole member (its exit seen only at the close): its samples are used,
    # and the shard is counted once, by both.
    class FailsAtClose(io.BytesIO):
        def close(self) -> None:
            super().close()
            raise OSError("exit 3")

    monkeypatch.setattr(data_mod, "open_shard", lambda url, timeout: FailsAtClose(Path(url).read_bytes()))
    assert [k for k, _ in ds.read_once(shard, skipped)] == ["d0", "d1"] and skipped["shard_error"] == 1
    (b,) = batches(cfg_for(shard, train_batch_size=3), 1)  # the shard's second pass carries the first's failure
    assert b["captions"] == ["dup", "next", "dup"] and b["skipped"] == {"member_error": 2, "missing_image": 1, "shard_error": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pipe_command_that_lingers_after_its_data_is_killed(tmp_path: Path, workers: int) -> None:
    """QA: closing a `pipe:` shard (its last sample read, or the loader stopped mid-shard at the end of training) waited
    for its command to exit, up to webdataset's 2 hours, whatever --data_timeout said: a command that lingers after its
    data (a curl stalled past the tar's end marker) held the loader for its whole life, once per shard,
    and a loader worker, which torch terminates 5 s into its shutdown, left it running. Now it is killed at the close."""
    good = write_shard(tmp_path / "good.tar", [good_sample(f"k{j}", "good") for j in range(2)])
    marker = tmp_path / "lingered"
    # One process (no fork at the close, which a kill by process tree could miss) that sends the shard, then lingers 5 s.
    linger = f"import sys, time; sys.stdout.buffer.write(open({good!r}, 'rb').read()); sys.stdout.flush(); time.sleep(5); open({str(marker)!r}, 'w')"
    url = f'pipe:{sys.executable} -c "{linger}"'
    # Each stream reads the shard twice: one close after its data, one when the loader stops.
    bs = batches(cfg_for(url, train_batch_size=2, stall_timeout=30, dataloader_num_workers=workers), 2 * max(1, workers))
    assert {c for b in bs for c in b["captions"]} == {"good"} and not total_skipped(bs)
    gc.collect()  # the loader's iterator, should a reference cycle still hold it (and its workers)
    assert not marker.exists() and commands_mentioning(str(tmp_path)) == []


def test_a_pipe_command_that_exits_just_after_its_data_is_not_killed(tmp_path: Path) -> None:
    """A command that has sent its whole shard and is still exiting when the shard is closed is given a moment to exit
    (shard_stream.CLOSE_GRACE_S), not killed: its killed exit status would read as a failed download (a close that
    raises counts a shard error)."""
    from tcdistill.shard_stream import CLOSE_GRACE_S, open_shard

    good = write_shard(tmp_path / "good.tar", [good_sample("k0", "good")])
    # It closes its stdout (the reader's end of data) and exits a moment later; exec: no shell holding the pipe open.
    exits = (f"import os, sys, time; sys.stdout.buffer.write(open({good!r}, 'rb').read()); sys.stdout.flush(); os.close(1); "
             f"time.sleep({CLOSE_GRACE_S / 4})")
    stream = open_shard(f'pipe:exec {sys.executable} -c "{exits}"', 30.0)
    assert stream.read() == Path(good).read_bytes()
    stream.close()  # exit status 0: no error


def test_cache_counts_no_error_for_a_whole_shard_whose_command_lingers(tmp_path: Path) -> None:
    """QA: a `pipe:` command still running once its whole shard was read is killed at the close; the kill's exit status
    (-9) raised from the close, and `tcdistill cache` counted a shard error for a shard it had cached whole."""
    from tcdistill.cache import _OnePass

    good = write_shard(tmp_path / "good.tar", [good_sample(f"k{j}", "good") for j in range(2)])
    linger = f"import sys, time; sys.stdout.buffer.write(open({good!r}, 'rb').read()); sys.stdout.flush(); time.sleep(30)"
    skipped: Counter[str] = Counter()
    keys = [k for k, _ in _OnePass(cfg_for(good, stall_timeout=30)).read_once(f'pipe:exec {sys.executable} -c "{linger}"', skipped)]
    assert keys == ["k0", "k1"] and skipped["shard_error"] == 0


def test_filter_skips_name_the_flag_to_change() -> None:
    """QA: a run of the SDXL scripts' defaults on small images stopped with "last error: ...: original size 32x32 < 700",
    which names no flag; the skip reasons now say --min_image_size / --max_pwatermark."""
    import json

    from tcdistill.data import SkipSample, _check_filters

    cfg = DataConfig(train_shards_path_or_url="s.tar", resolution=32, min_image_size=700, max_pwatermark=0.5)
    for meta, said in ((dict(original_width=32, original_height=32), "original size 32x32 < --min_image_size 700"),
                       (dict(original_width=900, original_height=900, pwatermark=0.9), "pwatermark 0.9 > --max_pwatermark 0.5")):
        with pytest.raises(SkipSample, match=said):
            _check_filters({"json": json.dumps(meta).encode()}, cfg)
