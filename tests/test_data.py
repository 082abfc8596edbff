"""Offline tests for the webdataset training loader in tcdistill.data."""

from __future__ import annotations

import os
import re
import sys
import tarfile
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # shards_util lives next to this file

from conftest import R, batches, cfg_for, total_skipped  # noqa: E402
from shards_util import caption_json, good_sample, gray16, image_bytes, png_with_trns, solid, within, write_shard  # noqa: E402

from tcdistill.cli import error_line  # noqa: E402
from tcdistill.data import DataConfig, DataError, build_train_dataloader, expand_urls  # noqa: E402


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


def test_sixteen_bit_transparency_is_composited_on_white(tmp_path: Path) -> None:
    """QA: a 16-bit grayscale PNG's tRNS value (its transparent gray) was dropped with the scaling to 8 bits, so its
    transparent pixels trained as their gray (black here), where an 8-bit image's are composited on white."""
    img = gray16((20, 20), 0)
    img.paste(65535, (0, 0, 10, 20))  # left half white, right half transparent black
    shard = write_shard(tmp_path / "t.tar", [("t", {"png": png_with_trns(img, 0), "txt": "t"})])
    (b,) = batches(cfg_for(shard, train_batch_size=1, center_crop=True), 1)
    assert torch.equal(b["pixel_values"], torch.ones(1, 3, R, R))


def test_exif_orientation_applied(tmp_path: Path) -> None:
    img = solid("RGB", (40, 20), (0, 255, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    shard = write_shard(tmp_path / "e.tar", [("e", {"jpg": image_bytes(img, "JPEG", exif=exif.tobytes()), "txt": "e"})])
    (b,) = batches(cfg_for(shard, train_batch_size=1), 1)
    assert b["original_sizes"][0].tolist() == [40, 20]


@pytest.mark.parametrize("cut", [900, 100, 0], ids=["in_data", "in_header", "at_member_boundary"])
def test_truncated_shard_keeps_leading_samples(tmp_path: Path, cut: int) -> None:
    """QA: a shard cut inside a member's header, or between two members, read as a whole shorter shard (Python's tarfile
    ends a stream there silently): its lost samples were not counted, as they are for a cut through a member's data."""
    path = Path(write_shard(tmp_path / "t.tar", [good_sample(f"k{i}", f"c{i}") for i in range(3)]))
    with tarfile.open(path) as tar:
        k1 = tar.getmember("k1.jpg").offset  # its header block; the data starts 512 bytes later
    path.write_bytes(path.read_bytes()[:k1 + cut])
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
    skipped, per_pass = total_skipped(bs), {"decode_error": 1, "missing_caption": 2, "missing_image": 1}
    # Every batch covers one pass over the shard, which the two workers share, each reading it through its own shuffle:
    # a pass's failures after its last good sample come with the worker's next batch (the last pass's, not yet).
    assert skipped.keys() == per_pass.keys() and all(4 * n <= skipped[k] <= 6 * n for k, n in per_pass.items()), skipped


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


def test_a_sample_whose_files_are_not_adjacent_in_the_tar_is_named_so_in_the_skip_reason(tmp_path: Path) -> None:
    """QA: `tar cf shard.tar -C dir .` stores files in the folder's listing order, not by name; webdataset groups only
    adjacent files, so each sample fell apart into parts skipped as missing_caption / missing_image with no word why."""
    _, members = good_sample("x", "split")
    files = [(f"k{i}", {ext: members[ext]}) for ext in ("jpg", "txt") for i in range(2)]  # k0.jpg k1.jpg k0.txt k1.txt
    with pytest.raises(DataError, match=r"missing_caption=2, missing_image=2; .* k1: no image among \['txt'\] \(its other "
                                        r"files came earlier in the shard: .* adjacent .*tar --sort=name"):
        next(iter(build_train_dataloader(cfg_for(write_shard(tmp_path / "split.tar", files), failure_patience=4))))


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
