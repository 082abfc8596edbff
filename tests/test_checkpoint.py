"""Tests for tcdistill.checkpoint: round trip, latest() selection, pruning, failures and real kills."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import save_small_checkpoint

from tcdistill.checkpoint import CheckpointError, CheckpointIO, atomic_dir, atomic_file, capture_rng_state, restore_rng_state

REPO = Path(__file__).resolve().parents[1]


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_round_trip_tensors_optimizer_scheduler_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    sched.step()
    base = torch.randn(3, 5)
    tensors = {"model": model.state_dict(),
               # tied weights, a view and a non-contiguous tensor: safetensors rejects these unless handled
               "ema": {"a": base, "tied": base, "row": base[1], "t": base.t()}}
    states = {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
              "data": {"shard": 3, "offset": 17, "order": [2, 0, 1]}}

    io = CheckpointIO(tmp_path)
    path = io.save(5, tensors=tensors, states=states, meta={"lr": 1e-3})
    after_save = (torch.rand(4), random.random(), np.random.rand(3))

    assert path == tmp_path / "checkpoint-5" and io.latest() == path
    ckpt = io.load_latest()
    assert ckpt is not None and ckpt.step == 5 and ckpt.meta == {"lr": 1e-3}
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.tensors["model"][key], value)
    for key, value in tensors["ema"].items():
        assert torch.equal(ckpt.tensors["ema"][key], value)
    assert ckpt.states["data"] == states["data"]

    model2 = torch.nn.Linear(8, 4)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 10))
    model2.load_state_dict(ckpt.tensors["model"])
    opt2.load_state_dict(ckpt.states["optimizer"])
    sched2.load_state_dict(ckpt.states["lr_scheduler"])
    saved_state, loaded_state = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(saved_state[key], loaded_state[key])
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()

    assert ckpt.rng is not None
    restore_rng_state(ckpt.rng)
    again = (torch.rand(4), random.random(), np.random.rand(3))
    assert torch.equal(after_save[0], again[0]) and after_save[1] == again[1]
    np.testing.assert_array_equal(after_save[2], again[2])


def test_capture_restore_rng_is_weights_only_safe(tmp_path: Path) -> None:
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_latest_skips_incomplete_and_foreign_dirs(tmp_path: Path) -> None:
    io = CheckpointIO(tmp_path)
    good = save_small_checkpoint(io, 1)

    def copy_as(name: str, step: int | None = None) -> Path:
        dst = tmp_path / name
        shutil.copytree(good, dst)
        if step is not None:
            marker = json.loads((dst / "COMPLETE").read_text())
            (dst / "COMPLETE").write_text(json.dumps({**marker, "step": step}))
        return dst

    (copy_as("checkpoint-9") / "COMPLETE").unlink()  # no marker
    copy_as(".checkpoint-8.tmp-123", 8)  # a temp dir, complete otherwise
    (copy_as("checkpoint-7", 7) / "model.safetensors").unlink()  # marker lists a missing file
    with open(copy_as("checkpoint-6", 6) / "counters.pt", "ab") as f:  # size differs from marker
        f.write(b"x")
    copy_as("checkpoint-5", 99)  # marker for another step
    for name in ("checkpoint-10-old", "checkpoint-abc", "ckpt-11", "checkpoint-12.bak"):
        copy_as(name, 12)
    (tmp_path / "checkpoint-13").write_text("not a dir")
    assert io.latest() == good

    copy_as("checkpoint-3", 3)  # a valid copy is picked up
    assert io.latest() == tmp_path / "checkpoint-3"
    assert io.load_latest().step == 3


def test_atomic_dir_replaces_whole_or_keeps_the_old_folder(tmp_path: Path) -> None:
    final = tmp_path / "unet"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("v1")
        assert not final.exists()  # nothing under the final name until the block succeeds
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("v2-partial")
            raise OSError("disk full")
    assert _entries(final) == ["a.txt"] and (final / "a.txt").read_text() == "v1"  # the old folder, untouched
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("v3")
    assert _entries(final) == ["b.txt"] and _entries(tmp_path) == ["unet"]  # replaced whole; no hidden leftovers


def test_atomic_dir_puts_the_old_folder_back_when_the_final_rename_fails(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "unet"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("v1")
    rename = os.rename

    def fail_publish(src: Path, dst: Path) -> None:
        if Path(src).name.startswith(".unet.tmp-"):  # the new folder's rename into place; the old one's went through
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_publish)
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("v2")
    assert _entries(tmp_path) == ["unet"] and (final / "a.txt").read_text() == "v1"


def test_atomic_dir_gives_its_output_the_modes_of_a_plain_write(tmp_path: Path) -> None:
    """safetensors writes 0600 files: a service run as another user (ComfyUI, A1111) could not read the outputs."""
    old_mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "unet") as tmp:
            (tmp / "w.safetensors").write_text("x")
            os.chmod(tmp / "w.safetensors", 0o600)
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "unet" / "w.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "unet").stat().st_mode) == 0o755


def test_atomic_dir_keeps_a_killed_saves_old_copy_until_the_new_one_is_in_place(tmp_path: Path) -> None:
    """A kill between atomic_dir's two renames leaves the only copy under `.unet.old-<pid>`: a save that fails after
    that must not remove it."""
    (tmp_path / ".unet.old-999998").mkdir()
    (tmp_path / ".unet.old-999998" / "a.txt").write_text("v1")
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(tmp_path / "unet"):
            raise OSError("disk full")
    assert _entries(tmp_path) == [".unet.old-999998"]


def test_atomic_dir_removes_a_killed_saves_leftovers(tmp_path: Path) -> None:
    """QA: a SIGKILL during the final save left `.unet_target.tmp-<pid>` (a whole UNet) in the output dir for good,
    and a kill between the two renames a `.unet.old-<pid>` (uploaded by --push_to_hub); the next save removes them."""
    final = tmp_path / "unet"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("v1")
    for name in (".unet.tmp-999999", ".unet.old-999998"):  # as a killed process with another pid leaves them
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_text("partial")
    (tmp_path / ".unet_target.tmp-999999").mkdir()  # another folder's leftover: that folder's own save removes it
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert _entries(tmp_path) == [".unet_target.tmp-999999", "unet"] and _entries(final) == ["b.txt"]


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    """A failed write (here ENOSPC) keeps the previous file and leaves no temp file; a killed write's leftover (another
    pid's) goes at the next write of the same file, another file's stays."""
    import errno

    final = tmp_path / "meta.json"
    with atomic_file(final) as tmp:
        tmp.write_text("v1")
    with pytest.raises(OSError, match="No space"):
        with atomic_file(final) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert final.read_text() == "v1" and _entries(tmp_path) == ["meta.json"]
    (tmp_path / ".meta.json.tmp-999999").write_text("killed")
    (tmp_path / ".other.json.tmp-999999").write_text("killed")
    with atomic_file(final) as tmp:
        tmp.write_text("v2")
    assert final.read_text() == "v2" and _entries(tmp_path) == [".other.json.tmp-999999", "meta.json"]


def test_total_limit_keeps_newest(tmp_path: Path) -> None:
    io = CheckpointIO(tmp_path, total_limit=2)
    for step in (100, 200, 300, 400):
        save_small_checkpoint(io, step)
    assert _entries(tmp_path) == ["checkpoint-300", "checkpoint-400"]
    assert io.load_latest().tensors["model"]["w"][0, 0].item() == 400.0


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    io = CheckpointIO(tmp_path)
    save_small_checkpoint(io, 1)
    io.save(1, tensors={"model": {"w": torch.zeros(2)}}, states={})
    assert _entries(tmp_path) == ["checkpoint-1"]
    assert torch.equal(io.load_latest().tensors["model"]["w"], torch.zeros(2))


def test_failed_save_keeps_previous_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = CheckpointIO(tmp_path, total_limit=1)
    save_small_checkpoint(io, 1)

    def disk_full(tensors: dict, filename: str | Path, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")  # fail mid-write, leaving a truncated file behind
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    for step in (2, 1):  # a new step, and a re-save of the existing step
        with pytest.raises(CheckpointError) as info:
            save_small_checkpoint(io, step)
        message = str(info.value)
        assert "\n" not in message and "No space left" in message
        assert "previous checkpoints are intact" in message and "checkpoint-1" in message
        assert _entries(tmp_path) == ["checkpoint-1"]  # temp and staging dirs removed
    monkeypatch.undo()
    assert io.load_latest().tensors["model"]["w"][0, 0].item() == 1.0


def test_unsafe_state_rejected_at_save_time(tmp_path: Path) -> None:
    io = CheckpointIO(tmp_path)
    save_small_checkpoint(io, 1)
    with pytest.raises(CheckpointError, match=r"numpy.*weights_only"):
        io.save(2, tensors={}, states={"sched": {"lr": np.float64(0.1)}})
    with pytest.raises(CheckpointError, match=r"key (np\.int64\()?0\)? is a numpy\.int64.*weights_only"):  # keys are unpickled too (numpy<2 reprs 0)
        io.save(2, tensors={}, states={"sched": {np.int64(0): 0.1}})
    with pytest.raises(CheckpointError, match="invalid checkpoint entry name 'rng_state_1'"):  # reserved for the ranks' RNG
        io.save(2, tensors={}, states={"rng_state_1": {}})
    assert _entries(tmp_path) == ["checkpoint-1"]


def test_read_only_output_dir(tmp_path: Path) -> None:
    io = CheckpointIO(tmp_path)
    save_small_checkpoint(io, 1)
    tmp_path.chmod(0o500)
    try:
        try:  # root ignores the mode bits, so check whether writing is really refused
            (tmp_path / "probe").write_text("x")
            (tmp_path / "probe").unlink()
            pytest.skip("chmod does not stop writes here (running as root?)")
        except PermissionError:
            pass
        with pytest.raises(CheckpointError, match=r"previous checkpoints are intact, newest: .*checkpoint-1"):
            save_small_checkpoint(io, 2)
    finally:
        tmp_path.chmod(0o700)
    assert _entries(tmp_path) == ["checkpoint-1"]
    assert io.load_latest().step == 1


@pytest.mark.parametrize("kwargs", [dict(total_limit=0), dict(rank=2, num_processes=2), dict(rank=-1)])
def test_bad_constructor_arguments_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CheckpointIO(tmp_path, **kwargs)


def test_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = CheckpointIO(tmp_path / "run")
    assert io.resolve(None) is None
    assert io.resolve("latest") is None and io.load_latest() is None  # output dir does not even exist
    with pytest.raises(CheckpointError, match="does not exist"):
        io.resolve(tmp_path / "nope")
    path = save_small_checkpoint(io, 4)
    assert io.resolve("latest") == path and io.resolve(str(path)) == path
    assert io.resolve("checkpoint-4") == path  # relative to output_dir
    # QA: a checkpoint-4 in the working directory too (another run's output dir) was resumed instead, silently.
    monkeypatch.chdir(tmp_path / "run")
    assert io.resolve("checkpoint-4") == path  # the same folder
    save_small_checkpoint(CheckpointIO(tmp_path / "other"), 4)
    monkeypatch.chdir(tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"'checkpoint-4' names both .*other/checkpoint-4.* and .*run/checkpoint-4.*absolute path"):
        io.resolve("checkpoint-4")
    (tmp_path / "run" / "checkpoint-9").mkdir()
    with pytest.raises(CheckpointError, match=r"no valid COMPLETE marker.*newest complete checkpoint.*checkpoint-4"):
        io.resolve("checkpoint-9")
    with pytest.raises(CheckpointError):
        io.load(tmp_path / "run" / "checkpoint-9")


def test_multi_process_save(tmp_path: Path) -> None:
    barrier = threading.Barrier(2, timeout=10)
    ios = [CheckpointIO(tmp_path, is_main_process=rank == 0, rank=rank, num_processes=2) for rank in range(2)]
    results: dict[int, Path] = {}

    def run(rank: int) -> None:
        results[rank] = ios[rank].save(3, tensors={"model": {"w": torch.ones(2)}}, states={"c": {"n": 1}},
                                       barrier=barrier.wait, rank_extra={"data": {"shard": rank}})

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: tmp_path / "checkpoint-3", 1: tmp_path / "checkpoint-3"}
    assert {"rng_state_0.pt", "rng_state_1.pt"} <= set(_entries(tmp_path / "checkpoint-3"))
    assert _entries(tmp_path) == ["checkpoint-3"]
    for rank in range(2):  # each rank gets back its own RNG state and per-rank extra, and no rank's RNG as a state
        ckpt = ios[rank].load_latest()
        assert ckpt.rng["extra"] == {"data": {"shard": rank}} and set(ckpt.states) == {"c"}

    # QA: a newest checkpoint with one rank's RNG file unreadable was skipped by that rank alone; under DDP rank 0
    # resumed at step 4 and rank 1 at step 2, their models differed and the run hung at its end. Every rank now
    # decides alike.
    threads = [threading.Thread(target=lambda r=rank: ios[r].save(5, tensors={"model": {"w": torch.ones(2)}}, states={"c": {"n": 1}},
                                                                   barrier=barrier.wait)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rng_1 = tmp_path / "checkpoint-5" / "rng_state_1.pt"
    rng_1.write_bytes(b"x" * rng_1.stat().st_size)  # same size: only loading finds out
    assert [io.load_latest().step for io in ios] == [3, 3]
    with pytest.raises(CheckpointError, match="rng_state_1.pt changed after the save"):  # a path given: every rank refuses it
        ios[0].load(tmp_path / "checkpoint-5")
    shutil.rmtree(tmp_path / "checkpoint-5")

    with pytest.raises(ValueError, match="barrier"):
        ios[0].save(4, tensors={}, states={})
    ios[0].write_rank_state(4)  # rank 1 never writes: the main process must refuse to finalize
    with pytest.raises(CheckpointError, match="rank 1 wrote no rng_state_1.pt"):
        ios[0].finalize(4, tensors={}, states={})
    assert _entries(tmp_path) == ["checkpoint-3"]


def test_a_rank_whose_rng_write_fails_fails_the_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its error must not be lost, and an earlier attempt's rng_state_<rank>.pt must not stand in for the missing one."""
    ios = [CheckpointIO(tmp_path, is_main_process=rank == 0, rank=rank, num_processes=2) for rank in range(2)]
    ios[1].write_rank_state(5)  # an earlier, interrupted attempt at step 5 left rank 1's file in the staging dir
    def disk_full() -> dict:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tcdistill.checkpoint.capture_rng_state", disk_full)
    with pytest.raises(CheckpointError, match="saving checkpoint-5 failed.*No space left"):
        ios[1].save(5, tensors={}, states={}, barrier=lambda: None)
    monkeypatch.undo()
    ios[0].write_rank_state(5)
    with pytest.raises(CheckpointError, match="rank 1 wrote no rng_state_1.pt"):
        ios[0].finalize(5, tensors={}, states={})
    assert ios[0].latest() is None


# Imports torch once (seconds), then on each "go" line forks a worker that resumes like a restarted run
# and saves in a loop until the test SIGKILLs it; after the forked rounds it saves itself and is SIGKILLed.
CHILD = """
import os, sys, time, torch
from tcdistill.checkpoint import CheckpointIO

def save_forever(run_dir):
    io = CheckpointIO(run_dir, total_limit=2)
    last = io.latest()
    step = int(last.name.split("-")[1]) + 1 if last else 1
    deadline = time.time() + 30  # never outlive a crashed test by long
    for i in range(1_000_000):
        if time.time() > deadline:
            os._exit(2)
        io.save(step + i, tensors={"model": {"w": torch.full((256, 1024), float(step + i))}},
                states={"counters": {"step": step + i, "buf": torch.full((4096,), step + i)}}, meta={"step": step + i})
        if i == 0:
            print("ready", os.getpid(), flush=True)

run_dir, rounds = sys.argv[1], int(sys.argv[2])
for _ in range(rounds):
    if not sys.stdin.readline():  # the test is gone, or did not run
        sys.exit(2)
    pid = os.fork()
    if pid == 0:
        save_forever(run_dir)
        os._exit(1)
    os.waitpid(pid, 0)
    print("dead", flush=True)
if sys.stdin.readline():
    save_forever(run_dir)
"""
ROUNDS = 4


@pytest.fixture(scope="module", autouse=True)
def kill_child(tmp_path_factory: pytest.TempPathFactory):
    """Start the kill test's child first, so its torch import overlaps the other tests."""
    run_dir = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), str(ROUNDS)], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield child, run_dir
    child.kill()  # safe: it forks workers only on "go", so a child the test did not use has none
    child.wait()
    child.stdin.close()
    child.stdout.close()


def _check_after_kill(run_dir: Path, previous_step: int) -> int:
    """latest() must be a complete, consistent checkpoint no older than the previous round's."""
    ckpt = CheckpointIO(run_dir).load_latest()
    assert ckpt is not None and ckpt.step >= previous_step and ckpt.meta == {"step": ckpt.step}
    assert torch.equal(ckpt.tensors["model"]["w"], torch.full((256, 1024), float(ckpt.step)))
    assert ckpt.states["counters"]["step"] == ckpt.step and ckpt.rng is not None
    return ckpt.step


def test_sigkill_during_saves_leaves_loadable_latest(kill_child: tuple[subprocess.Popen, Path]) -> None:
    child, run_dir = kill_child
    step = 0
    for round_ in range(ROUNDS + 1):
        child.stdin.write("go\n")
        child.stdin.flush()
        ready, pid = child.stdout.readline().split()
        assert ready == "ready"
        time.sleep(random.uniform(0.0, 0.1))  # a save takes ~0.1 s with fsync: land anywhere in it
        os.kill(int(pid), signal.SIGKILL)
        if round_ < ROUNDS:
            assert child.stdout.readline().strip() == "dead"  # reaped, so it cannot write any more
        else:
            assert child.wait(timeout=10) == -signal.SIGKILL
        step = _check_after_kill(run_dir, step)
    io = CheckpointIO(run_dir, total_limit=2)
    save_small_checkpoint(io, step + 1)  # the next save cleans up whatever the kills left behind
    assert _entries(run_dir) == sorted([f"checkpoint-{step}", f"checkpoint-{step + 1}"])  # _entries sorts names: 10 < 9
