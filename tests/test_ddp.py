"""Two-process CPU DDP runs of both seed scripts through `accelerate launch --multi_gpu --num_processes 2`."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from conftest import ACCELERATE, QUICK_VALIDATION, SCRIPTS, check_ok, complete_checkpoints, event_files, lock_holder, read_scalars, run_train, seed_flags

pytestmark = pytest.mark.slow  # two-process launches: tens of seconds each on 2 cores

# Runs an entry script as __main__ after wrapping Trainer.train_step to log each rank's batches, so the test can
# see what data every rank trained on (nothing else changes: same script, flags and launcher).
BATCH_RECORDER = '''
import json, os, runpy, sys

import tcdistill.trainer as trainer_mod

_train_step = trainer_mod.Trainer.train_step


def train_step(self, batch):
    path = os.path.join(os.environ["TCD_BATCH_LOG_DIR"], f"rank{self.accelerator.process_index}.jsonl")
    loss, stats = _train_step(self, batch)
    with open(path, "a") as f:
        f.write(json.dumps({"step": self.global_step, "captions": list(batch["captions"]),
                            "pixel_sum": float(batch["pixel_values"].double().sum()), "loss": loss.item()}) + "\\n")
    return loss, stats


trainer_mod.Trainer.train_step = train_step
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
'''


# Runs an entry script as __main__ on data and noise that depend only on each sample's index in the run's global batch
# order (not on the process, batch size or accumulation that trains it), the VAE posterior's mean instead of a draw,
# and writes, per rank, how many DDP all-reduces each backward ran and the gradient the optimizer step gets.
SAME_GLOBAL_BATCH = '''
import json, os, runpy, sys
from dataclasses import fields

import torch
import tcdistill.trainer as trainer_mod
from tcdistill.models import scale_latents
from tcdistill.schedule import TimestepDraw
from tcdistill.tcd import TCDDraw

LOG, T = os.environ["TCD_GRAD_LOG_DIR"], trainer_mod.Trainer
_draw, _init, _train_step, _finite_step = trainer_mod.draw_tcd, T.__init__, T.train_step, T._finite_step
ids = []


def data_loader(self):
    acc, b, a = self.accelerator, self.cfg.train_batch_size, self.cfg.gradient_accumulation_steps
    n = self.global_step * a
    while True:  # micro-batch m of step s on rank r: the global batch's samples (m * world + r) * b ...
        (s, m), w = divmod(n, a), acc.num_processes
        batch = [s * w * b * a + (m * w + acc.process_index) * b + j for j in range(b)]
        gens = [torch.Generator().manual_seed(1000 + i) for i in batch]
        yield {"pixel_values": torch.stack([torch.rand(3, 32, 32, generator=g) * 2 - 1 for g in gens]),
               "captions": [f"shape number {i}" for i in batch], "ids": batch}
        n += 1


def draw_tcd(x0, grid, k, w_min, w_max, generator=None, mode="tcd"):
    rows = [_draw(x0[j:j + 1], grid, k, w_min, w_max, generator=torch.Generator().manual_seed(i), mode=mode) for j, i in enumerate(ids)]
    cat = lambda get: torch.cat([get(d) for d in rows])
    steps = TimestepDraw(*(cat(lambda d, f=f.name: getattr(d.steps, f)) for f in fields(TimestepDraw)))
    return TCDDraw(steps=steps, w=cat(lambda d: d.w), eps=cat(lambda d: d.eps))


def encode_latents(vae, pixels, batch_size, norm=None):
    return scale_latents(vae.encode(pixels).latent_dist.mode(), vae.config, norm)


def train_step(self, batch):
    ids[:] = batch["ids"]
    return _train_step(self, batch)


def __init__(self, cfg):
    _init(self, cfg)
    acc, calls = self.accelerator, [0]
    if acc.num_processes > 1:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)
        self.student.register_comm_hook(None, counting_hook)
    backward = acc.backward

    def logged_backward(loss, **kw):
        before = calls[0]
        backward(loss, **kw)
        with open(os.path.join(LOG, f"rank{acc.process_index}.jsonl"), "a") as f:
            f.write(json.dumps({"sync": acc.sync_gradients, "allreduces": calls[0] - before}) + "\\n")
    acc.backward = logged_backward


def finite_step(self, loss):
    grad = torch.cat([p.grad.flatten() for p in self.strategy.trainable_parameters()])
    torch.save(grad, os.path.join(LOG, f"grad_rank{self.accelerator.process_index}_step{self.global_step}.pt"))
    return _finite_step(self, loss)


T.__init__, T.data_loader, T.train_step, T._finite_step = __init__, data_loader, train_step, finite_step
trainer_mod.draw_tcd, trainer_mod.encode_latents = draw_tcd, encode_latents
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
'''


def _free_port() -> int:
    """A free TCP port for the rendezvous, so concurrent DDP runs on this machine do not collide on 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ddp(variant: str, out: Path, teacher: Path, shards: str, env: dict[str, str], recorder: Path | None = None,
             extra_env: dict[str, str] | None = None, **overrides: object) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 <script> <README flags>` for 2 steps
    (unless `overrides` say otherwise)."""
    short = dict(max_train_steps=2, checkpointing_steps=2, validation_steps=2, **QUICK_VALIDATION)
    flags = seed_flags(variant, teacher=teacher, shards=shards, output_dir=out, **{**short, **overrides})
    launcher = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    if recorder is not None:  # `<recorder> <script> <flags>`: the recorder runs the script as __main__
        flags = [str(SCRIPTS[variant]), *flags]
    return run_train(variant, flags, env, launcher=launcher, script=recorder, extra_env={"ACCELERATE_USE_CPU": "true", **(extra_env or {})})


def _launch(variant: str, out: Path, teacher: Path, shards: str, env: dict[str, str], recorder: Path | None = None,
            extra_env: dict[str, str] | None = None, **overrides: object) -> str:
    """`_run_ddp`, which must succeed; returns its output."""
    log = check_ok(_run_ddp(variant, out, teacher, shards, env, recorder, extra_env, **overrides))
    assert "2 process(es)" in log
    return log


def _check_ddp_checkpoint_and_logs(out: Path) -> None:
    ckpts = complete_checkpoints(out)
    assert sorted(ckpts) == [2]
    rng = [torch.load(ckpts[2] / f"rng_state_{r}.pt", weights_only=True) for r in (0, 1)]
    # set_seed(device_specific=True): each rank draws its own noise, so the saved RNG states differ.
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
    # Only the main process logs: one `loss` per optimizer step, not one per rank.
    scalars = read_scalars(event_files(out / "logs"))
    assert [s for s, _ in scalars["loss"]] == [1, 2]


def test_ddp_lora(tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str], tmp_path: Path) -> None:
    """LoRA seed script on 2 CPU processes: LoRA file, validation, a checkpoint with both ranks' RNG states. At the
    README's rank 64 the student runs most layers merged (W + s B A in the graph) through the DDP wrapper."""
    out = tmp_path / "out"
    log = _launch("lora", out, tiny_teacher, tiny_shards, run_env, lora_rank=64)
    merged = re.search(r"LoRA student: (\d+) of (\d+) adapted layers", log)
    assert merged and 0 < int(merged[1]) < int(merged[2]), log[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation" / "lora-step000002.png").is_file()
    _check_ddp_checkpoint_and_logs(out)


def test_ddp_full_ranks_see_different_data(tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str], tmp_path: Path) -> None:
    """Full seed script on 2 CPU processes: outputs and checkpoint, and the two ranks trained on different batches."""
    out, batches = tmp_path / "out", tmp_path / "batches"
    batches.mkdir()
    recorder = tmp_path / "record_batches.py"
    recorder.write_text(BATCH_RECORDER)
    _launch("full", out, tiny_teacher, tiny_shards, run_env, recorder=recorder, extra_env={"TCD_BATCH_LOG_DIR": str(batches)})
    for name in ("unet", "unet_target"):
        assert (out / name / "config.json").is_file()
    assert {p.name for p in (out / "validation").glob("*.png")} == {"online-step000002.png", "ema-step000002.png"}
    _check_ddp_checkpoint_and_logs(out)
    seen = {r: [json.loads(line) for line in (batches / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert [b["step"] for b in seen[0]] == [b["step"] for b in seen[1]] == [0, 1]
    assert all(len(b["captions"]) == 2 for r in (0, 1) for b in seen[r])  # --train_batch_size is per device
    # Each rank reads its own resampled shard stream: at every step the two ranks' batches differ.
    for b0, b1 in zip(seen[0], seen[1]):
        assert (b0["captions"], b0["pixel_sum"]) != (b1["captions"], b1["pixel_sum"]), (b0, b1)
    # The logged loss is the global batch's (the mean over ranks), not rank 0's share.
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([(b0["loss"] + b1["loss"]) / 2 for b0, b1 in zip(seen[0], seen[1])], rel=1e-5)


def test_ddp_run_on_a_busy_output_dir_stops_every_rank_in_one_line(config_only_teacher: Path, tiny_shards: str, run_env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """QA: only the main process takes the output dir's lock, so only it stopped on a busy one: rank 1 went on to load the
    teacher and crashed in DDP's first collective ("Connection closed by peer" traceback; a teacher it cannot load here).
    The refusal now reaches every rank, before any weights load."""
    out = tmp_path / "out"
    out.mkdir()
    with lock_holder(out, run_env) as holder:
        proc = _run_ddp("full", out, config_only_teacher, tiny_shards, run_env)
    # Both ranks' lines (which may interleave: two processes write to one pipe).
    refusal = f"error: --output_dir {str(out)!r} is in use by another training run (pid {holder.pid}"
    assert proc.returncode != 0 and proc.stdout.count(refusal) == 2, proc.stdout[-3000:]
    assert "[rank1]" not in proc.stdout and "cannot load the teacher" not in proc.stdout, proc.stdout[-3000:]


# What `accelerate config` writes for 2 processes on one machine in bf16, with "run on CPU only" answered yes.
BF16_CPU_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
mixed_precision: bf16
num_machines: 1
num_processes: 2
use_cpu: true
"""


def test_ddp_from_an_accelerate_config_file_in_bf16_on_cpu(config_only_teacher: Path, tiny_teacher: Path, tiny_shards: str,
                                                           run_env: dict[str, str], tmp_path: Path) -> None:
    """QA: launched from such a config file without a GPU, each process set itself up as a run of its own (accelerate does
    not pass use_cpu on to --multi_gpu processes): one took the output dir's lock, the other stopped with "in use by
    another training run (pid <its sibling>)". Every process now says what happened before anything loads; with
    ACCELERATE_USE_CPU=true the file's 2 processes train in its bf16."""
    config = tmp_path / "accelerate.yaml"
    config.write_text(BF16_CPU_CONFIG)
    launcher = [ACCELERATE, "launch", "--config_file", str(config), "--main_process_port", str(_free_port())]
    over = dict(mixed_precision=None, max_train_steps=2, checkpointing_steps=2, validation_steps=0, use_8bit_adam=None,
                gradient_checkpointing=None, enable_xformers_memory_efficient_attention=None)
    out = tmp_path / "out"
    flags = seed_flags("full", teacher=config_only_teacher, shards=tiny_shards, output_dir=out, **over)
    proc = run_train("full", flags, run_env, launcher=launcher)
    refusal = "error: launched as one of 2 processes (WORLD_SIZE=2), but accelerate set up a run of 1 process(es) here"
    # Before accelerate 1.13 the file's use_cpu reached the processes: they form one run of 2 and both reach the teacher.
    passed_on = Version(version("accelerate")) < Version("1.13")
    assert proc.returncode != 0 and proc.stdout.count(refusal) == (0 if passed_on else 2), proc.stdout[-3000:]
    assert "in use by another training run" not in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.count("cannot load the teacher") == (2 if passed_on else 0), proc.stdout[-3000:]

    launcher[-1] = str(_free_port())
    log = check_ok(run_train("lora", seed_flags("lora", teacher=tiny_teacher, shards=tiny_shards, output_dir=out, **over), run_env,
                             launcher=launcher, extra_env={"ACCELERATE_USE_CPU": "true"}))
    assert "2 process(es)" in log
    assert json.loads((out / "tcdistill_config.json").read_text())["mixed_precision"] == "bf16"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and sorted(complete_checkpoints(out)) == [2]


def test_a_bad_shard_only_rank_1_reads_stops_every_rank_in_one_line(tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """QA: rank 1 stopped with its one-line data error, and rank 0, whose gradient all-reduce it left, followed with a
    gloo traceback ("Connection closed by peer ... GLHF!") that read as the cause. Rank 0 now says, in one line, that
    another process ended."""
    shards = tmp_path / "shards"
    shards.mkdir()
    good = Path(tiny_shards.split("{")[0]) / "00000.tar"
    shutil.copy(good, shards / "00000.tar")
    (shards / "00001.tar").write_bytes(good.read_bytes()[:3000])  # each rank reads its own shard: rank 1 this one
    proc = _run_ddp("full", tmp_path / "out", tiny_teacher, f"{shards}/{{00000..00001}}.tar", run_env, validation_steps=0,
                    data_failure_patience=20)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert proc.stdout.count("error: rank 1 worker 0/1 (its share: 1 of the 2 shards): no usable sample in 20 consecutive failures") == 1, proc.stdout[-3000:]
    peer = ("error: process 0 stops: another process of this run ended (its own error names the cause), which broke the "
            "collective (Connection closed by peer")
    assert proc.stdout.count(peer) == 1, proc.stdout[-3000:]
    assert "[rank0]" not in proc.stdout and "[rank1]" not in proc.stdout, proc.stdout[-3000:]


def test_ddp_gradient_accumulation_syncs_once_and_matches_one_process_with_the_doubled_batch(
        tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str], tmp_path: Path) -> None:
    """2 processes x batch 1 x 2 accumulated micro-batches: the micro-batch before the boundary runs no all-reduce, and
    the step's gradient is, on both ranks, the one of 1 process x batch 2 x 2 micro-batches over the same samples."""
    harness = tmp_path / "same_global_batch.py"
    harness.write_text(SAME_GLOBAL_BATCH)
    logs = {n: tmp_path / f"grads{n}" for n in (1, 2)}
    for d in logs.values():
        d.mkdir()
    over = dict(max_train_steps=1, gradient_accumulation_steps=2, validation_steps=0, use_8bit_adam=None)
    _launch("full", tmp_path / "ddp", tiny_teacher, tiny_shards, run_env, recorder=harness,
            extra_env={"TCD_GRAD_LOG_DIR": str(logs[2])}, train_batch_size=1, **over)
    flags = seed_flags("full", teacher=tiny_teacher, shards=tiny_shards, output_dir=tmp_path / "one", train_batch_size=2, **over)
    check_ok(run_train("full", [str(SCRIPTS["full"]), *flags], run_env, script=harness, extra_env={"TCD_GRAD_LOG_DIR": str(logs[1])}))
    for r in (0, 1):
        backwards = [json.loads(line) for line in (logs[2] / f"rank{r}.jsonl").read_text().splitlines()]
        assert [b["sync"] for b in backwards] == [False, True] and backwards[0]["allreduces"] == 0 < backwards[1]["allreduces"], backwards
    grads = [torch.load(logs[2] / f"grad_rank{r}_step0.pt") for r in (0, 1)]
    assert torch.equal(grads[0], grads[1])
    one = torch.load(logs[1] / "grad_rank0_step0.pt")
    # Equal up to float rounding (the forwards run other batch shapes): 7.5e-6 measured.
    error = ((grads[0] - one).norm() / one.norm()).item()
    assert one.abs().max() > 0 and error < 1e-4, error


def test_ddp_non_finite_stop_warns_once_per_step_and_stops_every_rank(tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str],
                                                                      tmp_path: Path) -> None:
    """QA: with --learning_rate 1e9 on 2 processes every skipped step's warning came once per rank (the ranks decide
    together from one all-reduce, so the lines were twins). One line per skipped step now; every rank still stops."""
    proc = _run_ddp("full", tmp_path / "out", tiny_teacher, tiny_shards, run_env, max_train_steps=8, validation_steps=0,
                    learning_rate=1e9, max_nonfinite_steps=3)
    assert proc.returncode != 0, proc.stdout[-3000:]
    skipped = re.findall(r"step \d+: non-finite \w+; step skipped \((\d) in a row, limit 3\)", proc.stdout)
    assert skipped == ["1", "2", "3"], proc.stdout[-3000:]
    stop = "error: 3 consecutive non-finite steps at step "
    assert proc.stdout.count(stop) == 2, proc.stdout[-3000:]  # each rank's exit says why (one line each)
    assert "[rank0]" not in proc.stdout and "[rank1]" not in proc.stdout and "Connection closed" not in proc.stdout, proc.stdout[-3000:]


def test_ddp_resume_with_changed_flags_warns_once_and_both_ranks_go_on_from_the_step(tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str],
                                                                                      tmp_path: Path) -> None:
    """QA: resuming a 2-process run with another --dataloader_num_workers printed the 'starts fresh' warning once per
    rank (the changed-flags warning, once). Each warning comes once now, and both ranks train on from the saved step."""
    out, batches = tmp_path / "out", tmp_path / "batches"
    batches.mkdir()
    recorder = tmp_path / "record_batches.py"
    recorder.write_text(BATCH_RECORDER)
    _launch("full", out, tiny_teacher, tiny_shards, run_env, validation_steps=0, dataloader_num_workers=2)
    log = _launch("full", out, tiny_teacher, tiny_shards, run_env, recorder=recorder, extra_env={"TCD_BATCH_LOG_DIR": str(batches)},
                  validation_steps=0, max_train_steps=3, dataloader_num_workers=1, w_min=2, resume_from_checkpoint="latest")
    assert log.count("with flags other than the run that saved it: --w_min 2.0 (checkpoint: ") == 1, log[-3000:]
    assert log.count("The checkpoint's data stream was read by 2 loader worker(s), this run uses 1") == 1, log[-3000:]
    steps = {r: [json.loads(line)["step"] for line in (batches / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert steps == {0: [2], 1: [2]}, steps


def test_ddp_counts_every_ranks_skips_and_a_widened_worker_repeats_no_batch(tiny_teacher: Path, run_env: dict[str, str], tmp_path: Path) -> None:
    """QA, 2 processes x 2 loader workers on 4 shards, one truncated (rank 1's worker 0 reads it alone, then widens):
    the skips were counted on rank 1 only, so the logs, trackers and the final line said nothing of them; and the
    widened worker read the good shard in its sibling's order, so rank 1 trained each batch twice, a step apart."""
    from tcdistill.tiny import shard_pattern, write_tiny_shards

    shards, batches = tmp_path / "shards", tmp_path / "batches"
    write_tiny_shards(shards, n_shards=4, per_shard=8, image_size=32, seed=0)
    (shards / "00001.tar").write_bytes((shards / "00001.tar").read_bytes()[:3000])
    batches.mkdir()
    recorder = tmp_path / "record_batches.py"
    recorder.write_text(BATCH_RECORDER)
    out = tmp_path / "out"
    log = _launch("full", out, tiny_teacher, shard_pattern(shards, 4), run_env, recorder=recorder, extra_env={"TCD_BATCH_LOG_DIR": str(batches)},
                  max_train_steps=4, checkpointing_steps=4, validation_steps=0, dataloader_num_workers=2, data_failure_patience=20)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last.get("data/skipped_worker_share_widened") == 1 and last.get("data/skipped_shard_error", 0) >= 1, last
    assert "Skipped samples by kind: {" in log and "'worker_share_widened': 1" in log, log[-3000:]
    # rank 1 names the cut shard once (its loader workers ship it to the process, which logs whole lines); rank 0 never reads it
    assert log.count(f"rank 1: shard {shards / '00001.tar'} failed: ReadError: unexpected end of data") == 1, log[-3000:]
    assert "rank 0: shard " not in log, log[-3000:]
    seen = [json.loads(line)["captions"] for line in (batches / "rank1.jsonl").read_text().splitlines()]
    assert len(seen) == 4 and all(a != b for a, b in zip(seen, seen[1:])), seen
