"""Faults a run meets mid-way and how its stop reads: non-finite weights (a damaged teacher, an exploded or damaged
checkpoint) named in the step guard's stop line, with the checkpoint worth resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_nonfinite_stop_names_the_damaged_weights_and_no_exploded_checkpoint_as_good(tiny_teacher, tiny_shards, tmp_path):
    """QA: --learning_rate 1e9 exploded the weights at step 1; the stop line called checkpoint-1 (those very weights) the
    "last good checkpoint" and advised lowering --learning_rate, yet the seed command's --resume_from_checkpoint latest
    resumed checkpoint-1 with its own learning rate and failed again. A teacher with an inf weight got the same learning
    rate advice. The line now names the non-finite weights and the checkpoint the failing steps started from."""
    from tcdistill.config import TrainConfig
    from tcdistill.stops import NonFiniteError
    from tcdistill.trainer import Trainer

    tr = Trainer(TrainConfig(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path), train_shards_path_or_url=tiny_shards,
                             resolution=32, max_train_steps=4, report_to="none", mixed_precision="no", max_nonfinite_steps=1))
    for step in (1, 2):
        tr.global_step = step
        tr.save_checkpoint()
    student_weight = next(p for n, p in tr.strategy.student.named_parameters() if n == "conv_out.weight")
    with torch.no_grad():
        student_weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as info:
        tr._finite_step(torch.tensor(float("nan")))
    message = str(info.value)
    assert "The trained student's weight 'conv_out.weight' holds non-finite values" in message, message
    assert f"checkpoint {tmp_path / 'checkpoint-2'} holds the weights these steps started from" in message, message
    assert f"an earlier one: {tmp_path / 'checkpoint-1'}" in message and "Last good" not in message, message
    assert "a resume keeps its checkpoint's learning rate" in message and "\n" not in message

    tr.nonfinite_streak = 0
    teacher_weight = next(p for n, p in tr.strategy.teacher_unet.named_parameters() if n.endswith("conv1.weight"))
    with torch.no_grad():
        teacher_weight.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"The teacher UNet's weight '.*conv1.weight' holds non-finite values.*"
                                             r"re-download --pretrained_teacher_model") as info:
        tr._finite_step(torch.tensor(float("nan")))
    assert "--learning_rate" not in str(info.value)


def test_the_nonfinite_stop_calls_good_only_a_checkpoint_that_steps_followed() -> None:
    from tcdistill.stops import first_nonfinite_weight, nonfinite_stop_message

    ckpts = [(s, Path(f"/o/checkpoint-{s}")) for s in (2, 4, 9)]  # 9: a newer one of an earlier run, resumed at 4
    assert "Last good checkpoint: /o/checkpoint-4." in nonfinite_stop_message(3, 7, 6, ckpts, None)
    assert "The checkpoint /o/checkpoint-4 holds the weights" in nonfinite_stop_message(3, 5, 4, ckpts, None)
    assert "(no earlier one is left)" in nonfinite_stop_message(3, 3, 2, ckpts, None)
    assert "No checkpoint saved before it." in nonfinite_stop_message(3, 1, 0, [], None)
    finite, bad = torch.zeros(2), torch.tensor([0.0, float("-inf")])
    assert first_nonfinite_weight([("a's", [("x", finite), ("i", torch.zeros(2, dtype=torch.long))])]) is None
    assert first_nonfinite_weight([("a's", [("x", finite)]), ("b's", [("y", bad)])]) == "b's weight 'y'"


def test_a_resume_with_another_teacher_or_batch_size_says_so(tiny_teacher, tiny_shards, tmp_path, caplog):
    """QA: resuming with another --pretrained_teacher_model (a full student distilled from teacher A then went on under
    teacher B), --train_batch_size or --gradient_accumulation_steps loaded the checkpoint without a word. One warning now
    lists the changed flags; a change of what may change on a resume (length, loader workers) says nothing."""
    import shutil

    from tcdistill.config import TrainConfig
    from tcdistill.trainer import Trainer

    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_teacher, other)
    kw = dict(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path / "out"), train_shards_path_or_url=tiny_shards,
              resolution=32, max_train_steps=1, report_to="none", mixed_precision="no", train_batch_size=2, seed=0)
    first = Trainer(TrainConfig(**kw))
    first.global_step = 1
    first.save_checkpoint()
    resume = dict(kw, resume_from_checkpoint="latest", max_train_steps=3)
    with caplog.at_level("WARNING", logger="tcdistill"):
        Trainer(TrainConfig(**dict(resume, dataloader_num_workers=2))).maybe_resume()
    assert "flags other than" not in caplog.text
    with caplog.at_level("WARNING", logger="tcdistill"):
        Trainer(TrainConfig(**dict(resume, pretrained_teacher_model=str(other), train_batch_size=4, gradient_accumulation_steps=2))).maybe_resume()
    warned = [r.getMessage() for r in caplog.records if "flags other than" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint-1" in warned[0], warned
    for part in (f"--pretrained_teacher_model {other} (checkpoint: {tiny_teacher})", "--train_batch_size 4 (checkpoint: 2)",
                 "--gradient_accumulation_steps 2 (checkpoint: 1)"):
        assert part in warned[0], warned[0]


def test_a_checkpoint_save_cut_short_by_a_file_size_limit_says_so(tmp_path):
    """QA: under `ulimit -f` (or a full disk) the optimizer state's torch.save failed with "[enforce fail at
    inline_container.cc:672] . unexpected pos 704 vs 598", which names no cause; the line now does."""
    import resource

    from tcdistill.checkpoint import CheckpointError, CheckpointIO

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # Python ignores SIGXFSZ: the write fails with EFBIG
    try:
        with pytest.raises(CheckpointError) as info:
            CheckpointIO(tmp_path).save(1, tensors={}, states={"optimizer": {"m": torch.zeros(100_000)}})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert "the disk is full or a file-size limit (ulimit -f) was hit" in message and "newest: none" in message, message
    assert "\n" not in message and not list(tmp_path.iterdir())


def test_a_relative_teacher_folder_saved_by_an_older_run_is_not_another_teacher(tmp_path, monkeypatch):
    """QA: a local teacher is now recorded absolute; a checkpoint (or cache) written before that holds the relative path,
    and resuming it from the same directory warned "--pretrained_teacher_model /abs/teacher (checkpoint: teacher)"."""
    from tcdistill.config import TrainConfig, local_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    cfg = TrainConfig(pretrained_teacher_model="teacher", output_dir="out", train_shards_path_or_url="a.tar", report_to="none",
                      max_train_steps=1)
    assert cfg.pretrained_teacher_model == str(tmp_path / "teacher")
    assert cfg.changed_since(dict(cfg.to_dict(), pretrained_teacher_model="teacher")) == []
    assert cfg.changed_since(dict(cfg.to_dict(), pretrained_teacher_model="other"))  # no such folder: another teacher
    assert local_model_path("teacher") == str(tmp_path / "teacher") and local_model_path("org/model") == "org/model"


def test_the_same_shards_spelt_relative_once_and_absolute_once_are_no_changed_flag(tmp_path, monkeypatch):
    """QA: resuming with --train_shards_path_or_url ./shards/{0..1}.tar (or its absolute path, or '::'-joined) where the
    checkpoint's run gave shards/{0..1}.tar warned that the flag changed: the shard files are the same. Other files, another
    order (another stream) and pipe: commands (compared as written) still count as changed."""
    from tcdistill.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="shards/{0..1}.tar", max_train_steps=1)
    for then in ("./shards/{0..1}.tar", f"{tmp_path}/shards/{{0..1}}.tar", "shards/0.tar::./shards/../shards/1.tar",
                 f"file:{tmp_path}/shards/{{0..1}}.tar"):
        assert cfg.changed_since(dict(cfg.to_dict(), train_shards_path_or_url=then)) == [], then
        assert cfg.changed_since(dict(cfg.to_dict(), train_latents_path_or_url=then)), then  # none given now: changed
    for then in ("shards/{0..2}.tar", "shards/{1,0}.tar", "other/{0..1}.tar"):
        assert cfg.changed_since(dict(cfg.to_dict(), train_shards_path_or_url=then)), then
    piped = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="pipe:cat shards/0.tar", max_train_steps=1)
    assert piped.changed_since(dict(piped.to_dict(), train_shards_path_or_url="pipe:cat ./shards/0.tar"))
    cached = TrainConfig(pretrained_teacher_model="t", train_latents_path_or_url="./c/{0..1}.tar", max_train_steps=1)
    assert cached.changed_since(dict(cached.to_dict(), train_latents_path_or_url=f"{tmp_path}/c/{{0..1}}.tar")) == []


def test_the_nonfinite_stop_names_vae_and_ema_target_weights_and_the_newest_earlier_checkpoint() -> None:
    """Mutation QA: a non-finite weight in the teacher's VAE or in the full variant's EMA target was not named by any
    test (dropping either group from weight_groups passed), nor was the choice of the newest of several earlier checkpoints,
    nor that a stop with no non-finite weight names none."""
    from types import SimpleNamespace

    from torch import nn

    from tcdistill.stops import first_nonfinite_weight, nonfinite_stop_message, weight_groups

    teacher, student, target, vae, text = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    for frozen in (teacher, target, vae, text):
        frozen.requires_grad_(False)
    strategy = SimpleNamespace(teacher_unet=teacher, student=student, target=target)
    family = SimpleNamespace(text_encoder=text, text_encoder_2=None, vae=vae)
    assert first_nonfinite_weight(weight_groups(strategy, family)) is None
    with torch.no_grad():
        target.bias[0] = float("inf")
        assert first_nonfinite_weight(weight_groups(strategy, family)) == "EMA target UNet's weight 'bias'"
        vae.weight[0, 0] = float("nan")  # the teacher's files come before the trained weights
        assert first_nonfinite_weight(weight_groups(strategy, family)) == "teacher vae's weight 'weight'"
    ckpts = [(s, Path(f"/o/checkpoint-{s}")) for s in (2, 4, 6)]
    message = nonfinite_stop_message(3, 7, 6, ckpts, None)  # no weight found non-finite: none named
    assert message.startswith("3 consecutive non-finite steps at step 7; stopping. The checkpoint /o/checkpoint-6 holds"), message
    assert "(an earlier one: /o/checkpoint-4)" in message


def test_changed_since_names_each_run_defining_flag_and_reads_an_older_checkpoints_config() -> None:
    """Mutation QA: only the teacher, batch size and accumulation were pinned; dropping the data, loss, TCD, EMA, seed or
    precision flags from config.RUN_DEFINING passed every test. A checkpoint config without a newer flag is no error."""
    from tcdistill.config import TrainConfig

    cfg = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="a.tar", max_train_steps=1)
    changes = dict(pretrained_teacher_model="t2", pretrained_vae_model_name_or_path="v", teacher_revision="r", revision="r",
                   train_shards_path_or_url="b.tar", train_latents_path_or_url="c.tar", resolution=256, interpolation_type="bicubic",
                   center_crop=not cfg.center_crop, random_flip=not cfg.random_flip, train_batch_size=3,
                   gradient_accumulation_steps=3, proportion_empty_prompts=0.5, seed=7, w_min=1.5, w_max=9.0, num_ddim_timesteps=25,
                   loss_type="huber", huber_c=0.5, timestep_scaling_factor=5.0, distill_mode="lcm", ema_decay=0.9, lora_alpha=3,
                   lora_dropout=0.1, lora_target_modules="to_q", mixed_precision="bf16", max_grad_norm=2.0,
                   use_fix_crop_and_size=not cfg.use_fix_crop_and_size, min_image_size=7, max_pwatermark=0.1)
    for flag, then in changes.items():
        assert then != getattr(cfg, flag), flag
        assert cfg.changed_since(dict(cfg.to_dict(), **{flag: then})) == [f"--{flag} {getattr(cfg, flag)} (checkpoint: {then})"], flag
    assert cfg.changed_since(dict(cfg.to_dict(), max_train_steps=9, dataloader_num_workers=4, learning_rate=1.0)) == []
    assert cfg.changed_since({"resolution": cfg.resolution}) == []  # the other keys missing: an older version's checkpoint


def test_a_resume_from_an_earlier_checkpoint_than_the_newest_says_latest_would_pick_the_newer_ones(tiny_teacher, tiny_shards, tmp_path, caplog):
    """QA: resumed with --resume_from_checkpoint checkpoint-1 (the earlier checkpoint a non-finite stop names) where
    checkpoint-2 exists, then stopped before step 2: the seed command's `latest` silently resumed the abandoned run's
    checkpoint-2. The resume now warns, naming it; `latest` and a resume from the newest say nothing."""
    from tcdistill.config import TrainConfig
    from tcdistill.trainer import Trainer

    kw = dict(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path), train_shards_path_or_url=tiny_shards,
              resolution=32, max_train_steps=4, report_to="none", mixed_precision="no")
    tr = Trainer(TrainConfig(**kw))
    for step in (1, 2):
        tr.global_step = step
        tr.save_checkpoint()
    for resume, warns in (("checkpoint-1", True), ("latest", False), (str(tmp_path / "checkpoint-2"), False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="tcdistill"):
            Trainer(TrainConfig(**kw, resume_from_checkpoint=resume)).maybe_resume()
        warned = [r.getMessage() for r in caplog.records if "newer checkpoints" in r.getMessage()]
        assert len(warned) == int(warns), (resume, caplog.text)
        if warns:
            assert f"(newest: {tmp_path / 'checkpoint-2'})" in warned[0] and "latest picks them" in warned[0], warned[0]
