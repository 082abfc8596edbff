"""Reference flags: names, defaults and effects that the end-to-end tests do not reach (in-process, seconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import BASE, lock_holder

from tcdistill.config import ConfigError, TrainConfig, build_parser, parse_config
from tcdistill.families import flag_defaults


# The reference scripts' argparse defaults (rootonchair/consistency_models_distill tcd/*, i.e. diffusers' LCM scripts).
REFERENCE_DEFAULTS = dict(
    output_dir="lcm-xl-distilled", cache_dir=None, seed=None, logging_dir="logs", report_to="tensorboard",
    tracker_project_name="text2image-fine-tune", checkpointing_steps=500, checkpoints_total_limit=None, resume_from_checkpoint=None,
    push_to_hub=False, hub_token=None, hub_model_id=None, local_rank=-1, resolution=512, interpolation_type="bilinear",
    center_crop=False, random_flip=False, dataloader_num_workers=0, train_batch_size=16, max_train_samples=None,
    proportion_empty_prompts=0, num_train_epochs=100, max_train_steps=None, learning_rate=1e-4, scale_lr=False,
    lr_scheduler="constant", lr_warmup_steps=500, gradient_accumulation_steps=1, use_8bit_adam=False, adam_beta1=0.9,
    adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8, max_grad_norm=1.0, w_min=5.0, w_max=15.0,
    num_ddim_timesteps=50, loss_type="l2", huber_c=0.001, vae_encode_batch_size=32, unet_time_cond_proj_dim=256,
    timestep_scaling_factor=10.0, ema_decay=0.95, lora_rank=64, lora_alpha=64, lora_dropout=0.0, lora_target_modules=None,
    mixed_precision=None, allow_tf32=False, cast_teacher_unet=False, enable_xformers_memory_efficient_attention=False,
    gradient_checkpointing=False, validation_steps=200, pretrained_vae_model_name_or_path=None, teacher_revision=None,
    revision=None, use_fix_crop_and_size=False,
)


SDXL_REFERENCE = {"resolution": 1024, "w_min": 3.0, "vae_encode_batch_size": 8}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_reference_flag_names_and_defaults(family: str) -> None:
    parser = build_parser(defaults=flag_defaults(family))
    defaults = {a.dest: a.default for a in parser._actions}
    expected = {**REFERENCE_DEFAULTS, **(SDXL_REFERENCE if family == "sdxl" else {})}
    wrong = {k: (v, defaults.get(k, "<missing>")) for k, v in expected.items() if defaults.get(k, "<missing>") != v}
    assert not wrong, f"(reference, ours): {wrong}"
    # Reference defect 9: its --w_min/--w_max help claimed the Imagen CFG form; the code (and this one) uses LCM's.
    helps = {a.dest: a.help for a in parser._actions}
    assert "x0_c + w (x0_c - x0_u), i.e. CFG scale w + 1" in helps["w_min"] and "CFG scale w + 1" in helps["w_max"]


@pytest.mark.parametrize("interp", ["box", "hamming", "nearest_exact"])
def test_reference_interpolation_choices(interp: str) -> None:
    import random

    from tcdistill.data import DataConfig, _crop_resize

    cfg = TrainConfig(**BASE, interpolation_type=interp)  # accepted by the config ...
    img = Image.new("RGB", (40, 24), (200, 30, 30))
    pixels, _, _ = _crop_resize(img, DataConfig(train_shards_path_or_url="s.tar", resolution=16, interpolation_type=cfg.interpolation_type),
                                random.Random(0))  # ... and by the data pipeline
    assert pixels.shape == (3, 16, 16)


def test_timestep_scaling_factor_reaches_lcm_loss() -> None:
    from tcdistill.schedule import NoiseSchedule, scaled_linear_alphas_cumprod
    from tcdistill.tcd import TCDLoss

    sched = NoiseSchedule(scaled_linear_alphas_cumprod(), "epsilon")
    x, out, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([19, 39])
    maps = [TCDLoss(sched, mode="lcm", timestep_scaling=c).consistency_map(x, out, t, torch.zeros_like(t)) for c in (10.0, 1.0)]
    assert not torch.allclose(maps[0], maps[1])
    assert TrainConfig(**BASE, timestep_scaling_factor=2.0).timestep_scaling_factor == 2.0


def test_cast_teacher_unet_conflicts_with_fp32_teacher() -> None:
    TrainConfig(**BASE, cast_teacher_unet=True)
    with pytest.raises(ConfigError, match="cast_teacher_unet"):
        TrainConfig(**BASE, cast_teacher_unet=True, teacher_dtype="fp32")


def test_compile_scope_needs_compile_unet() -> None:
    TrainConfig(**BASE, compile_unet=True, compile_scope="blocks")
    with pytest.raises(ConfigError, match="--compile_scope blocks needs --compile_unet"):
        TrainConfig(**BASE, compile_scope="blocks")
    with pytest.raises(ConfigError, match="--compile_mode reduce-overhead needs --compile_unet"):  # was silently ignored
        TrainConfig(**BASE, compile_mode="reduce-overhead")


@pytest.mark.parametrize("script_variant,script_family,argv,use", [
    ("full", "sd", ["--variant", "lora"], "train_tcd_distill_lora_sd_wds.py"),  # trained and saved a LoRA
    ("lora", "sdxl", ["--model_family", "sd"], "train_tcd_distill_lora_sd_wds.py"),
])
def test_entry_scripts_refuse_another_variant_or_family(script_variant: str, script_family: str, argv: list, use: str) -> None:
    from tcdistill.cli import train_main

    flags = ["--pretrained_teacher_model=t", "--train_shards_path_or_url=s.tar", "--max_train_steps=1", *argv]
    with pytest.raises(SystemExit, match=f"contradict this entry point .*use {use}"):
        train_main(script_variant, flags, prog="x.py", family=script_family)


@pytest.mark.parametrize("variant,argv,refused", [
    ("full", ["--lora_rank=8"], "--lora_rank applies only to LoRA training"),  # trained a full model, silently
    ("full", ["--lora_r", "8", "--export_kohya"], "--export_kohya, --lora_rank apply only to LoRA training"),  # abbreviated too
    ("lora", ["--ema_decay=0.5", "--unet_time_cond_proj_dim=64"], "--ema_decay, --unet_time_cond_proj_dim apply only to full-model"),
    ("lora", ["--validation_guidance_scale=3"], "--validation_guidance_scale applies only to full-model"),
])
def test_flags_of_the_other_variant_are_refused(variant: str, argv: list, refused: str, capsys: pytest.CaptureFixture) -> None:
    """QA: the full-model scripts accepted and ignored the LoRA flags, the LoRA scripts the full model's (the reference
    scripts' parsers lack the other variant's flags); each variant's own flags, and both at their defaults, still pass."""
    from tcdistill.config import parse_config

    flags = ["--pretrained_teacher_model=t", "--train_shards_path_or_url=s.tar", "--max_train_steps=1"]
    with pytest.raises(SystemExit):
        parse_config([*flags, *argv], defaults={"variant": variant}, prog="x.py")
    assert f"x.py: error: {refused}" in capsys.readouterr().err
    assert parse_config([*flags, "--lora_rank=8", "--lora_alpha=4", "--export_kohya"], defaults={"variant": "lora"}).lora_rank == 8
    assert parse_config([*flags, "--ema_decay=0.5", "--unet_time_cond_proj_dim=64"], defaults={"variant": "full"}).ema_decay == 0.5


@pytest.mark.parametrize("variant,own,other", [("full", "--ema_decay", "--lora_rank"), ("lora", "--lora_rank", "--ema_decay")])
def test_help_lists_only_this_variants_flags(variant: str, own: str, other: str) -> None:
    """QA: each script's --help listed the other variant's flags with their defaults (`--lora_rank ... (default: 64)` in
    the full-model script's), which the script then refuses."""
    text = build_parser(defaults={"variant": variant}).format_help()
    assert f"{own} " in text and f"{other} " not in text and f"{other}=" not in text
    assert "--lora_rank " in build_parser().format_help()  # no variant given (the reference-default check): every flag


@pytest.mark.parametrize("flag", ["lora_skip_input_cast", "lora_merged_student", "lora_merged_target"])
def test_lora_only_switches_are_the_lora_scripts_own(flag: str, capsys: pytest.CaptureFixture) -> None:
    """QA: the full-model scripts' --help still listed three LoRA-only switches (and their --no_ forms), and took them
    silently, changing nothing; the LoRA scripts keep them."""
    assert f"--{flag} " not in build_parser(defaults={"variant": "full"}).format_help()
    assert f"--no_{flag}" not in build_parser(defaults={"variant": "full"}).format_help()
    assert f"--no_{flag}" in build_parser(defaults={"variant": "lora"}).format_help()
    flags = ["--pretrained_teacher_model=t", "--train_shards_path_or_url=s", "--max_train_steps=1"]
    assert getattr(parse_config([*flags, f"--no_{flag}"], defaults={"variant": "lora"}), flag) is False
    with pytest.raises(SystemExit):
        parse_config([*flags, f"--no_{flag}"], defaults={"variant": "full"})
    assert f"--{flag} applies only to LoRA training" in capsys.readouterr().err


def test_sdxl_only_flag_is_refused_for_an_sd_teacher(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: the SD scripts (and `tcdistill cache` for an SD teacher) accepted --use_fix_crop_and_size and ignored it (SD UNets
    take no size/crop micro-conditioning; the reference SD scripts lack the flag); the SDXL scripts keep it."""
    from tcdistill.cache import main as cache_main
    from tcdistill.cli import train_main

    flags = ["--pretrained_teacher_model=t", "--train_shards_path_or_url=s.tar", "--max_train_steps=1", "--use_fix_crop_and_size"]
    with pytest.raises(SystemExit):
        train_main("full", flags, prog="x.py", family="sd")
    assert "x.py: error: --use_fix_crop_and_size applies only to SDXL teachers" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--use_fix_crop_and_size applies only to SDXL teachers"):
        cache_main(["--pretrained_teacher_model=t", "--train_shards_path_or_url=s.tar", f"--output_dir={tmp_path}", "--use_fix_crop_and_size"])
    assert TrainConfig(**BASE, model_family="sdxl", use_fix_crop_and_size=True).use_fix_crop_and_size


@pytest.mark.parametrize("tracker", ["wandb", "comet_ml"])
def test_report_to_missing_tracker_is_one_line(tracker: str, fresh_accelerator_state: None) -> None:
    """QA: the error line came after accelerate's own two-line UserWarning about the missing tracker (the Accelerator was
    made first); the check now runs before it, and nothing else is printed."""
    import warnings

    from tcdistill.trainer import Trainer

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ConfigError, match=f"--report_to {tracker} needs"):
        warnings.simplefilter("always")
        Trainer(TrainConfig(**BASE, report_to=tracker))
    assert not [w for w in caught if "tracker" in str(w.message)], [str(w.message) for w in caught]


def test_push_to_hub_fails_before_weights_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    from tcdistill.preflight import create_hub_repo

    def offline(**kw):
        raise OSError("Cannot reach https://huggingface.co/api/repos/create: offline\nsecond line")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    with pytest.raises(ConfigError, match=r"--push_to_hub: cannot create the hub repo 'me/x' \(OSError: Cannot reach") as info:
        create_hub_repo(TrainConfig(**BASE, output_dir=str(tmp_path), push_to_hub=True, hub_model_id="me/x"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"hub repo 'run-7'"):  # no --hub_model_id: the output folder's name, as the reference
        create_hub_repo(TrainConfig(**BASE, output_dir=str(tmp_path / "run-7"), push_to_hub=True))


def test_a_push_that_cannot_reach_the_hub_leaves_no_output_dir(tiny_teacher: Path, tiny_shards: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch, fresh_accelerator_state: None) -> None:
    """QA: `--push_to_hub` offline stopped with its one line but left --output_dir made, holding only .tcdistill.lock."""
    import huggingface_hub

    from tcdistill.trainer import Trainer

    def offline(**kw):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--push_to_hub: cannot create the hub repo"):
        Trainer(TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(out),
                            max_train_steps=1, report_to="none", mixed_precision="no", push_to_hub=True, hub_model_id="me/x"))
    assert not out.exists()


def test_a_refused_output_dir_creates_no_hub_repo(config_only_teacher: Path, tiny_shards: str, tmp_path: Path, run_env: dict[str, str],
                                                monkeypatch: pytest.MonkeyPatch, fresh_accelerator_state: None) -> None:
    """QA: `--push_to_hub` created the hub repo before --output_dir's checks: an output dir that is a file, lies below a
    file, or is held by another run was refused only after an empty hub repo had been made. Each refusal comes first now
    (and makes no folder); the repo is still created before the folder is made (an offline hub leaves no folder)."""
    import huggingface_hub

    from tcdistill.trainer import Trainer

    created: list[dict] = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda **kw: created.append(kw) or huggingface_hub.RepoUrl("https://huggingface.co/me/x"))
    (tmp_path / "afile").write_text("x")
    held = tmp_path / "held"
    held.mkdir()

    def train(out: Path | str) -> None:
        Trainer(TrainConfig(pretrained_teacher_model=str(config_only_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(out),
                            max_train_steps=1, report_to="none", mixed_precision="no", push_to_hub=True, hub_model_id="me/x"))

    monkeypatch.chdir(tmp_path)
    # "": the make=False probe passed (it probed the folder above), makedirs("") failed after the repo was made.
    for out, needle in ((tmp_path / "afile", "is a file, not a folder"), (tmp_path / "afile" / "out", "is not writable: Not a directory"),
                        ("", "--output_dir is empty")):
        with pytest.raises(ConfigError, match=needle):
            train(out)
    with lock_holder(held, run_env), pytest.raises(ConfigError, match="is in use by another training run"):
        train(held)
    assert created == [] and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "held"]


def test_push_to_hub_repo_is_named_after_the_output_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without --hub_model_id the repo takes the output folder's name, as the reference's: `--output_dir .` names the
    current folder (Path(".").name is ""), and a root output dir, which names none, is refused up front."""
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(**{**BASE, "output_dir": "."}, push_to_hub=True).hub_repo_name == tmp_path.name
    assert TrainConfig(**{**BASE, "output_dir": "runs/sd-tcd/"}, push_to_hub=True).hub_repo_name == "sd-tcd"
    assert TrainConfig(**{**BASE, "output_dir": "/"}, push_to_hub=True, hub_model_id="me/x").hub_repo_name == "me/x"
    with pytest.raises(ConfigError, match="--push_to_hub needs --hub_model_id"):
        TrainConfig(**{**BASE, "output_dir": "/"}, push_to_hub=True)


def test_vae_config_check_uses_the_vae_load_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    """--pretrained_vae_model_name_or_path loads with revision None: the early config check must not ask its repo for
    --teacher_revision (which exists only in the teacher's repo)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tcdistill import teacher_checks
    from tcdistill.teacher_checks import check_teacher_config

    seen = []
    monkeypatch.setattr(UNet2DConditionModel, "load_config", classmethod(lambda cls, src, **kw: {}))  # no hub look-up for "t"
    monkeypatch.setattr(AutoencoderKL, "load_config", classmethod(lambda cls, src, **kw: seen.append((src, kw["revision"])) or {}))
    # Not the tokenizer check: it would ask the hub for "t" (~45 s of retries per call offline); tested on its own.
    monkeypatch.setattr(teacher_checks, "check_teacher_tokenizers", lambda cfg: None)
    check_teacher_config(TrainConfig(**BASE, resolution=64, teacher_revision="v2", pretrained_vae_model_name_or_path="org/vae"))
    check_teacher_config(TrainConfig(**BASE, resolution=64, teacher_revision="v2"))
    assert seen == [("org/vae", None), ("t", "v2")]


def test_revision_student_loads_safetensors_only(tmp_path: Path) -> None:
    """--revision loads the full student from another revision: pickle weights only with --allow_pickle_weights."""
    from conftest import small_unet

    from tcdistill.strategy import FullStrategy

    unet = small_unet()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)  # .bin only
    family = type("F", (), {"unet": small_unet()})()
    cfg = dict(BASE, pretrained_teacher_model=str(tmp_path), revision="other", unet_time_cond_proj_dim=8)
    with pytest.raises(ConfigError, match="--revision 'other'.*allow_pickle_weights"):
        FullStrategy(TrainConfig(**cfg), family, torch.float32)
    FullStrategy(TrainConfig(**cfg, allow_pickle_weights=True), family, torch.float32)


def test_lora_revision_other_than_the_teachers_is_refused() -> None:
    """A LoRA adapts the teacher's own UNet (--teacher_revision); --revision (the full student's start) would be ignored."""
    TrainConfig(**BASE, variant="lora", revision="v2", teacher_revision="v2")
    TrainConfig(**BASE, variant="full", revision="v2")
    with pytest.raises(ConfigError, match="--revision"):
        TrainConfig(**BASE, variant="lora", revision="v2")


@pytest.mark.parametrize("bad,needle", [
    (dict(unet_time_cond_proj_dim=3), "--unet_time_cond_proj_dim must be >= 4"),  # was a ZeroDivisionError in the step
    (dict(validation_steps=1, validation_inference_steps=""), "--validation_inference_steps lists no step counts"),  # IndexError at validation
    (dict(lora_target_modules=","), "--lora_target_modules lists no module names"),  # peft traceback after loading
])
def test_flag_values_that_crashed_mid_run_are_config_errors(bad: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**{**BASE, **bad})
    TrainConfig(**BASE, unet_time_cond_proj_dim=4, validation_steps=0, validation_inference_steps="")


@pytest.mark.parametrize("bad,needle", [
    (dict(w_min=9.0, w_max=4.0), r"--w_min \(9.0\) must be <= --w_max"),
    (dict(w_min=-1.0), "--w_min must be >= 0"),
    (dict(w_max=float("inf")), "--w_min/--w_max must be finite"),
    (dict(ema_decay=1.5), r"--ema_decay must be in \[0, 1\]"),
    (dict(checkpoints_total_limit=0), "--checkpoints_total_limit must be >= 1"),
    (dict(max_train_steps=None), "the shard stream is endless"),
    (dict(variant="lora", teacher_dtype="fp32"), "--teacher_dtype fp32 with LoRA needs --lora_separate_teacher"),
    (dict(gradient_checkpointing_policy="selective"), "selective needs --gradient_checkpointing"),
    (dict(data_timeout=-1.0), "--data_timeout must be >= 0"),
    (dict(max_pwatermark=1.5), r"--max_pwatermark must be in \[0, 1\]"),
    (dict(lora_dropout=1.0), r"--lora_dropout must be in \[0, 1\)"),
    (dict(report_to="mlflow"), "--report_to: unknown tracker 'mlflow'"),
    (dict(validation_inference_steps="2,51"), r"--validation_inference_steps: 51 not in \[1, 50\]"),
    (dict(max_nonfinite_steps=0), "--max_nonfinite_steps must be >= 1"),
    (dict(train_batch_size=0), "--train_batch_size must be >= 1"),
    # QA: 1000 MemoryErrors in the loader after the teacher loaded, then "no usable sample (transform_error)".
    (dict(resolution=100_000), "--resolution 100000 is above 9459: a 100000 x 100000 image is over PIL's decompression-bomb limit"),
    (dict(resolution=9464), "--resolution 9464 is above 9459"),
    # QA: inf passed `> 0` (10 non-finite steps, then "lower --learning_rate"; an inf epsilon trained nothing, silently),
    # and torch refused a negative/nan weight decay with a traceback after the weights had loaded.
    (dict(learning_rate=float("inf")), "--learning_rate must be finite and > 0, got inf"),
    (dict(huber_c=float("inf")), "--huber_c must be finite and > 0, got inf"),
    (dict(timestep_scaling_factor=float("inf")), "--timestep_scaling_factor must be finite and > 0"),
    (dict(adam_epsilon=float("inf")), "--adam_epsilon finite and > 0"),
    (dict(adam_weight_decay=-0.01), "--adam_weight_decay must be finite and >= 0, got -0.01"),
    (dict(adam_weight_decay=float("nan")), "--adam_weight_decay must be finite and >= 0, got nan"),
    (dict(validation_guidance_scale=float("nan")), "--validation_guidance_scale must be finite, got nan"),
])
def test_flag_values_out_of_range_are_config_errors(bad: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**{**BASE, **bad})


def test_the_range_checks_take_their_bounds() -> None:
    TrainConfig(**BASE, w_min=0.0, w_max=0.0, ema_decay=1.0, checkpoints_total_limit=1, data_timeout=0.0, max_pwatermark=1.0,
                lora_dropout=0.0, validation_inference_steps="1,50", max_nonfinite_steps=1, train_batch_size=1, adam_weight_decay=0.0,
                validation_guidance_scale=-2.0, resolution=9456)
    TrainConfig(**{**BASE, "max_train_steps": None}, max_train_samples=8)
    TrainConfig(**BASE, variant="lora", teacher_dtype="fp32", lora_separate_teacher=True)


def test_parser_reads_booleans_negations_and_percent_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    from tcdistill.config import parse_config

    monkeypatch.setenv("LOCAL_RANK", "3")
    argv = ["--pretrained_teacher_model=t", "--max_train_steps=1", "--train_shards_path_or_url=s-%03d.tar",
            "--center_crop=yes", "--random_flip", "on", "--no_batched_teacher", "--push_to_hub=off"]
    cfg = parse_config(argv)
    assert (cfg.center_crop, cfg.random_flip, cfg.batched_teacher, cfg.push_to_hub, cfg.local_rank) == (True, True, False, False, 3)
    # argparse %-formats help text: a default with a literal % (a shard url) must not break --help.
    assert "s-%03d.tar" in build_parser(defaults={"train_shards_path_or_url": "s-%03d.tar"}).format_help()


def test_teacher_of_the_other_family_is_refused_before_loading(tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An SD teacher in an SDXL script (a tokenizer_2 load error) or an SDXL teacher in an SD script (a TypeError
    traceback in the first teacher forward): one ConfigError from the UNet config, before any weights load."""
    from diffusers import UNet2DConditionModel

    from tcdistill.teacher_checks import check_teacher_config

    base = dict(BASE, pretrained_teacher_model=str(tiny_teacher), resolution=32)
    check_teacher_config(TrainConfig(**base))
    with pytest.raises(ConfigError, match=r"is an SD model .* --model_family is 'sdxl'"):
        check_teacher_config(TrainConfig(**base, model_family="sdxl"))
    monkeypatch.setattr(UNet2DConditionModel, "load_config", classmethod(lambda cls, src, **kw: {"addition_embed_type": "text_time"}))
    with pytest.raises(ConfigError, match=r"is an SDXL model .* train_tcd_distill_sdxl_wds.py"):
        check_teacher_config(TrainConfig(**base))


def test_tilde_in_path_flags_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--output_dir=~/run` reaches the script unexpanded (bash expands `~` only at a word's start): it wrote to a
    folder literally named `~` in the working directory, while `~` in the shard urls was already expanded."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = build_parser().parse_args(["--pretrained_teacher_model=~/teacher", "--train_shards_path_or_url=s.tar",
                                     "--output_dir=~/run", "--resume_from_checkpoint=~/run/checkpoint-2", "--max_train_steps=1"])
    cfg = TrainConfig(**vars(cfg))
    assert cfg.output_dir == str(tmp_path / "run") and cfg.pretrained_teacher_model == str(tmp_path / "teacher")
    assert cfg.resume_from_checkpoint == str(tmp_path / "run" / "checkpoint-2")
    assert TrainConfig(**BASE, output_dir="out~", resume_from_checkpoint="latest").output_dir == "out~"


def test_an_empty_resume_from_checkpoint_is_no_resume() -> None:
    """QA: `--resume_from_checkpoint=$RESUME` with RESUME unset was the path '.' ("cannot resume from '.'"); the reference's
    truthiness test, and the other empty optional flags here (--pretrained_vae_model_name_or_path=, --cache_dir=), read it
    as not given."""
    assert parse_config([*(f"--{k}={v}" for k, v in BASE.items()), "--resume_from_checkpoint="]).resume_from_checkpoint is None


def test_output_dir_that_is_a_file_says_so(tmp_path: Path) -> None:
    """QA: an existing file as --output_dir was refused as "is not writable: File exists"."""
    from tcdistill.preflight import check_output_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_dir(str(tmp_path / "f"))
    check_output_dir(str(tmp_path / "new" / "dir"))


def test_an_empty_command_line_first_asks_for_the_teacher(capsys: pytest.CaptureFixture) -> None:
    """Mutation testing: TrainConfig.validate's grouped checks run in a fixed order (the first failing one is reported),
    and nothing pinned it: with the training checks first, a bare `python train_....py` asked for --max_train_steps
    before the teacher and the data."""
    from tcdistill.config import parse_config

    with pytest.raises(SystemExit):
        parse_config([])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pretrained_teacher_model is required" in err[0], err
    with pytest.raises(ConfigError, match="^--train_shards_path_or_url is required"):
        TrainConfig(pretrained_teacher_model="t")


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64 - 1])
def test_out_of_range_seed_is_one_line_at_parse_time(seed: int, capsys: pytest.CaptureFixture) -> None:
    """QA: --seed -1 or 2**64-1 passed the parser and failed at set_seed with numpy's traceback ("Seed must be between
    0 and 2**32 - 1"): accelerate seeds numpy's generator with it. Refused at parse time now; the ends of the range pass."""
    from tcdistill.config import parse_config

    argv = ["--pretrained_teacher_model=t", "--train_shards_path_or_url=s.tar", "--max_train_steps=1"]
    with pytest.raises(SystemExit):
        parse_config([*argv, f"--seed={seed}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed must be in [0, 4294967295]" in err[0], err
    for ok in (0, 2**32 - 1):
        assert parse_config([*argv, f"--seed={ok}"]).seed == ok


def test_out_of_range_validation_seed_is_a_config_error() -> None:
    """QA: validation prompt i samples with --validation_seed + i (a torch generator): --validation_seed 2**64-1 trained
    a step, then ended the run at the first validation with "Overflow when unpacking long long" (a traceback)."""
    with pytest.raises(ConfigError, match=r"--validation_seed must be in \[-9223372036854775808, 18446744073709551612\] for 4 validation prompts"):
        TrainConfig(**BASE, validation_seed=2**64 - 1)
    with pytest.raises(ConfigError, match=r"18446744073709551614\] for 2 validation prompts"):
        TrainConfig(**BASE, validation_seed=2**64 - 1, validation_prompts="a|b")
    TrainConfig(**BASE, validation_seed=2**64 - 2, validation_prompts="a|b")
    TrainConfig(**BASE, validation_seed=2**64 - 1, validation_steps=0)  # no validation, no seed used


@pytest.mark.parametrize("bad,needle", [
    (["--learnig_rate=1e-3"], "unrecognized arguments: --learnig_rate=1e-3 (did you mean --learning_rate?); --help lists the flags"),
    (["--mixed-precision", "no"], "--mixed-precision (did you mean --mixed_precision?) no;"),
    (["--loss_type=L2"], "argument --loss_type: invalid choice: 'L2' (choose from 'l2', 'huber')"),
    (["--max_train_steps=1e3"], "argument --max_train_steps: invalid int value: '1e3'"),
])
def test_a_flag_the_parser_refuses_is_one_line_naming_the_nearest_flag(bad: list, needle: str, capsys: pytest.CaptureFixture) -> None:
    """QA: argparse printed the whole usage (73 lines) before its error line, and a mistyped flag named no flag."""
    with pytest.raises(SystemExit) as e:
        parse_config(["--pretrained_teacher_model=t", "--train_shards_path_or_url=s.tar", "--max_train_steps=1", *bad], prog="train.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("train.py: error: ") and needle in err[0], err
