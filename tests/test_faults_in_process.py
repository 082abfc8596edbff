"""Faults checked in-process: the step guard's single transfer, damaged teacher weights, unwritable validation images,
the output-dir lock, a full disk, stop signals and their handlers."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BASE, QUICK_VALIDATION, ROOT, complete_checkpoints


def test_finite_step_guard_reads_loss_and_gradient_in_one_transfer(tiny_teacher, tiny_shards, tmp_path):
    """The step guard: a finite step applies; a non-finite gradient (finite loss) or loss is skipped and counted; the
    limit stops the run naming the last good checkpoint. Its one host transfer returns the loss value too."""
    import torch

    from tcdistill.config import TrainConfig
    from tcdistill.stops import NonFiniteError
    from tcdistill.trainer import Trainer

    tr = Trainer(TrainConfig(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path), train_shards_path_or_url=tiny_shards,
                             resolution=32, max_train_steps=1, report_to="none", mixed_precision="no", max_nonfinite_steps=3))
    params = tr.strategy.trainable_parameters()

    def grads(value: float) -> None:
        for p in params:
            p.grad = torch.full_like(p, value)

    grads(1e-3)
    assert tr._finite_step(torch.tensor(0.25)) == (0.25, True) and tr.nonfinite_streak == 0
    grads(float("inf"))
    assert tr._finite_step(torch.tensor(0.25)) == (0.25, False) and tr.nonfinite_streak == 1
    grads(1e-3)
    value, ok = tr._finite_step(torch.tensor(float("nan")))
    assert math.isnan(value) and not ok and tr.nonfinite_streak == 2 and tr.skipped["nonfinite_step"] == 2
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite steps"):
        tr._finite_step(torch.tensor(float("nan")))
    grads(1e-3)
    assert tr._finite_step(torch.tensor(1.5)) == (1.5, True) and tr.nonfinite_streak == 0


def test_damaged_teacher_weights_are_a_config_error_without_the_pickle_hint(tiny_teacher, tiny_shards, tmp_path):
    """A teacher whose safetensors file is damaged: ConfigError naming it (one line from the scripts); the
    --allow_pickle_weights hint is for a teacher without safetensors files, not for this."""
    import shutil

    from tcdistill.config import ConfigError, TrainConfig
    from tcdistill.trainer import Trainer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    weights = next((teacher / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8  # the header length: unreadable
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="cannot load the teacher") as info:
        Trainer(TrainConfig(pretrained_teacher_model=str(teacher), output_dir=str(tmp_path / "out"), train_shards_path_or_url=tiny_shards,
                            resolution=32, max_train_steps=1, report_to="none", mixed_precision="no"))
    assert "unet" in str(info.value) and "allow_pickle_weights" not in str(info.value) and "\n" not in str(info.value), info.value


def test_validation_that_cannot_write_its_images_does_not_end_the_run(tiny_teacher, tiny_shards, tmp_path, caplog):
    """QA: an --output_dir that turned read-only (or full) mid-run ended the run at the next validation with a raw
    PermissionError traceback from os.makedirs, though failed checkpoint saves are logged and training goes on."""
    from tcdistill.config import TrainConfig
    from tcdistill.trainer import Trainer

    tr = Trainer(TrainConfig(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path), train_shards_path_or_url=tiny_shards,
                             resolution=32, max_train_steps=1, report_to="none", mixed_precision="no", **QUICK_VALIDATION))
    (tmp_path / "validation").write_text("")  # os.makedirs fails here as on a read-only dir (root ignores chmod)
    with caplog.at_level("ERROR", logger="tcdistill"):
        tr.validate()  # logged, not raised
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "validation could not write its images" in errors[0] and "training goes on" in errors[0], errors
    assert "validation" in errors[0].split("(", 1)[1] and "\n" not in errors[0]  # the error names the path it could not make
    assert not list(tmp_path.rglob("*.png"))


def test_resume_without_seed_reads_the_same_data_stream(tiny_teacher, tiny_shards, tmp_path):
    """QA: without --seed every run drew a new data-stream seed, so a resumed run's saved stream position pointed into
    another stream. The drawn seed is kept in the rank's checkpoint state and reused; a new run still draws its own."""
    from tcdistill.config import TrainConfig
    from tcdistill.trainer import Trainer

    kw = dict(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, resolution=32,
              report_to="none", mixed_precision="no", checkpointing_steps=1, validation_steps=0, train_batch_size=2)
    first = Trainer(TrainConfig(**kw, output_dir=str(tmp_path / "a"), max_train_steps=1))
    first.train()
    resumed = Trainer(TrainConfig(**kw, output_dir=str(tmp_path / "a"), max_train_steps=2, resume_from_checkpoint="latest"))
    resumed.maybe_resume()
    assert resumed.global_step == 1 and resumed._data_seed() == first._data_seed()
    assert Trainer(TrainConfig(**kw, output_dir=str(tmp_path / "b"), max_train_steps=1))._data_seed() != first._data_seed()


def test_the_output_dir_lock_dies_with_the_trainer_not_with_its_forked_loader_workers(run_env, tmp_path):
    """QA: the lock was an flock, which belongs to the open file and so also to every process forked while it is held:
    the DataLoader workers. After a SIGKILL of the trainer they held it on until they noticed their parent was gone (5 s
    measured; a worker blocked in a slow shard read, longer), and a resume started at once was refused as "in use by
    another training run" naming the dead pid. Here a forked child outlives its killed parent: the lock is free."""
    from tcdistill import preflight

    out = tmp_path / "out"
    out.mkdir()
    hold = ("import os, sys, time; from tcdistill.preflight import lock_output_dir; lock_output_dir(sys.argv[1]); "
            "child = os.fork()\nif child == 0: time.sleep(600)\nprint(child, flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=ROOT, env=run_env, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the forked child (a loader worker's stand-in) is still alive
        preflight.lock_output_dir(str(out))
    finally:
        os.kill(child, signal.SIGKILL)
    fd = preflight._held_locks[os.path.realpath(out)]
    preflight.lock_output_dir(str(out))  # a second trainer in this process shares the lock: no second descriptor
    assert preflight._held_locks[os.path.realpath(out)] == fd
    os.close(preflight._held_locks.pop(os.path.realpath(out)))


def test_the_lock_file_names_only_the_holders_pid(tmp_path):
    """A longer pid left in the file by an earlier holder must not run into this one's (the refusal message quotes it)."""
    from tcdistill import preflight

    (tmp_path / preflight.LOCK_NAME).write_text("9999999999")
    preflight.lock_output_dir(str(tmp_path))
    try:
        assert (tmp_path / preflight.LOCK_NAME).read_text() == f"{os.getpid()} training run"  # pid, then its role
    finally:
        os.close(preflight._held_locks.pop(os.path.realpath(tmp_path)))


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path):
    """Review: a `.tcdistill.lock` that cannot be opened (a folder of that name; another user's file) raised a raw
    IsADirectoryError/PermissionError inside claim_output_dir's try, which catches ConfigError only: a traceback, and in
    a multi-process run the main process ended before the broadcast of its refusal that the other ranks waited in."""
    from tcdistill import preflight

    (tmp_path / preflight.LOCK_NAME).mkdir()
    with pytest.raises(preflight.ConfigError, match=r"--output_dir .*\.tcdistill\.lock cannot be opened.*pick another --output_dir"):
        preflight.lock_output_dir(str(tmp_path))
    assert os.path.realpath(tmp_path) not in preflight._held_locks


def test_a_new_output_dir_is_made_and_locked(tmp_path):
    """Mutation testing: claim_output_dir's tests met folders that existed (locked before the hub repo) or refusals; a
    new --output_dir (the usual case) must still be made, and locked, after the hub repo."""
    from types import SimpleNamespace

    from tcdistill import preflight
    from tcdistill.config import TrainConfig

    out = tmp_path / "runs" / "new"
    main_process = SimpleNamespace(is_main_process=True, num_processes=1)
    assert preflight.claim_output_dir(TrainConfig(**BASE, output_dir=str(out)), main_process) is None
    try:
        assert out.is_dir() and (out / preflight.LOCK_NAME).read_text() == f"{os.getpid()} training run"
        assert os.path.realpath(out) in preflight._held_locks
    finally:
        if (fd := preflight._held_locks.pop(os.path.realpath(out), None)) is not None:
            os.close(fd)


def test_a_broken_symlink_output_dir_is_refused_before_the_hub_repo(tmp_path, monkeypatch):
    """QA: an --output_dir that is (or lies below) a symbolic link to a folder that does not exist (a disk not mounted)
    passed the checks made before --push_to_hub's repo (the link does not "exist", so the folder above it was probed):
    the repo was created, then the run refused with "is not writable: File exists" (or "No such file or directory").
    It is refused first now, in one line naming the link and its target."""
    import re
    from types import SimpleNamespace

    import huggingface_hub

    from tcdistill import preflight
    from tcdistill.config import ConfigError, TrainConfig

    created = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda **kw: created.append(kw) or huggingface_hub.RepoUrl("https://huggingface.co/me/x"))
    link, target = tmp_path / "out", tmp_path / "unmounted" / "run"
    link.symlink_to(target)
    needle = re.escape(f"goes through the broken symbolic link {str(link)!r} (to {str(target)!r}); create its target")
    for out in (link, link / "sub"):
        cfg = TrainConfig(**BASE, output_dir=str(out), push_to_hub=True, hub_model_id="me/x")
        with pytest.raises(ConfigError, match=needle):
            preflight.claim_output_dir(cfg, SimpleNamespace(is_main_process=True, num_processes=1))
        with pytest.raises(ConfigError, match=needle):
            preflight.check_output_dir(str(out))  # the folder made at once (generate, eval): the same line
    assert created == [] and not (tmp_path / "unmounted").exists()


def test_a_full_disk_at_the_start_or_at_the_model_card_is_one_line(tiny_teacher, tiny_shards, tmp_path, monkeypatch):
    """QA: a disk left full (by an earlier run) passed the output-dir probe (an empty file) and the run ended in a raw
    OSError traceback writing tcdistill_config.json; a disk that filled up after the final weights ended in one writing
    the model card."""
    import errno
    import json

    import tcdistill.modelcard
    from tcdistill.checkpoint import CheckpointError
    from tcdistill.config import ConfigError, TrainConfig
    from tcdistill.trainer import Trainer

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def fills_up(obj, f, **kwargs):  # the disk fills up part-way through the run's record
        f.write(json.dumps(obj)[:100])
        f.flush()
        disk_full()

    cfg = dict(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path), train_shards_path_or_url=tiny_shards,
               resolution=32, max_train_steps=1, report_to="none", mixed_precision="no", validation_steps=0, train_batch_size=2)
    # QA: the record of the run that used the folder before was cut short to what fitted, and `tcdistill generate` on
    # its outputs failed reading it; it stays whole now.
    (tmp_path / "tcdistill_config.json").write_text('{"resolution": 64}')
    with monkeypatch.context() as m:
        m.setattr(json, "dump", fills_up)
        with pytest.raises(ConfigError, match=r"writing tcdistill_config.json failed \(OSError: \[Errno 28\] No space") as info:
            Trainer(TrainConfig(**cfg)).train()
    assert "\n" not in str(info.value)
    assert (tmp_path / "tcdistill_config.json").read_text() == '{"resolution": 64}'
    assert not list(tmp_path.glob(".tcdistill_config.json*"))
    monkeypatch.setattr(tcdistill.modelcard, "write_model_card", disk_full)
    with pytest.raises(CheckpointError, match=r"writing the model card .* failed .*No space left.*the trained weights are saved") as info:
        Trainer(TrainConfig(**cfg)).train()
    assert "\n" not in str(info.value) and (tmp_path / "unet_target").is_dir()


def test_stop_on_signals_records_once_and_leaves_an_ignored_signal_ignored():
    """The handler records the first SIGTERM and gives the next one back to the previous handler; a SIGINT the process
    was started ignoring (a shell script's background job) stays ignored."""
    from tcdistill.stops import stop_on_signals

    got: list[int] = []
    before_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    before_term = signal.getsignal(signal.SIGTERM)
    try:
        with stop_on_signals(got.append):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs between bytecodes
            assert got == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == before_term
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before_int)
        signal.signal(signal.SIGTERM, before_term)


def test_stop_on_signals_gives_the_handlers_back_after_the_block():
    from tcdistill.stops import stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals(lambda signum: None):
        pass
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_run_ending_on_an_error_absorbs_the_launchers_first_sigterm():
    """CI: under torchrun, a rank whose collective broke because another rank failed was SIGTERMed by the launcher
    while it unwound its error, and the default action ended it before its one line (2 CPU processes on a loaded
    machine, 2 runs in 12). After the block raises, the first SIGTERM is absorbed and the previous handler given back;
    a SIGTERM already received in the block absorbs nothing more. (In a child: a regression would end the process.)"""
    code = """if True:
        import os, signal, time
        from tcdistill.stops import stop_on_signals
        def ends_on_error(record, signalled=False):
            try:
                with stop_on_signals(record):
                    if signalled:
                        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)
                    raise RuntimeError("peer closed")
            except RuntimeError:
                pass
        got = []
        ends_on_error(lambda signum: None)
        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)
        print("absorbed", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
        ends_on_error(got.append, signalled=True)
        print("received", got == [signal.SIGTERM], signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
        os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)
        print("not reached", flush=True)
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.splitlines() == ["absorbed True", "received True True"], (proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == -signal.SIGTERM


def test_a_loader_worker_killed_mid_run_ends_it_in_one_line(tmp_path, monkeypatch):
    """QA: `kill -9` of a loader worker (what the out-of-memory killer does) mid-run ended the trainer with torch's
    traceback, raised from its SIGCHLD handler inside an unrelated conv2d; so did a SIGTERM to the whole process group.
    It is one line now, with the likely cause for the signal."""
    from torch.utils.data import DataLoader, IterableDataset

    import tcdistill.trainer
    from tcdistill.cli import train_main

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                time.sleep(0.01)
                # An int, not a tensor: a tensor crosses by a shared file descriptor, and reading one the killed worker
                # had sent raised EOFError/ConnectionResetError instead of torch's worker error (a loaded machine, twice)
                yield 0

    batches = iter(DataLoader(Endless(), num_workers=1, batch_size=None))
    next(batches)
    os.kill(batches._workers[0].pid, signal.SIGKILL)
    try:
        with pytest.raises(RuntimeError, match=r"^DataLoader worker \(pid") as died:  # torch's error, whichever of its two
            for _ in range(1000):
                next(batches)
    finally:  # unregisters the dead worker from torch's SIGCHLD handler, which a later test's child exit would trip
        try:
            batches._shutdown_workers()
        except RuntimeError:  # that handler fired again during its join (seen on a loaded machine); torch's own
            pass  # `finally` there has unregistered the workers all the same

    class Trainer:
        def __init__(self, cfg):
            pass

        def train(self):
            raise died.value

    monkeypatch.setattr(tcdistill.trainer, "Trainer", Trainer)
    flags = [f"--{k}={v}" for k, v in BASE.items()] + [f"--output_dir={tmp_path}"]
    with pytest.raises(SystemExit) as info:
        train_main("full", flags, prog="t")
    line = str(info.value.code)
    assert line.startswith("t: error: a data loader worker process ended (DataLoader worker (pid") and "\n" not in line, line
    assert "lower --dataloader_num_workers" in line and "--resume_from_checkpoint latest" in line, line
    # A SIGTERM to the process group (SLURM's) ended the workers too: the line said "out of memory" for it.
    from tcdistill.stops import loader_worker_death

    term = loader_worker_death(RuntimeError("DataLoader worker (pid 995) is killed by signal: Terminated. "))
    assert "(DataLoader worker (pid 995) is killed by signal: Terminated)" in term and "trainer process only" in term, term
    assert "out of memory" not in term and loader_worker_death(RuntimeError("Pin memory thread exited unexpectedly")) is None


def test_loader_workers_leave_ctrl_c_to_the_trainer_without_passing_an_ignored_sigint_to_pipe_commands():
    """A handler, not SIG_IGN: a `pipe:` command (curl) started by the worker would inherit SIG_IGN and outlive Ctrl-C."""
    from tcdistill.stops import leave_ctrl_c_to_the_trainer

    before = signal.getsignal(signal.SIGINT)
    try:
        leave_ctrl_c_to_the_trainer(0)
        assert callable(signal.getsignal(signal.SIGINT))
        ignored = subprocess.run(["sh", "-c", "grep SigIgn /proc/self/status"], capture_output=True, text=True).stdout.split()[1]
        assert not int(ignored, 16) & (1 << (signal.SIGINT - 1)), ignored
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_stop_signal_saves_before_the_steps_validation(tiny_teacher, tiny_shards, tmp_path):
    """QA: a SIGTERM during a step that validation follows (--validation_steps divides it) ran the whole validation
    (a minute and more for SDXL) before the stop's checkpoint, in the grace time a preemption leaves before its SIGKILL
    (torchrun's: 30 s). The stopping step now skips its validation and saves at once."""
    from tcdistill.config import TrainConfig
    from tcdistill.stops import Interrupted
    from tcdistill.trainer import Trainer

    tr = Trainer(TrainConfig(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path), train_shards_path_or_url=tiny_shards,
                             resolution=32, max_train_steps=5, checkpointing_steps=100, validation_steps=1, report_to="none",
                             mixed_precision="no", train_batch_size=2, seed=0, **QUICK_VALIDATION))
    validated, train_step = [], tr.train_step

    def step_then_signal(batch):
        if tr.global_step == 1:  # the second step: SIGTERM arrives while it computes
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(batch)

    tr.train_step, tr.validate = step_then_signal, lambda: validated.append(tr.global_step)
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 2"):
        tr.train()
    assert validated == [1] and sorted(complete_checkpoints(tmp_path)) == [2]
