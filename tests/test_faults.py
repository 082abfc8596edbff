"""Fault suite (issue 5), for real: SIGKILLed trainers, corrupt shards, non-finite steps, failing saves, pickle weights."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import QUICK_VALIDATION, ROOT, SCRIPTS, check_ok, complete_checkpoints, lock_holder, run_train, seed_flags


FAST = dict(QUICK_VALIDATION, validation_steps=0, report_to="none", gradient_checkpointing=None,
            enable_xformers_memory_efficient_attention=None, use_8bit_adam=None)


def metrics(out: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (killed, then redone after resume) keeps the last value."""
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows}


def flags_for(variant: str, teacher: Path, shards: str, out: Path, **kw) -> list[str]:
    return seed_flags(variant, teacher=teacher, shards=shards, output_dir=out, **{**FAST, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_sigkill_anywhere_then_resume_gives_the_same_loss_curve(variant, tiny_teacher, tiny_shards, run_env, tmp_path):
    """Kill at random moments (some during checkpoint saves); every restart resumes from a complete checkpoint and
    the final per-step losses equal an uninterrupted run's (data position, RNG, optimizer, EMA all restored)."""
    steps = 8
    kw = dict(max_train_steps=steps, checkpointing_steps=1, checkpoints_total_limit=3, dataloader_num_workers=1,
              random_flip=True, learning_rate=1e-4)
    ref_out = tmp_path / "ref"
    check_ok(run_train(variant, flags_for(variant, tiny_teacher, tiny_shards, ref_out, **kw), run_env))
    ref = metrics(ref_out)
    assert sorted(ref) == list(range(1, steps + 1))

    out = tmp_path / "killed"
    flags = flags_for(variant, tiny_teacher, tiny_shards, out, **kw)
    rnd = random.Random(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(SCRIPTS[variant]), *flags], cwd=ROOT, env=run_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until training is under way (a checkpoint newer than the last one seen), then kill at a random moment.
        before = max(complete_checkpoints(out), default=0)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and max(complete_checkpoints(out), default=0) <= before:
            time.sleep(0.05)
        time.sleep(rnd.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        done = complete_checkpoints(out)
        assert done, "no complete checkpoint after a kill"
        # Never a partial checkpoint under a final name: each one loads.
        from tcdistill.checkpoint import CheckpointIO

        io = CheckpointIO(out)
        assert io.latest() == done[max(done)]
        io.load(io.latest())
    assert kills >= 1
    check_ok(run_train(variant, flags, run_env))  # the last restart finishes the run
    got = metrics(out)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-7), (step, got, ref)


def test_hostile_shards_are_skipped_counted_and_training_goes_on(tiny_teacher, tiny_shards, run_env, tmp_path):
    """Corrupt, missing, empty, caption-less and odd-mode samples among good ones: skipped, counted, run completes."""
    import io
    import tarfile

    from PIL import Image

    bad = tmp_path / "bad"
    bad.mkdir()

    def img(mode: str, size=(40, 30), fmt="PNG") -> bytes:
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, fmt)
        return buf.getvalue()

    members = {
        "a.jpg": b"not an image", "a.txt": b"corrupt image",
        "b.png": img("RGBA"), "b.txt": "\xff\xfe non-utf8".encode("latin-1"),
        "c.png": img("I;16"), "c.txt": b"16-bit",
        "d.jpg": img("CMYK", fmt="JPEG"), "d.txt": b"cmyk",
        "e.png": img("P"),  # no caption
        "f.png": img("RGB", (1, 1)), "f.txt": b"one pixel",
        "g.cls": b"3", "g.txt": b"no image",
    }
    with tarfile.open(bad / "mixed.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (bad / "empty.tar").write_bytes(b"")
    (bad / "trunc.tar").write_bytes((bad / "mixed.tar").read_bytes()[:700])
    from tcdistill.tiny import write_tiny_shards

    # A 2-sample good shard: the 8 samples of the run need several shard draws, so bad shards are met too.
    good = write_tiny_shards(tmp_path / "good", n_shards=1, per_shard=2, image_size=32, seed=3)[0]
    spec = "::".join([good, str(bad / "mixed.tar"), str(bad / "empty.tar"), str(bad / "trunc.tar"),
                      str(bad / "missing.tar"), "pipe:false"])
    out = tmp_path / "out"
    proc = run_train("lora", flags_for("lora", tiny_teacher, spec, out, max_train_steps=4, checkpointing_steps=4), run_env)
    log = check_ok(proc)
    assert "Skipped samples by kind" in log
    skipped = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    kinds = {k.split("data/skipped_", 1)[1] for k in skipped if k.startswith("data/skipped_")}
    assert {"decode_error", "missing_caption"} <= kinds, kinds
    assert kinds & {"shard_error", "empty_shard"}, kinds
    # Each failing shard the run met is named once, with its reason (the counts alone do not say which).
    named = re.findall(r"shard (\S+) failed: ", log)
    assert named and len(named) == len(set(named)) and set(named) <= set(spec.split("::")[1:]), log[-3000:]
    assert "shard pipe:false failed: OSError: pipe: command 'false' exited with status 1" in log or "pipe:false" not in named


def test_all_bad_data_stops_in_bounded_time_naming_the_shards(tiny_teacher, run_env, tmp_path):
    bad = tmp_path / "junk.tar"
    bad.write_bytes(os.urandom(4096))
    t0 = time.time()
    proc = run_train("full", flags_for("full", tiny_teacher, f"{bad}::pipe:false", tmp_path / "out", data_failure_patience=20,
                                       dataloader_num_workers=2), run_env, timeout=180)
    assert proc.returncode != 0 and time.time() - t0 < 180
    last = proc.stdout.strip().splitlines()[-1]
    assert "error:" in last and "junk.tar" in last and "shard_error" in last, last
    assert "Traceback" not in proc.stdout


def test_nonfinite_steps_are_skipped_then_the_run_stops_keeping_the_last_good_checkpoint(tiny_teacher, tiny_shards, run_env, tmp_path):
    """An absurd learning rate makes the weights explode after one step: later steps are skipped, then a clear stop."""
    out = tmp_path / "out"
    proc = run_train("full", flags_for("full", tiny_teacher, tiny_shards, out, learning_rate=1e30, max_train_steps=20,
                                       checkpointing_steps=1, max_nonfinite_steps=3, adam_weight_decay=0.0), run_env)
    assert proc.returncode != 0
    last = proc.stdout.strip().splitlines()[-1]
    assert "error:" in last and "consecutive non-finite steps" in last and "checkpoint-" in last, last
    assert proc.stdout.count("step skipped") >= 3
    done = complete_checkpoints(out)
    assert done and max(done) < 20
    assert f"checkpoint-{max(done)}" in last


def test_failed_saves_keep_previous_checkpoints(tiny_teacher, tiny_shards, run_env, tmp_path):
    """Saves fail with ENOSPC from the third on (a real OSError inside the writer): older checkpoints stay intact."""
    out = tmp_path / "out"
    flags = flags_for("full", tiny_teacher, tiny_shards, out, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=None)
    code = (
        "import errno, sys, safetensors.torch as st\n"
        "real, n = st.save_file, [0]\n"
        "def failing(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] > 4: raise OSError(errno.ENOSPC, 'No space left on device')\n"  # 2 files per full checkpoint
        "    return real(*a, **k)\n"
        "st.save_file = failing\n"
        "from tcdistill.cli import train_main\n"
        "train_main('full', sys.argv[1:], prog='t')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *flags], cwd=ROOT, env=run_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert "No space left on device" in proc.stdout and "intact" in proc.stdout, proc.stdout[-2000:]
    # The final model's save fails too: one error line naming the newest checkpoint, not a traceback.
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    assert last.startswith("t: error:") and "final model" in last and "checkpoint-2" in last, last
    assert not (out / "unet").exists() and not [p for p in out.iterdir() if p.name.startswith(".unet")]  # none half-written
    done = complete_checkpoints(out)
    assert sorted(done) == [1, 2], done
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint-")]  # no staging leftovers
    from tcdistill.checkpoint import CheckpointIO

    assert CheckpointIO(out).load_latest().step == 2


@pytest.mark.slow
def test_pickle_weights_need_opt_in(tiny_teacher, tiny_shards, run_env, tmp_path):
    from diffusers import StableDiffusionPipeline

    pkl = tmp_path / "pkl_teacher"
    StableDiffusionPipeline.from_pretrained(tiny_teacher).save_pretrained(pkl, safe_serialization=False)
    # transformers 5 always writes safetensors; diffusers' UNet and VAE honour safe_serialization=False.
    assert list((pkl / "unet").glob("*.bin")) and not list((pkl / "unet").glob("*.safetensors"))
    out = tmp_path / "out"
    proc = run_train("full", flags_for("full", pkl, tiny_shards, out, max_train_steps=1), run_env)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode != 0 and "error:" in last and "--allow_pickle_weights" in last, last
    check_ok(run_train("full", flags_for("full", pkl, tiny_shards, out, max_train_steps=1, allow_pickle_weights=True), run_env))


def test_invalid_arguments_fail_before_loading(tiny_teacher, tiny_shards, run_env, tmp_path, capsys):
    """Each bad combination: non-zero exit, one `error:` line, no traceback, and nothing written. Flag and config
    errors are checked in-process through the script's own entry (`train_main`); those found after the accelerator
    starts (fp16 on CPU, shards that do not exist) through the script itself. (--w_min above --w_max and a resolution
    the VAE cannot take: test_train_e2e's one-line error cases.)"""
    from tcdistill.cli import train_main

    in_process = [dict(loss_type="l1"), dict(max_train_steps=None, max_train_samples=None), dict(validation_gamma=1.5),
                  dict(validation_inference_steps="2,60"), dict(train_batch_size=0), dict(ema_decay=1.5)]
    for i, case in enumerate(in_process):
        out = tmp_path / f"in{i}"
        with pytest.raises(SystemExit) as info:
            train_main("full", flags_for("full", tiny_teacher, tiny_shards, out, **case), prog=SCRIPTS["full"].name)
        text = f"{capsys.readouterr().err}{info.value.code if isinstance(info.value.code, str) else ''}"
        lines = [ln for ln in text.splitlines() if "error:" in ln]
        assert info.value.code not in (0, None) and len(lines) == 1 and "Traceback" not in text, (case, text[-1500:])
        assert lines[0].startswith(f"{SCRIPTS['full'].name}: error:") and not (out / "metrics.jsonl").exists(), (case, lines)
    for i, case in enumerate([dict(mixed_precision="fp16"), dict(train_shards_path_or_url=str(tmp_path / "none-{0..3}.tar"))]):
        out = tmp_path / f"out{i}"
        shards = case.pop("train_shards_path_or_url", tiny_shards)
        proc = run_train("full", flags_for("full", tiny_teacher, shards, out, **case), run_env, timeout=120)
        lines = [ln for ln in proc.stdout.splitlines() if "error:" in ln]
        assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stdout, (case, proc.stdout[-1500:])
        assert not (out / "metrics.jsonl").exists()


def test_second_run_on_a_busy_output_dir_is_refused_and_a_killed_runs_lock_is_gone(config_only_teacher, tiny_shards, run_env, tmp_path):
    """QA: two runs started on one --output_dir at once interleaved their checkpoints, and each run's save removed the
    other's staging folder as a stale leftover ("save failed"). The second run now stops in one line before loading
    anything; the lock dies with its holder (SIGKILL here), so a resume after a kill is not blocked."""
    from tcdistill import preflight

    out = tmp_path / "out"
    out.mkdir()
    with lock_holder(out, run_env) as holder:
        proc = run_train("full", flags_for("full", config_only_teacher, tiny_shards, out), run_env)
        assert proc.returncode != 0
        errors = [ln for ln in proc.stdout.splitlines() if "error:" in ln]
        assert len(errors) == 1 and "in use by another training run" in errors[0] and f"pid {holder.pid}" in errors[0], proc.stdout[-2000:]
        assert "Traceback" not in proc.stdout
        with pytest.raises(preflight.ConfigError, match="in use by another training run"):
            preflight.lock_output_dir(str(out))
    preflight.lock_output_dir(str(out))  # taken at once: no stale lock survives a SIGKILL
    os.close(preflight._held_locks.pop(os.path.realpath(out)))


@pytest.mark.slow
def test_damaged_checkpoints_stop_the_resume_in_one_line_naming_the_file(tiny_teacher, tiny_shards, run_env, tmp_path):
    """QA: resuming from a checkpoint whose optimizer.pt was overwritten ended with `error: Check the documentation of
    torch.load ...` (naming neither checkpoint nor file), and `latest` over checkpoints that were all cut short started
    a new run without a word, overwriting them."""
    out = tmp_path / "out"
    flags = flags_for("full", tiny_teacher, tiny_shards, out, max_train_steps=2, checkpointing_steps=1)
    check_ok(run_train("full", flags, run_env))
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)  # same size: the COMPLETE marker still matches
    proc = run_train("full", [*flags, "--max_train_steps=3", f"--resume_from_checkpoint={out / 'checkpoint-2'}"], run_env)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    assert "error:" in last and "checkpoint-2" in last and "optimizer.pt changed after the save" in last, last

    shutil.rmtree(out / "checkpoint-2")
    with open(out / "checkpoint-1" / "student.safetensors", "r+b") as f:
        f.truncate(100)  # cut short: no complete checkpoint is left
    metrics_before = (out / "metrics.jsonl").read_text()
    proc = run_train("full", [*flags, "--max_train_steps=3"], run_env)  # the seed flags' --resume_from_checkpoint=latest
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    assert "error:" in last and "checkpoint-1" in last and "student.safetensors" in last, last
    assert (out / "checkpoint-1" / "student.safetensors").stat().st_size == 100  # not overwritten by a new run
    assert (out / "metrics.jsonl").read_text() == metrics_before


@pytest.mark.slow
@pytest.mark.parametrize("variant,signum", [("full", signal.SIGTERM), ("lora", signal.SIGINT)])
def test_a_stop_signal_saves_a_checkpoint_and_stops_in_one_line(variant, signum, tiny_teacher, tiny_shards, run_env, tmp_path):
    """QA: SIGTERM (a SLURM preemption) ended the run at once, losing every step since the last periodic checkpoint (200
    in the seed commands), and Ctrl-C ended in a KeyboardInterrupt traceback. Now the step finishes, a checkpoint is saved,
    one line names it and the exit status is 128 + the signal. Ctrl-C signals the whole process group: the loader worker
    must not die of it and fail the step."""
    out = tmp_path / "out"
    flags = flags_for(variant, tiny_teacher, tiny_shards, out, max_train_steps=1000, checkpointing_steps=1000,
                      dataloader_num_workers=1)
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        # SIGINT as in a terminal: a shell's background job (pytest run with `&`) would pass it on ignored.
        proc = subprocess.Popen([sys.executable, str(SCRIPTS[variant]), *flags], cwd=ROOT, env=run_env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 180
        metrics_file = out / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None and (not metrics_file.exists() or metrics_file.read_text().count("\n") < 2):
            time.sleep(0.05)
        os.killpg(proc.pid, signum) if signum == signal.SIGINT else proc.send_signal(signum)
        proc.wait(timeout=120)
    output = log_path.read_text()
    last = output.strip().splitlines()[-1]
    assert proc.returncode == 128 + signum and "Traceback" not in output, output[-3000:]
    stopped = re.search(rf"error: stopped by {signal.Signals(signum).name} at step (\d+)", last)
    assert stopped, last
    step = int(stopped.group(1))
    assert step >= 2 and last.endswith(f"newest checkpoint: {out / f'checkpoint-{step}'} (--resume_from_checkpoint latest continues from it)")
    assert sorted(complete_checkpoints(out)) == [step] and max(metrics(out)) == step
    from tcdistill.preflight import LOCK_NAME

    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]  # no staging leftovers

    resumed = check_ok(run_train(variant, [*flags, f"--max_train_steps={step + 1}"], run_env))
    assert f"Resumed from {out / f'checkpoint-{step}'} at step {step}." in resumed
    assert sorted(metrics(out)) == list(range(1, step + 2))
