"""End-to-end runs of the two seed scripts with the seed README's flags: outputs, checkpoints, logs, resume, errors."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import SCRIPTS, assert_plain_modes, check_ok, complete_checkpoints, event_files, read_scalars, run_train, seed_flags
from PIL import Image


def _assert_logged_every_step(out: Path, steps: list[int], files: set[Path] | None = None) -> None:
    """`loss` and `lr` are tensorboard scalars at exactly `steps`, all finite."""
    scalars = read_scalars(files if files is not None else event_files(out / "logs"))
    for tag in ("loss", "lr"):
        logged = scalars.get(tag, [])
        assert [s for s, _ in logged] == steps, (tag, logged)
        assert all(math.isfinite(v) for _, v in logged), (tag, logged)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dicts/lists (bitsandbytes nests its quantised optimizer state)."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for x in obj for t in _tensors(x)] if isinstance(obj, (list, tuple)) else []


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and min(im.size) >= 32, (im.format, im.size)


def test_full_seed_command(full_seed_run: dict[str, Any], tiny_teacher: Path) -> None:
    """README full-model command (accelerate launch, 2 workers, 8-bit Adam, xformers flag): every output is there."""
    from diffusers import UNet2DConditionModel

    out, log = full_seed_run["out"], full_seed_run["log"]
    assert log.count("xformers is unavailable") == 1  # warned once (not per UNet) and fell back to SDPA instead of crashing
    unets = {name: UNet2DConditionModel.from_pretrained(out / name) for name in ("unet", "unet_target")}
    for unet in unets.values():
        assert unet.config.time_cond_proj_dim == 256
    online, ema = (dict(u.named_parameters()) for u in unets.values())
    teacher = dict(UNet2DConditionModel.from_pretrained(tiny_teacher / "unet").named_parameters())
    # The student trained away from the teacher, and the EMA target lags it, so all three differ.
    assert any(not torch.equal(online[k], teacher[k]) for k in teacher)
    assert any(not torch.equal(online[k], ema[k]) for k in online)
    ckpts = complete_checkpoints(out)
    assert sorted(ckpts) == [2, 3]  # every --checkpointing_steps and at the end
    assert {"student.safetensors", "target.safetensors", "optimizer.pt", "rng_state_0.pt"} <= {p.name for p in ckpts[3].iterdir()}
    # --use_8bit_adam really ran bitsandbytes' 8-bit AdamW: its moment buffers are uint8.
    opt = torch.load(ckpts[3] / "optimizer.pt", weights_only=True)
    assert torch.uint8 in {t.dtype for t in _tensors(opt["state"])}
    for tag in ("online", "ema"):
        _assert_png(out / "validation" / f"{tag}-step000003.png")
    assert_plain_modes(out / "unet", out / "unet_target", ckpts[3])
    _assert_logged_every_step(out, [1, 2, 3])


def test_lora_seed_command(lora_seed_run: dict[str, Any]) -> None:
    """README LoRA command (python, 0 workers): diffusers-format LoRA file, checkpoints, validation, logs."""
    out, log = lora_seed_run["out"], lora_seed_run["log"]
    assert "xformers is unavailable" in log
    lora = safetensors.torch.load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and not any("base_model.model." in k for k in lora)  # reference defect 1
    assert all(k.startswith("unet.") for k in lora)
    ranks = {t.shape[0] for k, t in lora.items() if ".lora_A." in k}
    assert ranks == {4}
    assert not (out / "unet").exists()
    ckpts = complete_checkpoints(out)
    assert sorted(ckpts) == [2, 3]
    assert (ckpts[3] / "lora.safetensors").is_file()
    assert_plain_modes(out / "pytorch_lora_weights.safetensors", ckpts[3])
    _assert_png(out / "validation" / "lora-step000003.png")
    _assert_logged_every_step(out, [1, 2, 3])


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid where there is a GPU")
def test_fp16_on_cpu_is_one_line_error(config_only_teacher: Path, tiny_shards: str, run_env: dict[str, str], tmp_path: Path) -> None:
    """`--mixed_precision=fp16` on a CPU machine stops, before loading weights, with one line naming what works here."""
    out = tmp_path / "out"
    flags = seed_flags("full", teacher=config_only_teacher, shards=tiny_shards, output_dir=out, mixed_precision="fp16")
    proc = run_train("full", flags, run_env)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stdout.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in proc.stdout, proc.stdout[-2000:]
    assert errors[0].startswith("train_tcd_distill_sd_wds.py: error:"), errors[0]
    assert "fp16" in errors[0] and re.search(r"\bno\b|bf16", errors[0]), errors[0]
    assert not (out / "unet").exists() and not complete_checkpoints(out)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_resume_runs_only_the_remaining_steps(variant: str, request: pytest.FixtureRequest, run_env: dict[str, str], tmp_path: Path) -> None:
    """Run 3 steps (the seed run), then the same command with --max_train_steps 5: resumes at 3, runs 2 steps."""
    seed = request.getfixturevalue(f"{variant}_seed_run")
    out = tmp_path / "out"
    shutil.copytree(seed["out"], out)
    before = event_files(out / "logs")
    flags = [f.replace(str(seed["out"]), str(out)) for f in seed["flags"]]
    flags = [f for f in flags if not f.startswith("--max_train_steps=")] + ["--max_train_steps=5"]
    assert "--resume_from_checkpoint=latest" in flags
    log = check_ok(run_train(variant, flags, run_env))
    assert "Resumed from" in log and "checkpoint-3 at step 3" in log
    # Exactly two new optimizer steps were logged, numbered 4 and 5.
    _assert_logged_every_step(out, [4, 5], event_files(out / "logs") - before)
    ckpts = complete_checkpoints(out)
    assert max(ckpts) == 5 and sorted(ckpts) == [2, 3, 4, 5]
    for f in (seed["out"] / "checkpoint-3").iterdir():  # the checkpoint resumed from is left as it was
        assert (ckpts[3] / f.name).read_bytes() == f.read_bytes(), f.name
    name = "student" if variant == "full" else "lora"
    w3 = safetensors.torch.load_file(ckpts[3] / f"{name}.safetensors")
    w5 = safetensors.torch.load_file(ckpts[5] / f"{name}.safetensors")
    assert w3.keys() == w5.keys()
    assert any(not torch.equal(w3[k], w5[k]) for k in w3)


ONE_LINE_ERRORS = {
    "missing_teacher": ({"pretrained_teacher_model": None}, "--pretrained_teacher_model"),
    "w_min_above_w_max": ({"w_min": 9.0, "w_max": 4.0}, "--w_min"),
    "resolution_not_divisible_by_vae": ({"resolution": 33}, "--resolution 33"),
    "missing_shards": ({"train_shards_path_or_url": None}, "--train_shards_path_or_url"),
}
# The VAE-factor check needs the heavy imports (seconds); it is shared by both scripts, so it runs for one.
ERROR_CASES = [(v, c) for v in ("full", "lora") for c in ONE_LINE_ERRORS if not (v == "lora" and c.startswith("resolution"))]


@pytest.mark.parametrize("variant,case", ERROR_CASES, ids=[f"{v}-{c}" for v, c in ERROR_CASES])
def test_argument_errors_are_one_line(variant: str, case: str, config_only_teacher: Path, tiny_shards: str,
                                      run_env: dict[str, str], tmp_path: Path) -> None:
    """Bad flags exit non-zero with a single `error:` line, before any model loads (the teacher here has no weights)."""
    overrides, needle = ONE_LINE_ERRORS[case]
    out = tmp_path / "out"
    proc = run_train(variant, seed_flags(variant, teacher=config_only_teacher, shards=tiny_shards, output_dir=out, **overrides), run_env)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stdout.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stdout[-2000:]
    assert errors[0].startswith(f"{SCRIPTS[variant].name}: error:") and needle in errors[0], errors[0]
    # Loading any weights from the config-only teacher would have failed first, naming the missing files.
    assert "Traceback" not in proc.stdout and "safetensors" not in proc.stdout, proc.stdout[-2000:]
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_output_dir_is_a_config_error_before_loading(config_only_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """An --output_dir that cannot be made: a ConfigError (one line from the scripts, like every ConfigError above)
    before any weights load (the teacher here has none)."""
    from tcdistill.config import ConfigError, TrainConfig
    from tcdistill.trainer import Trainer

    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # an --output_dir below a regular file cannot be made, as on a read-only filesystem
    with pytest.raises(ConfigError, match="--output_dir .* is not writable"):
        Trainer(TrainConfig(pretrained_teacher_model=str(config_only_teacher), output_dir=str(blocker / "out"),
                            train_shards_path_or_url=tiny_shards, resolution=32, max_train_steps=1, report_to="none", mixed_precision="no"))


def test_missing_resume_path_is_refused_before_the_output_dir_is_made(config_only_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """QA: a --resume_from_checkpoint path that does not exist was refused in one line, but only after an empty
    --output_dir had been created: a typo in the path left a stray folder behind."""
    from tcdistill.checkpoint import CheckpointError
    from tcdistill.config import TrainConfig
    from tcdistill.trainer import Trainer

    out = tmp_path / "new_out"
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(TrainConfig(pretrained_teacher_model=str(config_only_teacher), output_dir=str(out), train_shards_path_or_url=tiny_shards,
                            resolution=32, max_train_steps=1, report_to="none", mixed_precision="no",
                            resume_from_checkpoint=str(tmp_path / "elsewhere" / "checkpoint-5")))
    assert not out.exists()


def _as_edm(conf: dict[str, Any]) -> None:
    for k in ("beta_schedule", "beta_start", "beta_end"):
        conf.pop(k, None)
    conf.update(_class_name="EDMEulerScheduler", sigma_min=0.002, sigma_max=80.0)


# case -> (the json file changed, how, the flags, the one-line error expected)
_TEACHER_REFUSALS: dict[str, tuple[str, Any, dict[str, Any], str]] = {
    # an epsilon teacher with rescale_betas_zero_snr on a grid reaching t=999 (alpha 0: x0 undefined) gave NaN losses
    # (silently skipped steps) and NaN validation/TCDScheduler samples
    "zero_snr_epsilon": ("scheduler/scheduler_config.json", lambda c: c.update(rescale_betas_zero_snr=True, prediction_type="epsilon"),
                         {}, "zero SNR at t=999"),
    # refused only after every weight had loaded
    "grid_finer_than_teacher": ("scheduler/scheduler_config.json", lambda c: c.update(num_train_timesteps=500),
                                {"num_ddim_timesteps": 600}, "exceeds the teacher scheduler's num_train_timesteps 500"),
    # an EDM scheduler has no betas: DDPMScheduler silently filled in its default linear ones
    "edm_scheduler": ("scheduler/scheduler_config.json", lambda c: _as_edm(c), {}, "defines no beta schedule"),
    # trained, then TCDScheduler (validation, the outputs' sampler) raised NotImplementedError
    "sigmoid_betas": ("scheduler/scheduler_config.json", lambda c: c.update(beta_schedule="sigmoid"), {}, "not usable by TCDScheduler"),
    # trained on 2000 timesteps (k = 40, t up to 1999) while TCDScheduler, which samples the outputs, took the file's
    # num_train_timesteps (1000: grid 19..999), silently; an unknown beta_schedule was a NotImplementedError traceback
    "trained_betas_length": ("scheduler/scheduler_config.json", lambda c: c.update(trained_betas=[0.001] * 2000, num_train_timesteps=1000),
                             {}, "has 2000 trained_betas but num_train_timesteps 1000"),
    # a ValueError traceback from NoiseSchedule after every weight had loaded
    "unknown_prediction_type": ("scheduler/scheduler_config.json", lambda c: c.update(prediction_type="flow_prediction"), {},
                                "prediction_type 'flow_prediction'.*epsilon, v_prediction or sample"),
    "unknown_beta_schedule": ("scheduler/scheduler_config.json", lambda c: c.update(beta_schedule="cosine"), {},
                              r"scheduler_config.json.*cosine is not implemented"),
    # "Asking to pad but the tokenizer does not have a padding token", a traceback in the first step
    "no_pad_token": ("tokenizer/tokenizer_config.json", lambda c: c.update(pad_token=None), {}, "no pad_token"),
    # "OverflowError: int too big to convert", a traceback in the first step
    "no_model_max_length": ("tokenizer/tokenizer_config.json", lambda c: c.pop("model_max_length"), {}, "sets no model_max_length"),
}


@pytest.mark.parametrize("case", list(_TEACHER_REFUSALS))
def test_teacher_config_refusals_come_before_loading(case: str, config_only_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """QA: teacher scheduler and tokenizer configs that training cannot use are one-line ConfigErrors from the configs
    alone (this teacher has no weights), not NaN steps, silent wrong betas or tracebacks after every weight loaded."""
    import json

    from tcdistill.config import ConfigError, TrainConfig
    from tcdistill.trainer import Trainer

    rel, edit, flags, needle = _TEACHER_REFUSALS[case]
    teacher = tmp_path / "teacher"
    shutil.copytree(config_only_teacher, teacher)
    conf = json.loads((teacher / rel).read_text())
    edit(conf)
    (teacher / rel).write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match=needle):
        Trainer(TrainConfig(pretrained_teacher_model=str(teacher), output_dir=str(tmp_path / "out"), train_shards_path_or_url=tiny_shards,
                            resolution=32, max_train_steps=1, report_to="none", mixed_precision="no", **flags))


def test_resume_refuses_another_variant_or_shape_in_one_error(lora_seed_run: dict[str, Any], tiny_teacher: Path, tiny_shards: str,
                                                              tmp_path: Path) -> None:
    """A LoRA run's checkpoints resumed by a full run, or by a LoRA run of another rank: a CheckpointError naming the
    checkpoint (the scripts print it as one line), not a KeyError or a multi-line size-mismatch dump."""
    from tcdistill.checkpoint import CheckpointError
    from tcdistill.config import TrainConfig
    from tcdistill.trainer import Trainer

    out = tmp_path / "out"
    shutil.copytree(lora_seed_run["out"], out)
    base = dict(pretrained_teacher_model=str(tiny_teacher), output_dir=str(out), train_shards_path_or_url=tiny_shards, resolution=32,
                max_train_steps=5, report_to="none", mixed_precision="no", resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match=r"checkpoint-3.*variant 'lora' run; this run trains variant 'full'"):
        Trainer(TrainConfig(**base, variant="full")).maybe_resume()
    with pytest.raises(CheckpointError, match=r"checkpoint-3.*does not match.*size mismatch") as info:
        Trainer(TrainConfig(**base, variant="lora", lora_rank=8)).maybe_resume()
    assert "\n" not in str(info.value)


def test_num_ddim_timesteps_above_the_teachers_schedule_is_a_config_error(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """A teacher trained with fewer timesteps (40) than --num_ddim_timesteps (50): a ConfigError (one line from the
    scripts), not ddim_grid's ValueError traceback."""
    import json

    from tcdistill.config import ConfigError, TrainConfig
    from tcdistill.trainer import Trainer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    sched = teacher / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "num_train_timesteps": 40}))
    with pytest.raises(ConfigError, match="--num_ddim_timesteps 50 exceeds the teacher scheduler's num_train_timesteps 40"):
        Trainer(TrainConfig(pretrained_teacher_model=str(teacher), train_shards_path_or_url=tiny_shards, output_dir=str(tmp_path / "out"),
                            resolution=32, max_train_steps=1, report_to="none", mixed_precision="no"))


def test_resume_is_checked_before_loading_and_past_max_steps_refused(lora_seed_run: dict[str, Any], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A --resume_from_checkpoint path that is no checkpoint: one CheckpointError before any weights load (it came after
    the whole teacher had loaded). A checkpoint past --max_train_steps: refused before training, and the previous run's
    tcdistill_config.json left as it was (the run used to log '-1 more steps' and rewrite the outputs)."""
    import tcdistill.trainer as trainer_mod
    from tcdistill.checkpoint import CheckpointError
    from tcdistill.config import parse_config

    out = tmp_path / "out"
    shutil.copytree(lora_seed_run["out"], out)
    flags = [f.replace(str(lora_seed_run["out"]), str(out)) for f in lora_seed_run["flags"]]
    flags = [f for f in flags if not f.startswith(("--max_train_steps=", "--resume_from_checkpoint="))] + ["--max_train_steps=2"]
    real_load = trainer_mod.load_family
    monkeypatch.setattr(trainer_mod, "load_family", lambda *a, **k: pytest.fail("weights loaded before the resume check"))
    with pytest.raises(CheckpointError, match=r"checkpoint-99.*does not exist"):
        trainer_mod.Trainer(parse_config([*flags, "--resume_from_checkpoint=checkpoint-99"], defaults={"variant": "lora"}))
    monkeypatch.setattr(trainer_mod, "load_family", real_load)
    record = (out / "tcdistill_config.json").read_bytes()
    tr = trainer_mod.Trainer(parse_config([*flags, "--resume_from_checkpoint=latest"], defaults={"variant": "lora"}))
    with pytest.raises(CheckpointError, match=r"at step 3, past --max_train_steps 2"):
        tr.train()
    assert (out / "tcdistill_config.json").read_bytes() == record


def test_fresh_run_over_an_earlier_runs_checkpoints_warns(lora_seed_run: dict[str, Any], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The same command without --resume_from_checkpoint in an output dir that holds another run's checkpoints: it
    starts over (as the reference), but says so; it used to say nothing while `latest` kept pointing at the old run."""
    import logging

    import tcdistill.trainer as trainer_mod
    from tcdistill.config import parse_config

    out = tmp_path / "out"
    shutil.copytree(lora_seed_run["out"], out)
    flags = [f.replace(str(lora_seed_run["out"]), str(out)) for f in lora_seed_run["flags"]]
    flags = [f for f in flags if not f.startswith("--resume_from_checkpoint=")]
    tr = trainer_mod.Trainer(parse_config(flags, defaults={"variant": "lora"}))
    with caplog.at_level(logging.WARNING, logger="tcdistill"):
        assert tr.maybe_resume() is None
    assert "checkpoints of an earlier run" in caplog.text and "checkpoint-3" in caplog.text
    caplog.clear()
    empty = tmp_path / "empty"
    tr = trainer_mod.Trainer(parse_config([f.replace(str(out), str(empty)) for f in flags], defaults={"variant": "lora"}))
    with caplog.at_level(logging.WARNING, logger="tcdistill"):
        assert tr.maybe_resume() is None
    assert "earlier run" not in caplog.text
