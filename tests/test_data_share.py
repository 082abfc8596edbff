"""Which shards a stream reads: the --train_shards_path_or_url list syntax, and a loader worker's share of the shards
(when it reads its rank's whole share instead, worker_share_widened, from which shard draw, and when a stream whose share
is already the whole one stops, with no widening to fall back on)."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
from shards_util import good_sample, write_shard

import tcdistill.data as data_mod
from tcdistill.data import DataConfig, DataError, ImageTextShards

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def scripted_draws(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replace the shard resampler: the first draw a stream makes (its own part of the share) cycles its urls in order,
    the second (the rank's whole share, read after widening) gives its last url forever. Returns the lists drawn from."""
    made: list[list[str]] = []

    def resampled(urls: list[str], **kw: object):
        made.append(list(urls))
        return ({"url": u} for u in (itertools.cycle(urls) if len(made) == 1 else itertools.repeat(urls[-1])))

    monkeypatch.setattr(data_mod.wds, "ResampledShards", resampled)
    return made


def _stream(urls: list[str], worker: int | None, monkeypatch: pytest.MonkeyPatch, patience: int = 2):
    info = None if worker is None else SimpleNamespace(id=worker, num_workers=2)
    monkeypatch.setattr(data_mod, "get_worker_info", lambda: info)
    cfg = DataConfig(train_shards_path_or_url=urls, resolution=16, train_batch_size=1, seed=0, failure_patience=patience)
    return iter(ImageTextShards(cfg))


def test_a_widened_worker_reads_the_whole_share_from_the_very_next_draw(tmp_path: Path, scripted_draws: list[list[str]],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation QA: reading the worker's own (bad) part once more after the widening draw passed every test. Worker 0 of
    2 holds only the missing shard: its 2 failures (patience 2) widen it at draw 2, whose sample is the good shard's."""
    good, missing = write_shard(tmp_path / "good.tar", [good_sample("k0", "good")]), str(tmp_path / "missing.tar")
    first = next(_stream([missing, good], 0, monkeypatch))
    assert scripted_draws == [[missing], [missing, good]]
    assert first["caption"] == "good" and first["skipped"] == {"shard_error": 2, "worker_share_widened": 1}, first["skipped"]
    assert first["stream_pos"][2:] == (2, 1, 2)  # shard draw 2, next raw sample 1, widened from draw 2


def test_a_stream_reading_its_whole_share_stops_without_widening(tmp_path: Path, scripted_draws: list[list[str]],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation QA: with 0 workers (the stream reads the rank's whole share already) nothing is left to widen to: the
    patience's failures stop it, and the error names no share. Widening there passed every test, and so did naming one."""
    good = write_shard(tmp_path / "good.tar", [good_sample("k0", "good")])
    with pytest.raises(DataError, match="no usable sample in 2 consecutive failures") as info:
        next(_stream([str(tmp_path / "missing.tar"), str(tmp_path / "missing2.tar"), good], None, monkeypatch))
    assert "its share" not in str(info.value) and "worker_share_widened" not in str(info.value), info.value


def test_shards_listed_with_spaces_get_the_join_hint(tmp_path: Path) -> None:
    """Mutation QA: the "join several shards with '::'" hint was pinned for a comma-listed --train_shards_path_or_url
    only; shards listed with spaces (other tools' syntax, e.g. an unquoted shell glob pasted in quotes) lost it unnoticed."""
    from tcdistill.config import ConfigError
    from tcdistill.preflight import check_shards

    a, b = write_shard(tmp_path / "a.tar", [good_sample("k", "x")]), write_shard(tmp_path / "b.tar", [good_sample("k", "x")])
    for spec in (f"{a} {b}", f"{a},\t{b}"):
        with pytest.raises(ConfigError, match=r"^--train_shards_path_or_url: none of the 1 shard file\(s\) exists: .*join several shards with '::'"):
            check_shards(spec)
    with pytest.raises(ConfigError) as info:
        check_shards(str(tmp_path / "c.tar"))
    assert "join several" not in str(info.value)


def test_a_widened_worker_does_not_repeat_its_sibling_workers_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: 2 ranks x 2 loader workers on 4 shards, one bad: the widened worker read the good shard in tar order in step
    with its sibling, so every second step on that rank trained on the batch of the step before. Worker 0 of 2 holds only
    the missing shard here, worker 1 the good one: their first 8 samples must not come in the same order."""
    good = write_shard(tmp_path / "good.tar", [good_sample(f"k{j}", f"good {j}") for j in range(8)])
    urls = [str(tmp_path / "missing.tar"), good]
    widened = [s for s in itertools.islice(_stream(urls, 0, monkeypatch, patience=20), 8)]
    sibling = [s["caption"] for s in itertools.islice(_stream(urls, 1, monkeypatch, patience=20), 8)]
    assert sum(s["skipped"].get("worker_share_widened", 0) for s in widened) == 1
    assert sibling == [f"good {j}" for j in range(8)]
    captions = [s["caption"] for s in widened]
    assert sorted(captions) == sorted(sibling) and captions != sibling, captions


def test_a_folder_or_a_wildcard_as_the_shards_is_refused_before_the_teacher_loads(tmp_path: Path) -> None:
    """QA: a folder of shards as --train_shards_path_or_url passed the preflight (it exists), so the run loaded the teacher,
    then stopped on `IsADirectoryError` after --data_failure_patience shard errors; `dir/*.tar` (not expanded: no shell
    globs in a flag's value) was "none of the shard file(s) exists" with no word on the brace pattern to use instead."""
    from tcdistill.config import ConfigError
    from tcdistill.preflight import check_shards

    write_shard(tmp_path / "a.tar", [good_sample("k", "x")])
    with pytest.raises(ConfigError, match=rf"^--train_shards_path_or_url: {tmp_path} is a folder, not a shard file: .*"
                                          rf"brace pattern \({tmp_path}/{{00000..00009}}\.tar\)"):
        check_shards(str(tmp_path))
    with pytest.raises(ConfigError, match=r"none of the 1 shard file\(s\) exists: .*wildcards .* are not expanded.*brace pattern"):
        check_shards(str(tmp_path / "*.tar"))
    check_shards(f"{tmp_path}::{tmp_path / 'a.tar'}")  # a shard file among them: the loader counts the folder's errors


def test_streams_sharing_a_shard_do_not_repeat_each_others_batches_and_resume_exactly(tmp_path: Path) -> None:
    """QA: with fewer shards than streams (processes x loader workers: one shard and the README's 8 workers), the streams
    sharing a shard read it in tar order, so every worker's batch was the previous worker's samples again (the trainer
    only warned); they read it through their own shuffle, as a widened worker does, which a resume replays."""
    from conftest import batches, cfg_for

    from tcdistill.data import StreamTracker

    url = write_shard(tmp_path / "one.tar", [good_sample(f"k{j:02d}", f"c{j}") for j in range(12)])
    bs = batches(cfg_for(url, dataloader_num_workers=2, train_batch_size=2), 8)
    assert [i for i in range(0, 8, 2) if bs[i]["captions"] == bs[i + 1]["captions"]] == []
    b0, b1 = (batches(cfg_for(url, rank=r, world_size=2, train_batch_size=2), 4) for r in (0, 1))
    assert [i for i, (x, y) in enumerate(zip(b0, b1)) if x["captions"] == y["captions"]] == []
    tracker = StreamTracker()
    for b in bs[:5]:
        tracker.consumed(b)
    resumed = batches(cfg_for(url, dataloader_num_workers=2, train_batch_size=2, resume_state=tracker.state()), 3)
    assert [b["captions"] for b in resumed] == [b["captions"] for b in bs[5:]]


def test_a_folder_of_numbered_shards_is_refused_naming_their_own_pattern(tmp_path: Path) -> None:
    """QA: a `tcdistill cache` output folder (00000.tar, 00001.tar) passed as the shards was refused with the example
    pattern `{00000..00009}.tar`, which names eight shards that do not exist; the hint now names the folder's own."""
    from tcdistill.config import ConfigError
    from tcdistill.preflight import check_shards

    for i in range(2):
        write_shard(tmp_path / f"{i:05d}.tar", [good_sample(f"k{i}", "x")])
    with pytest.raises(ConfigError, match=rf"brace pattern \({tmp_path}/{{00000..00001}}\.tar\)$"):
        check_shards(str(tmp_path), "--train_latents_path_or_url")
