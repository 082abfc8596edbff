"""Flags as a built Trainer applies them: a resume's optimizer settings, learning-rate schedulers, validation guidance
and seeds across ranks, the teacher's tokenizer read once, the reference's ignored flags, validation images and outputs."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tcdistill.config import ConfigError, TrainConfig


def test_resume_says_when_it_keeps_the_checkpoints_optimizer_settings(tiny_teacher: Path, tiny_shards: str, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """QA: a resumed run takes lr, betas, eps and weight decay from the checkpoint's optimizer state (the LR schedule its base
    LR): --learning_rate/--scale_lr/--adam_* of the resuming command were dropped silently. The same flags say nothing."""
    import logging

    from tcdistill.trainer import Trainer

    base = dict(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(tmp_path), resolution=32,
                train_batch_size=2, report_to="none", mixed_precision="no", validation_steps=0, variant="lora", lora_rank=2, seed=0)
    Trainer(TrainConfig(**base, max_train_steps=1, learning_rate=1e-3)).train()
    for flags, warned in ((dict(learning_rate=1e-3), False), (dict(learning_rate=1e-5, adam_weight_decay=0.5), True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tcdistill"):
            trainer = Trainer(TrainConfig(**base, max_train_steps=2, resume_from_checkpoint="latest", **flags))
            trainer.maybe_resume()
        said = [r.getMessage() for r in caplog.records if "optimizer settings" in r.getMessage()]
        assert trainer.global_step == 1 and trainer.optimizer.param_groups[0]["initial_lr"] == 1e-3
        assert bool(said) == warned, said
        if warned:
            assert "initial_lr 0.001 (flags: 1e-05)" in said[0] and "weight_decay 0.01 (flags: 0.5)" in said[0], said


@pytest.mark.parametrize("flags,needle", [
    # polynomial decays to 1e-7: a learning rate at or below it raised diffusers' ValueError traceback after the weights loaded
    (dict(learning_rate=1e-8), "--lr_scheduler polynomial with learning rate 1e-08: lr_end"),
    # QA: with the warmup as long as the run its decay divided by zero at the last step: a ZeroDivisionError traceback
    # after the whole run, before the outputs were saved (the run's length given, or from samples and epochs)
    (dict(lr_warmup_steps=2, max_train_steps=2), "--lr_scheduler polynomial with --lr_warmup_steps 2 leaves none of the run's 2 steps"),
    (dict(lr_warmup_steps=4, max_train_steps=None, max_train_samples=4, num_train_epochs=2, train_batch_size=2),
     "--lr_warmup_steps 4 leaves none of the run's 4 steps"),
])
def test_a_scheduler_that_fails_with_the_flags_is_a_config_error_before_weights_load(config_only_teacher: Path, tiny_shards: str,
                                                                                    tmp_path: Path, flags: dict, needle: str) -> None:
    from tcdistill.preflight import check_lr_schedule
    from tcdistill.trainer import Trainer

    base = dict(pretrained_teacher_model=str(config_only_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(tmp_path / "out"),
                resolution=32, max_train_steps=1, report_to="none", mixed_precision="no", lr_scheduler="polynomial")
    with pytest.raises(ConfigError, match=needle):  # a teacher without weight files: any load would fail otherwise
        Trainer(TrainConfig(**{**base, **flags}))
    assert not (tmp_path / "out").exists()
    for warmup in (0, 1, 3):  # shorter or longer warmups run the whole schedule
        check_lr_schedule("polynomial", 1e-4, warmup, 2)


def test_validation_guidance_outside_the_trained_w_range_is_warned(tiny_teacher: Path, tiny_shards: str, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A full run trained on w in [1, 3] validated at the default scale 8 (w = 7, never trained on) without a word."""
    from tcdistill.trainer import Trainer

    kw = dict(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, resolution=32, max_train_steps=1,
              report_to="none", mixed_precision="no", validation_steps=1, w_min=1.0, w_max=3.0)
    with caplog.at_level("WARNING", logger="tcdistill"):
        Trainer(TrainConfig(**kw, output_dir=str(tmp_path / "a")))
        assert "embeds w = 7, outside the trained range" in caplog.text
        caplog.clear()
        Trainer(TrainConfig(**kw, output_dir=str(tmp_path / "b"), validation_guidance_scale=3.0))
        assert "outside the trained range" not in caplog.text


def test_seed_range_counts_every_rank(tiny_teacher: Path, tiny_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank seeds with --seed + its rank (accelerate's device_specific seeding): on 2 processes the top seed is
    2**32 - 2, refused in one line before any weights load instead of failing on rank 1 only."""
    import accelerate

    import tcdistill.trainer as trainer_mod

    monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer_mod, "load_family", lambda *a, **k: pytest.fail("weights loaded before the seed check"))
    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(tmp_path / "o"),
                      resolution=32, max_train_steps=1, report_to="none", mixed_precision="no", seed=2**32 - 1)
    with pytest.raises(ConfigError, match=r"--seed must be in \[0, 4294967294\] with 2 processes"):
        trainer_mod.Trainer(cfg)


def test_start_up_reads_the_teachers_tokenizer_once(tiny_teacher: Path, tiny_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: the pre-load tokenizer check loaded the teacher's tokenizer(s), then the family load loaded them again
    (~0.6 s each for SD's 49k-token BPE on this VM, and hub requests for a hub id): the load now keeps the checked ones."""
    import tcdistill.families as families
    import tcdistill.trainer as trainer_mod

    loads: list[str] = []
    real = families.from_pretrained_checked

    def counting(cls, src, subfolder, *args, **kw):
        if cls.__name__.endswith(("Tokenizer", "TokenizerFast")):
            loads.append(subfolder)
        return real(cls, src, subfolder, *args, **kw)

    monkeypatch.setattr(families, "from_pretrained_checked", counting)
    tr = trainer_mod.Trainer(TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards,
                                         output_dir=str(tmp_path / "o"), resolution=32, max_train_steps=1, report_to="none",
                                         mixed_precision="no", validation_steps=0))
    assert loads == ["tokenizer"]
    assert tr.family.tokenizer.pad_token is not None


def test_flags_the_reference_ignored_reach_the_run(tiny_teacher: Path, tiny_shards: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference defect 2: --center_crop, --random_flip, --scale_lr, --cache_dir and --proportion_empty_prompts were
    parsed and ignored. The trainer loads the teacher through --cache_dir, scales the LR, and hands every data flag to
    the loader (test_data.py tests what the loader does with them)."""
    import dataclasses
    import shutil

    import huggingface_hub.constants

    import tcdistill.trainer as trainer_mod
    from tcdistill.data import DataConfig

    # A hub id that only the --cache_dir folder holds (hub cache layout); offline, so nothing is asked of the network.
    repo = tmp_path / "hub" / "models--tiny--teacher"
    shutil.copytree(tiny_teacher, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    # No `.no_exist` record of the tokenizer's absent config.json (an online run leaves one, snapshot_download does not):
    # offline, AutoTokenizer failed on such a cache; the tokenizer class model_index.json names loads from it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaders = []
    monkeypatch.setattr(trainer_mod, "build_train_dataloader", lambda dcfg: loaders.append(dcfg))
    cfg = TrainConfig(pretrained_teacher_model="tiny/teacher", cache_dir=str(tmp_path / "hub"), train_shards_path_or_url=tiny_shards,
                      output_dir=str(tmp_path / "out"), resolution=24, train_batch_size=3, gradient_accumulation_steps=2,
                      learning_rate=1e-4, scale_lr=True, center_crop=True, random_flip=True, proportion_empty_prompts=0.25,
                      interpolation_type="bicubic", min_image_size=8, max_pwatermark=0.5, dataloader_num_workers=1, seed=3,
                      max_train_steps=1, report_to="none", mixed_precision="no", validation_steps=0, variant="lora", lora_rank=2)
    tr = trainer_mod.Trainer(cfg)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 3 * 2)  # x batch x accumulation x processes (1)
    tr.data_loader()
    shared = {f.name for f in dataclasses.fields(DataConfig)} & {f.name for f in dataclasses.fields(TrainConfig)}
    assert {"center_crop", "random_flip", "proportion_empty_prompts", "interpolation_type"} <= shared
    assert {n: getattr(loaders[0], n) for n in shared} == {n: getattr(cfg, n) for n in shared}


def test_validation_images_reach_every_tracker_under_their_own_tags(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """Reference defect 8: its validation logged images to the first tracker only, and the full model's online and EMA
    images under one tensorboard tag (each overwrote the other)."""
    from accelerate.tracking import TensorBoardTracker
    from conftest import event_files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tcdistill.trainer import Trainer

    tr = Trainer(TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(tmp_path / "out"),
                             resolution=32, max_train_steps=1, report_to="none", mixed_precision="no", validation_prompts="a red circle",
                             validation_inference_steps="1"))
    tr.accelerator.trackers = [TensorBoardTracker("run", str(tmp_path / name)) for name in ("a", "b")]  # as --report_to all
    for tracker in tr.accelerator.trackers:
        getattr(tracker, "start", lambda: None)()  # accelerate < 1.8 starts a tracker in __init__, no start()
    tr.validate()
    for tracker in tr.accelerator.trackers:
        tracker.finish()
    for name in ("a", "b"):
        tags = set()
        for f in event_files(tmp_path / name):
            events = EventAccumulator(str(f), size_guidance={"images": 0})
            events.Reload()
            tags |= set(events.Tags()["images"])
        assert tags == {"validation/online", "validation/ema"}, (name, tags)


def test_validation_and_outputs_take_the_online_and_ema_students_and_the_lora_student_without_cfg(tiny_teacher: Path, tiny_shards: str,
                                                                                         tmp_path: Path) -> None:
    """The full run's `ema` images come from the EMA target (the deliverable), `online` from the trained student; the LoRA
    student (no w input: its guidance is distilled in) samples without CFG whatever --validation_guidance_scale says.
    The saved `unet_target` is the EMA, `unet` the online student."""
    from safetensors.torch import load_file

    from tcdistill.trainer import Trainer

    base = dict(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, resolution=32, max_train_steps=1,
                report_to="none", mixed_precision="no", validation_guidance_scale=5.0)
    full = Trainer(TrainConfig(output_dir=str(tmp_path / "full"), **base)).strategy
    views = [(tag, id(unet), gs) for tag, unet, gs in full.validation_unets()]
    assert views == [("online", id(full.student), 5.0), ("ema", id(full.target), 5.0)]
    with torch.no_grad():
        next(full.student.parameters()).add_(1.0)  # online and EMA weights differ, as after training
    online, ema = full.save_outputs(str(tmp_path / "saved"))
    for path, unet in ((online, full.student), (ema, full.target)):
        saved = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(saved[k], v) for k, v in unet.state_dict().items()), path
    lora = Trainer(TrainConfig(output_dir=str(tmp_path / "lora"), variant="lora", **base)).strategy
    assert [(tag, id(unet), gs) for tag, unet, gs in lora.validation_unets()] == [("lora", id(lora.student), 0.0)]


def test_logged_throughput_leaves_out_the_previous_steps_checkpoint_and_validation(tiny_teacher: Path, tiny_shards: str, tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: a step's samples_per_s (metrics.jsonl, the trackers, the progress bar) counted the checkpoint save and the
    validation of the step before it: at the seed command's settings step 201 showed step 200's save and 24 validation
    samples as a collapse of throughput. A clock that ticks 1 s a reading, and 1000 s in each validation and save, must
    give every step 2 samples in 1 s."""
    import json

    from tcdistill import trainer as trainer_module
    from tcdistill.trainer import Trainer

    clock = [0.0]

    def tick(seconds: float = 1.0) -> float:
        clock[0] += seconds
        return clock[0]

    monkeypatch.setattr(trainer_module, "time", type("Clock", (), {"perf_counter": staticmethod(tick)}))
    tr = Trainer(TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(tmp_path),
                             resolution=32, train_batch_size=2, max_train_steps=3, validation_steps=1, checkpointing_steps=1,
                             report_to="none", mixed_precision="no", seed=0))
    monkeypatch.setattr(tr, "validate", lambda: tick(1000.0))
    monkeypatch.setattr(tr, "_try_checkpoint", lambda: tick(1000.0))
    tr.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples_per_s"]) for r in rows] == [(1, 2.0), (2, 2.0), (3, 2.0)]


def test_tensorboard_shows_the_validation_grid_of_the_png(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """QA: tensorboard got the validation samples as a batch, which it tiles 8 to a row: 3 prompts x 2 step counts came
    out as one row of 6 (16 x 96 px) with no caption, so no one could tell which sample was which prompt or step count.
    It now gets the grid written to validation/<tag>-step<N>.png (rows = prompts, columns = step counts), pixel for pixel."""
    from accelerate.tracking import TensorBoardTracker
    from conftest import event_files
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tcdistill.trainer import Trainer

    tr = Trainer(TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(tmp_path / "out"),
                             resolution=16, max_train_steps=1, report_to="none", mixed_precision="no", variant="lora", lora_rank=2,
                             validation_prompts="a|b|c", validation_inference_steps="1,2"))
    tracker = TensorBoardTracker("run", str(tmp_path / "tb"))
    getattr(tracker, "start", lambda: None)()  # accelerate < 1.8 starts a tracker in __init__, no start()
    tr.accelerator.trackers = [tracker]
    tr.validate()
    tracker.finish()
    (f,) = event_files(tmp_path / "tb")
    events = EventAccumulator(str(f), size_guidance={"images": 0})
    events.Reload()
    (logged,) = events.Images("validation/lora")
    with Image.open(io.BytesIO(logged.encoded_image_string)) as im, Image.open(tmp_path / "out" / "validation" / "lora-step000000.png") as on_disk:
        assert (im.width, im.height) == (2 * 16, 3 * 16)
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(on_disk.convert("RGB")))


def test_a_tracker_log_folder_that_cannot_be_made_is_refused_before_the_teacher_loads(tiny_teacher: Path, tiny_shards: str,
                                                                                       tmp_path: Path) -> None:
    """QA: `--logging_dir` naming a file (or a folder below one, or on a read-only disk) loaded the teacher, wrote the run's
    record, then ended at the trackers' start in tensorboard's NotADirectoryError traceback. Refused in one line first,
    as --output_dir is; --report_to none writes no tracker logs, so it does not mind."""
    from tcdistill import trainer as trainer_module
    from tcdistill.trainer import Trainer

    (tmp_path / "taken").write_text("")
    base = dict(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(tmp_path / "out"),
                resolution=32, max_train_steps=1, mixed_precision="no", validation_steps=0)
    for logging_dir, why in ((tmp_path / "taken", "is a file, not a folder"), (tmp_path / "taken" / "tb", "is not writable: Not a directory")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainer_module, "load_family", lambda *a: pytest.fail("the teacher loaded before the refusal"))
            with pytest.raises(ConfigError, match=f"--logging_dir '{logging_dir}.*' {why}"):
                Trainer(TrainConfig(**base, report_to="tensorboard", logging_dir=str(logging_dir)))
    assert not (tmp_path / "out").exists()
    Trainer(TrainConfig(**base, report_to="none", logging_dir=str(tmp_path / "taken")))
