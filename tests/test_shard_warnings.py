"""QA: a failing shard (missing, cut short, not a tar, a failing `pipe:` command) was only counted (`shard_error: N`
per pass); its name and reason appeared only when --data_failure_patience ran out, so one bad shard among 1,000 could
not be found. Each process now names each failing shard once, for its first 20, then says how many more failed."""

from __future__ import annotations

import logging
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # shards_util lives next to this file

from conftest import batches, cfg_for, total_skipped  # noqa: E402
from shards_util import good_sample, write_shard  # noqa: E402

from tcdistill.shard_failures import ShardFailureLog  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _shards(d: Path) -> tuple[list[str], str, str]:
    """Two good shards and two failing ones (a missing file, a pipe: command exiting 1), ordered so that each of two
    loader workers gets one good and one failing shard; returns (urls, missing, pipe)."""
    good = [write_shard(d / f"g{i}.tar", [good_sample(f"k{i}_{j}", f"c{i}") for j in range(2)]) for i in range(2)]
    missing, pipe = str(d / "gone.tar"), "pipe:false"
    return [good[0], good[1], missing, pipe], missing, pipe


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_shard_is_shipped_once_per_worker_with_its_reason(tmp_path: Path, workers: int) -> None:
    urls, missing, pipe = _shards(tmp_path)
    bs = batches(cfg_for(urls, train_batch_size=2, dataloader_num_workers=workers), 16)
    assert total_skipped(bs)["shard_error"] >= 4  # each bad shard was read (and counted) more than once ...
    named = [f for b in bs for f in b["failed_shards"]]
    assert Counter(url for url, _, _ in named) == {missing: 1, pipe: 1}, named  # ... and shipped once
    reasons = {url: (kind, reason) for url, kind, reason in named}
    assert reasons[missing][0] == "shard_error" and "FileNotFoundError" in reasons[missing][1], reasons
    assert "'false' exited with status 1" in reasons[pipe][1], reasons


def test_the_log_names_each_shard_once_and_bounds_the_lines(caplog: pytest.LogCaptureFixture) -> None:
    log = ShardFailureLog("rank 1: ", limit=3)
    with caplog.at_level(logging.WARNING, logger="tcdistill"):
        # two workers sharing shards report the same one: named once
        log.report([("a.tar", "shard_error", "FileNotFoundError: No such file or directory: a.tar")])
        log.report([("a.tar", "shard_error", "FileNotFoundError: No such file or directory: a.tar"), ("b.tar", "stalled", "no data")])
        log.report([(f"x{i}.tar", "shard_error", "ReadError: bad") for i in range(1000)])
        log.summary()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all("\n" not in line for line in lines), lines
    assert lines[0] == ("rank 1: shard a.tar failed: FileNotFoundError: No such file or directory: a.tar (its samples before "
                        "the failure are used; skipped samples count it as shard_error each time it is read)")
    assert "shard b.tar failed: no data" in lines[1] and "x0.tar" in lines[2] and "only the first 3 failing shards are named" in lines[2]
    assert lines[3] == "rank 1: ...and 999 more failing shard(s), not named (the first 3 were)"


def test_the_cache_names_each_failing_source_shard(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tcdistill.cache import _OnePass

    urls, missing, pipe = _shards(tmp_path)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(urls[0]).read_bytes()[:900])  # inside the first member's data
    ds, skipped = _OnePass(cfg_for(urls)), Counter()
    with caplog.at_level(logging.WARNING, logger="tcdistill"):
        for url in [*urls, str(cut), missing]:
            list(ds.read_once(url, skipped))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert skipped["shard_error"] == 4 and len(caplog.records) == 3, text
    assert f"shard {missing} failed: FileNotFoundError" in text and "shard pipe:false failed" in text, text
    assert f"shard {cut} failed: ReadError: unexpected end of data" in text, text


def test_a_tar_without_its_end_blocks_says_so(tmp_path: Path) -> None:
    """A tar that stops right after a whole member stays a shard_error (a download cut at a member boundary looks the
    same, and loses the members after it), with a reason that says what the file looks like."""
    path = Path(write_shard(tmp_path / "t.tar", [good_sample(f"k{i}", f"c{i}") for i in range(3)]))
    with tarfile.open(path) as tar:
        k1 = tar.getmember("k1.jpg").offset
    path.write_bytes(path.read_bytes()[:k1])
    (b,) = batches(cfg_for(str(path), train_batch_size=1), 1)
    ((url, kind, reason),) = b["failed_shards"]
    assert (url, kind) == (str(path), "shard_error")
    assert f"the tar ends after a whole member at byte {k1}, without its end blocks" in reason, reason


def test_a_resume_counts_what_the_uninterrupted_run_counts(tmp_path: Path) -> None:
    """The skip counts of a run resumed from a checkpoint's stream state add up to the uninterrupted run's; the resumed
    process names a failing shard it meets again (its own first failure), which adds nothing to the counts."""
    from tcdistill.data import StreamTracker

    urls, missing, pipe = _shards(tmp_path)
    full = batches(cfg_for(urls, train_batch_size=2), 12)
    tracker = StreamTracker()
    for b in full[:5]:
        tracker.consumed(b)
    resumed = batches(cfg_for(urls, train_batch_size=2, resume_state=tracker.state()), 7)
    assert [b["captions"] for b in resumed] == [b["captions"] for b in full[5:]]
    assert total_skipped(full[:5] + resumed) == total_skipped(full), (total_skipped(full[:5] + resumed), total_skipped(full))
    later = {u for b in full[5:] for u, _, _ in b["skipped"] and b["failed_shards"]}
    assert total_skipped(full[5:])["shard_error"] > 0 and not later  # the uninterrupted run named them before step 5
    assert {u for b in resumed for u, _, _ in b["failed_shards"]} == {missing, pipe}
