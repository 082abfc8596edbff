"""`tcdistill cache` faults and caches that do not fit the run: one-line errors, skips counted by kind, warnings where a
cached run cannot apply a flag, and no cache left behind that mixes runs or that training would accept half-written."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CACHE_RES, cache_trainer, lock_holder, make_cache
from shards_util import good_sample, write_shard

from tcdistill.config import ConfigError, TrainConfig
from tcdistill.data_cached import META_NAME, UNCOND_NAME, read_sidecar
from tcdistill.tiny import shard_pattern, write_tiny_shards


def test_cache_resolution_mismatch_is_a_config_error(tiny_teacher: Path, fp32_cache: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="differs from the cache"):
        cache_trainer(tiny_teacher, "", tmp_path / "out", train_shards_path_or_url=None, train_latents_path_or_url=fp32_cache, resolution=16)


def test_missing_cached_shards_are_named_by_their_flag(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: cached shards that do not exist were reported as "--train_shards_path_or_url: none of the ... exists"."""
    with pytest.raises(ConfigError, match=r"^--train_latents_path_or_url: none of the 2 shard file\(s\) exists"):
        cache_trainer(tiny_teacher, "", tmp_path / "out", train_shards_path_or_url=None,
                 train_latents_path_or_url=str(tmp_path / "gone" / "{00000..00001}.tar"))
    # `tcdistill cache` runs the same check (it read each missing shard as a shard error, then said "no usable sample").
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^tcdistill cache: error: --train_shards_path_or_url: none of the 1 .* join several"):
        make_cache(tiny_teacher, f"{tmp_path}/a.tar,{tmp_path}/a.tar", tmp_path / "cache")


def test_cache_faults_are_one_line_or_counted(tiny_teacher: Path, one_shard: str, fp32_cache: str, tmp_path: Path) -> None:
    """An unwritable --output_dir is one error line; a failing pipe: source is one skipped shard, not the end of the
    run; an unreadable or incomplete sidecar is a ConfigError."""
    import json
    import shutil

    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # an --output_dir below a regular file cannot be made, as on a read-only filesystem
    with pytest.raises(SystemExit) as info:
        make_cache(tiny_teacher, one_shard, blocker / "cache")
    assert str(info.value.code).startswith("tcdistill cache: error:") and "\n" not in str(info.value.code), info.value.code
    out = tmp_path / "piped"
    make_cache(tiny_teacher, f"pipe:false::{one_shard}", out)
    meta = json.loads((out / META_NAME).read_text())
    # No empty shard for the failed source: the written shards are what meta's pattern names.
    assert meta["skipped"] == {"shard_error": 1} and meta["num_samples"] == 4 and meta["shards"] == ["00000.tar"], meta
    assert sorted(p.name for p in out.glob("*.tar*")) == ["00000.tar"]
    broken = tmp_path / "broken"
    shutil.copytree(Path(fp32_cache).parent, broken)
    (broken / UNCOND_NAME).write_bytes((broken / UNCOND_NAME).read_bytes()[:100])  # truncated
    with pytest.raises(ConfigError, match="cannot read"):
        read_sidecar(str(broken / "00000.tar"))
    shutil.copy(Path(fp32_cache).parent / UNCOND_NAME, broken / UNCOND_NAME)
    bad_meta = {k: v for k, v in json.loads((broken / META_NAME).read_text()).items() if k != "resolution"}
    (broken / META_NAME).write_text(json.dumps(bad_meta))
    with pytest.raises(ConfigError, match="resolution"):
        read_sidecar(str(broken / "00000.tar"))
    (broken / META_NAME).write_text(json.dumps({**bad_meta, "format": "another"}))  # another layout: not read as this one
    with pytest.raises(ConfigError, match="format 'another'"):
        read_sidecar(str(broken / "00000.tar"))
    with pytest.raises(ConfigError, match="pipe: urls are not supported"):  # no folder to find the sidecar files in
        read_sidecar(f"pipe:cat {fp32_cache}")


def test_cache_with_another_vae_is_a_config_error(tiny_teacher: Path, fp32_cache: str, tmp_path: Path) -> None:
    """QA: training from a cache with a --pretrained_vae_model_name_or_path whose scaling factor is not the cache's
    was silently accepted (latents of one VAE, validation decoding with another)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_teacher, subfolder="vae")
    vae.register_to_config(scaling_factor=0.13025)
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(ConfigError, match="scaling_factor"):
        cache_trainer(tiny_teacher, "", tmp_path / "out", train_shards_path_or_url=None, train_latents_path_or_url=fp32_cache,
                 pretrained_vae_model_name_or_path=str(tmp_path / "vae"))


def test_cache_made_by_another_vae_encoder_is_refused_and_a_decoder_fine_tune_accepted(tiny_teacher: Path, fp32_cache: str,
                                                                                         tmp_path: Path) -> None:
    """QA: a cache made with another VAE of the same scaling factor only warned ("Cache was made with
    --pretrained_vae_model_name_or_path ..."): the student learned that VAE's latents while its samples decode with the
    run's. The cache records its encoder's fingerprint: another encoder is refused in one line; the same encoder with
    another decoder (as sd-vae-ft-mse fine-tunes SD's) makes the same latents and trains."""
    from diffusers import AutoencoderKL

    for part, refused in (("encoder", True), ("decoder", False)):
        vae = AutoencoderKL.from_pretrained(tiny_teacher, subfolder="vae")
        with torch.no_grad():
            next(getattr(vae, part).parameters()).add_(0.5)
        vae.save_pretrained(tmp_path / part)
        kw = dict(train_shards_path_or_url=None, train_latents_path_or_url=fp32_cache, pretrained_vae_model_name_or_path=str(tmp_path / part))
        if refused:
            with pytest.raises(ConfigError, match=r"^the cache's latents were made by another VAE encoder \(the vae/ of .*\) than this "
                                                  r"run's \(.*encoder\).*re-run `tcdistill cache` with this run's\.$"):
                cache_trainer(tiny_teacher, "", tmp_path / "out", **kw)
        else:
            assert cache_trainer(tiny_teacher, "", tmp_path / "out2", **kw).family.vae.encoder is None  # accepted


def test_cache_accepts_a_per_block_cross_attention_dim(tiny_teacher: Path, fp32_cache: str, tmp_path: Path) -> None:
    """QA: a teacher UNet config giving cross_attention_dim per block ([32, 32], as diffusers allows) trained from pixels
    but its cache was refused ("cached prompt embeddings are 32-dim; the teacher UNet wants [32, 32]")."""
    import json
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    cfg_path = teacher / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = [cfg["cross_attention_dim"]] * len(cfg["down_block_types"])
    cfg_path.write_text(json.dumps(cfg))
    trainer = cache_trainer(teacher, "", tmp_path / "out", train_shards_path_or_url=None, train_latents_path_or_url=fp32_cache)
    assert trainer.family.vae.encoder is None  # the cache was accepted: its VAE encoder was dropped


def test_cache_from_a_teacher_with_another_vae_depth_is_a_config_error(fp32_cache: str, tmp_path: Path) -> None:
    """QA: a cache made with a VAE of another downscale factor (same channels, text width, scaling factor and
    resolution) trained silently on latents of another size (16x16 where this teacher's VAE makes 8x8 at 32 px)."""
    from tcdistill.tiny import build_tiny_sd_pipeline

    teacher = tmp_path / "teacher_f4"
    build_tiny_sd_pipeline(teacher, vae_block_out_channels=(16, 32, 32))  # factor 4 where the cache's VAE has 2
    with pytest.raises(ConfigError, match="8x8 latents"):
        cache_trainer(teacher, "", tmp_path / "out", train_shards_path_or_url=None, train_latents_path_or_url=fp32_cache)


def test_image_filters_of_a_cached_run_warn_where_the_cache_did_not_apply_them(tiny_teacher: Path, fp32_cache: str, tmp_path: Path,
                                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """QA: cached samples keep no image size or watermark score, so --min_image_size/--max_pwatermark (the SDXL scripts'
    700/0.5) could not filter them and were silently ignored. The cache records its own filters; training warns where
    the run's differ, as it does for --center_crop. A cache that recorded none (made before it did) was unfiltered."""
    import json
    import logging
    import shutil

    from tcdistill.data_cached import prepare_cached_training
    from tcdistill.families import load_family

    meta, _ = read_sidecar(fp32_cache)
    assert (meta["min_image_size"], meta["max_pwatermark"]) == (0, 1.0)
    older = tmp_path / "older"
    shutil.copytree(Path(fp32_cache).parent, older)
    (older / META_NAME).write_text(json.dumps({k: v for k, v in meta.items() if k not in ("min_image_size", "max_pwatermark")}))
    both, unrecorded = dict(min_image_size=700, max_pwatermark=0.5), str(older / "00000.tar")
    for cache, filters, warned in ((fp32_cache, dict(), []), (fp32_cache, both, ["min_image_size", "max_pwatermark"]),
                                   (unrecorded, dict(), []), (unrecorded, dict(min_image_size=700), ["min_image_size"])):
        cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_latents_path_or_url=cache, resolution=CACHE_RES,
                          center_crop=True, max_train_steps=1, report_to="none", **filters)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tcdistill"):
            prepare_cached_training(cfg, load_family(cfg))
        said = [r.getMessage() for r in caplog.records]
        assert [k for k in ("min_image_size", "max_pwatermark") if any(m.startswith(f"--{k} ") and "has no effect" in m for m in said)] == warned, said


def test_cached_sample_lacking_a_member_or_misshapen_is_skipped_by_kind() -> None:
    """A sample without its latents or a prompt embedding is a `missing_member` skip, not an unreadable one; a
    posterior std of another shape than its mean is a `shape_mismatch` (it would fail the batch's stack, or broadcast)."""
    import random
    from types import SimpleNamespace

    from tcdistill.data import SkipSample
    from tcdistill.data_cached import LATENTS, LATENTS_STD, CachedLatentShards

    def npy(shape: tuple[int, ...]) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.zeros(shape, np.float32))
        return buf.getvalue()

    shards = SimpleNamespace(cond_keys=["encoder_hidden_states"], latent_shape=(4, 4, 4))
    for raw, kind in (({LATENTS: npy((4, 4, 4))}, "missing_member"),
                      ({LATENTS: npy((4, 4, 4)), LATENTS_STD: npy((4, 4, 1)), "encoder_hidden_states.npy": npy((8, 32))},
                       "shape_mismatch")):
        with pytest.raises(SkipSample) as info:
            CachedLatentShards._process(shards, raw, random.Random(0))
        assert info.value.kind == kind, info.value


def test_a_rerun_into_the_same_folder_leaves_no_cache_that_mixes_runs(tiny_teacher: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A smaller re-run leaves the earlier run's higher-numbered shards: a pattern reaching them is refused; a re-run
    interrupted after overwriting a shard leaves no metadata (it is the completion marker), so training refuses it."""
    import tcdistill.cache as cache_mod

    src = tmp_path / "src"
    write_tiny_shards(src, n_shards=2, per_shard=4, image_size=(32, 32), seed=5)
    out = tmp_path / "cache"
    make_cache(tiny_teacher, shard_pattern(src, 2), out)
    read_sidecar(str(out / "{00000..00001}.tar"))  # the complete cache is accepted
    make_cache(tiny_teacher, str(src / "00000.tar"), out)  # 1 shard now; the old 00001.tar stays on disk
    assert (out / "00001.tar").exists()
    read_sidecar(str(out / "00000.tar"))
    with pytest.raises(ConfigError, match=r"00001\.tar' is not one of the 1 shard"):
        read_sidecar(str(out / "{00000..00001}.tar"))

    read_once = cache_mod._OnePass.read_once

    def killed_at_the_second_shard(self: Any, url: str, skipped: Counter[str]) -> Any:
        if url.endswith("00001.tar"):
            raise KeyboardInterrupt  # Ctrl-C mid-run, after 00000.tar was overwritten
        return read_once(self, url, skipped)

    monkeypatch.setattr(cache_mod._OnePass, "read_once", killed_at_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        make_cache(tiny_teacher, shard_pattern(src, 2), out)
    with pytest.raises(ConfigError, match="cannot read"):
        read_sidecar(str(out / "00000.tar"))


def test_a_full_disk_is_one_line_and_leaves_no_cache_training_accepts(tiny_teacher: Path, one_shard: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing a shard or the metadata (over an earlier complete cache): one error line, no partial file,
    and no metadata left over the new shards."""
    import errno
    import webdataset as wds

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "cache"
    for where in ("shard", "metadata"):
        make_cache(tiny_teacher, one_shard, out)  # a complete cache first, which the failing re-run writes over
        with monkeypatch.context() as m:
            if where == "shard":
                m.setattr(wds.TarWriter, "write", full)
            else:
                write_bytes = Path.write_bytes
                # a partial file, then ENOSPC
                m.setattr(Path, "write_bytes", lambda p, data: (write_bytes(p, data[:9]), full()) if META_NAME in p.name else write_bytes(p, data))
            with pytest.raises(SystemExit) as info:
                make_cache(tiny_teacher, one_shard, out)
        msg = str(info.value.code)
        assert msg.startswith("tcdistill cache: error:") and "No space left" in msg and "\n" not in msg, (where, msg)
        assert not list(out.glob("*.tmp*")) and not list(out.glob(".*.tmp*")), (where, sorted(p.name for p in out.iterdir()))
        if where == "shard":
            read_sidecar(str(out / "00000.tar"))  # no new shard landed: the earlier cache is still whole
        else:
            with pytest.raises(ConfigError, match="cannot read"):
                read_sidecar(str(out / "00000.tar"))


def test_sdxl_cache_from_a_teacher_with_another_pooled_width_is_a_config_error(sdxl_teacher: Path, one_shard: str,
                                                                              tmp_path: Path) -> None:
    """Same cross-attention width, another text_encoder_2 projection: refused in one line, not a matmul traceback in
    the first step."""
    from tcdistill.tiny import build_tiny_sdxl_pipeline

    cached = make_cache(sdxl_teacher, one_shard, tmp_path / "cache", "--model_family", "sdxl", "--min_image_size", "0",
                    "--max_pwatermark", "1")
    other = tmp_path / "other"
    build_tiny_sdxl_pipeline(other, projection_dim=24)
    with pytest.raises(ConfigError, match=r"text_embeds\) are 16-dim; .* wants 24"):
        cache_trainer(other, "", tmp_path / "out", train_shards_path_or_url=None, train_latents_path_or_url=cached, model_family="sdxl")


def test_cache_metadata_that_does_not_fit_the_run_is_refused(tiny_teacher: Path, fp32_cache: str, tmp_path: Path) -> None:
    """A cache of another family, latent channel count or prompt width, and a shard pattern reaching into another folder (whose
    shards the metadata does not describe, even under the same names), are one-line ConfigErrors, not a run on them."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from tcdistill.data_cached import prepare_cached_training
    from tcdistill.families import load_family

    cache = tmp_path / "cache"
    shutil.copytree(Path(fp32_cache).parent, cache)
    other = tmp_path / "other"
    shutil.copytree(Path(fp32_cache).parent, other)
    with pytest.raises(ConfigError, match="is not one of the 1 shard"):
        read_sidecar(f"{cache}/00000.tar::{other}/00000.tar")
    meta = json.loads((cache / META_NAME).read_text())
    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_latents_path_or_url=str(cache / "00000.tar"), resolution=CACHE_RES,
                      center_crop=True, max_train_steps=1, report_to="none")
    family = load_family(cfg)
    for edit, needle in ((dict(model_family="sdxl"), "made for a 'sdxl' teacher"),
                         (dict(latent_shape=[meta["latent_shape"][0] + 1, *meta["latent_shape"][1:]]), "channels")):
        (cache / META_NAME).write_text(json.dumps({**meta, **edit}))
        with pytest.raises(ConfigError, match=needle):
            prepare_cached_training(cfg, family)
    (cache / META_NAME).write_text(json.dumps(meta))
    uncond = load_file(cache / UNCOND_NAME)
    save_file({**uncond, "encoder_hidden_states": uncond["encoder_hidden_states"][..., :-1].contiguous()}, cache / UNCOND_NAME)
    with pytest.raises(ConfigError, match="cached prompt embeddings are"):
        prepare_cached_training(cfg, family)


def test_an_older_cache_naming_the_teacher_folder_relative_names_the_same_teacher(tiny_teacher: Path, fp32_cache: str, tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """QA: a cache made before local teachers were recorded absolute names the folder as given ("teacher"); training,
    which now records it absolute, warned "Cache was made with teacher 'teacher'; training with '/abs/teacher'"."""
    import json
    import logging
    import shutil

    from tcdistill.data_cached import prepare_cached_training
    from tcdistill.families import load_family

    older = tmp_path / "older"
    shutil.copytree(Path(fp32_cache).parent, older)
    meta, _ = read_sidecar(fp32_cache)
    (older / META_NAME).write_text(json.dumps({**meta, "teacher": tiny_teacher.name}))
    monkeypatch.chdir(tiny_teacher.parent)
    cfg = TrainConfig(pretrained_teacher_model=tiny_teacher.name, train_latents_path_or_url=str(older / "00000.tar"), resolution=CACHE_RES,
                      center_crop=True, max_train_steps=1, report_to="none")
    with caplog.at_level(logging.WARNING, logger="tcdistill"):
        prepare_cached_training(cfg, load_family(cfg))
    assert not [r.getMessage() for r in caplog.records if "Cache was made" in r.getMessage()]


def test_a_killed_runs_partial_shard_is_removed_by_the_next_run(tiny_teacher: Path, one_shard: str, tmp_path: Path) -> None:
    """QA: a `tcdistill cache` killed with SIGKILL mid-shard leaves NNNNN.tar.tmp (its in-progress shard), and a re-run
    into the folder that writes fewer shards left it there for good. Training refuses it (no metadata lists it); the next
    run removes it. Another file that only looks alike is kept. (The folder's name holds glob characters, which name
    only the folder.)"""
    out = tmp_path / "cache[0-9]"
    out.mkdir()
    (out / "00003.tar.tmp").write_bytes(b"\0" * 1024)  # what a SIGKILL during the 4th shard's writes leaves
    (out / "100000.tar.tmp").write_bytes(b"\0" * 1024)  # the 100001st shard's name has six digits
    for mine in ("notes.tar.tmp", "00003a.tar.tmp"):
        (out / mine).write_text("mine")
    with pytest.raises(ConfigError, match="cannot read"):  # no metadata yet: the folder is no cache for training
        read_sidecar(str(out / "00003.tar.tmp"))
    make_cache(tiny_teacher, one_shard, out)
    with pytest.raises(ConfigError, match=r"00003\.tar\.tmp' is not one of the 1 shard"):
        read_sidecar(str(out / "00003.tar.tmp"))
    assert sorted(p.name for p in out.glob("*.tmp")) == ["00003a.tar.tmp", "notes.tar.tmp"]


def test_cache_encodes_batches_of_batch_size_and_refuses_0(tiny_teacher: Path, one_shard: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation testing: --batch_size was never checked to set the batches encoded (batches one sample larger passed),
    nor --batch_size 0 refused (it encoded one sample at a time)."""
    import tcdistill.cache as cache

    sizes, encode = [], cache._encode
    monkeypatch.setattr(cache, "_encode", lambda family, batch, device: sizes.append(len(batch["captions"])) or encode(family, batch, device))
    make_cache(tiny_teacher, one_shard, tmp_path / "cache", "--batch_size", "3")
    assert sizes == [3, 1]  # the shard's 4 samples
    with pytest.raises(SystemExit, match="--batch_size must be >= 1"):
        make_cache(tiny_teacher, one_shard, tmp_path / "cache0", "--batch_size", "0")


def test_a_cache_with_no_usable_sample_says_why(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: `tcdistill cache` on shards whose keys hold a dot said only "no usable sample in ... (skipped: {'missing_image':
    1})", where the training loader's error gives the last skip's reason (here the hint to drop the dots)."""
    shard = write_shard(tmp_path / "dots.tar", [(f"img.{i}", good_sample("x", "c")[1]) for i in range(2)])
    with pytest.raises(SystemExit, match=r"^tcdistill cache: error: no usable sample in .*missing_image.*; last error: "
                                         rf"{tmp_path}/dots.tar: img: no image among .*drop the dots before the extension"):
        make_cache(tiny_teacher, shard, tmp_path / "cache")


def test_a_cache_into_the_folder_of_its_source_shards_is_refused_before_it_replaces_them(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: `tcdistill cache --train_shards_path_or_url 'data/{00000..00001}.tar' --output_dir data` wrote its shards
    (00000.tar, ...) over the source shards of the same names as it went: the images were gone, and no word said so."""
    data = tmp_path / "data"
    write_tiny_shards(data, n_shards=2, per_shard=2, image_size=32, seed=0)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    for spec in (shard_pattern(data, 2), f"{tmp_path}/other.tar::file:{data}/00001.tar"):
        with pytest.raises(SystemExit, match=r"^tcdistill cache: error: --output_dir .* holds the source shard .*0000[01]\.tar"):
            make_cache(tiny_teacher, spec, data)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


def test_a_second_cache_into_a_folder_in_use_is_refused_before_it_touches_the_first_ones_shards(
        tiny_teacher: Path, one_shard: str, tmp_path: Path, run_env: dict[str, str]) -> None:
    """QA: two caches into one --output_dir wrote the same NNNNN.tar.tmp names, and each removes those it finds at its
    start: the first run's shard in progress was deleted under it, and one run published the other's half-written shard
    under its own metadata. The folder is locked as a training run's is: the second run is refused in one line, naming
    the holder's pid and what it is, and leaves the first run's files alone."""
    out = tmp_path / "cache"
    out.mkdir()
    (out / "00000.tar.tmp").write_bytes(b"\0" * 1024)  # the first run's shard in progress
    with lock_holder(out, run_env, role="`tcdistill cache` run") as holder, pytest.raises(SystemExit) as info:
        make_cache(tiny_teacher, one_shard, out)
    msg = str(info.value.code)
    assert msg.startswith("tcdistill cache: error: --output_dir") and "\n" not in msg, msg
    assert f"in use by another `tcdistill cache` run (pid {holder.pid}" in msg, msg
    assert (out / "00000.tar.tmp").exists() and not (out / "00000.tar").exists()
    make_cache(tiny_teacher, one_shard, out)  # the lock ends with its holder: a run now goes ahead
    read_sidecar(str(out / "00000.tar"))


def test_a_cached_shard_cut_short_or_deleted_after_caching_is_refused(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: a cached shard truncated after caching was read in part (training warned only "Skipped samples by kind:
    {'shard_error': 2, 'missing_member': 2}" at its end, naming no file), a deleted one not at all. The cache records each
    shard's size and training refuses a listed one of another size, naming it; a pattern naming fewer shards still works."""
    import json

    src = tmp_path / "src"
    write_tiny_shards(src, n_shards=2, per_shard=2, image_size=(32, 32), seed=5)
    out = tmp_path / "cache"
    make_cache(tiny_teacher, shard_pattern(src, 2), out)
    both = str(out / "{00000..00001}.tar")
    read_sidecar(both)
    size = (out / "00001.tar").stat().st_size
    with open(out / "00001.tar", "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ConfigError, match=rf"^--train_latents_path_or_url: {out}/00001.tar holds {size // 2} bytes where "
                                          rf"`tcdistill cache` wrote {size} \(deleted, cut short or replaced since\)"):
        read_sidecar(both)
    (out / "00001.tar").unlink()
    with pytest.raises(ConfigError, match=r"00001.tar is missing where `tcdistill cache` wrote"):
        read_sidecar(both)
    read_sidecar(str(out / "00000.tar"))  # the shards named are checked, not the others
    meta = json.loads((out / META_NAME).read_text())
    del meta["shard_bytes"]  # a cache made before the sizes were recorded: not checked
    (out / META_NAME).write_text(json.dumps(meta))
    read_sidecar(both)


def test_a_teacher_with_a_cut_short_weight_file_is_one_line_naming_it(tiny_teacher: Path, one_shard: str, tmp_path: Path) -> None:
    """QA: a teacher whose text encoder weights were cut short (an interrupted copy or download) stopped `tcdistill cache`
    (and training, which loads it the same way) on a SafetensorError traceback: transformers lets it through."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    damaged = teacher / "text_encoder" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(SystemExit) as info:
        make_cache(teacher, one_shard, tmp_path / "cache")
    # safetensors' own words vary by version ("invalid header length", "InvalidHeaderLength"): the rest is ours.
    assert re.fullmatch(rf"tcdistill cache: error: {re.escape(str(damaged))} cannot be read \(Error while deserializing header: "
                        r"[^\n]+\): a weight file cut short or damaged; copy or download it again", str(info.value.code)), info.value.code
