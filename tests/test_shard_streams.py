"""The loader's shard streams: exact resumes, a worker's widened share, pipe: commands that stall, linger or fail,
missing shards, and the cache's one-pass reader of the same shards."""

from __future__ import annotations

import gc
import io
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # shards_util lives next to this file

from conftest import batches, cfg_for, total_skipped  # noqa: E402
from shards_util import commands_mentioning, good_sample, within, write_shard  # noqa: E402

from tcdistill.data import DataError, build_train_dataloader  # noqa: E402


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
    for forever in (float("inf"), 1e10):  # QA: select() raised OverflowError: every pipe: shard failed, the run stopped
        assert open_shard("pipe:printf abc", forever).read() == b"abc"
    failing = open_shard("pipe:printf abc; exit 3", 5)
    time.sleep(0.5)  # the command has exited: the read sees its status
    with pytest.raises(OSError) as info:
        failing.read(10)
    # One plain line naming the command and its status, not webdataset's repr of its Popen arguments.
    assert str(info.value) == "pipe: command 'printf abc; exit 3' exited with status 3"


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
