"""The model card written at the end of training, its usage code, and --push_to_hub (huggingface_hub monkeypatched:
no network)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import full_output, make_lora, run_script, train_flags  # noqa: E402

from tcdistill.config import TrainConfig  # noqa: E402
from tcdistill.modelcard import latest_validation_grids, render_model_card  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeHub:
    """Records create_repo / upload_folder calls, and which files upload_folder's own filter would send."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: list[str] = []

    def create_repo(self, repo_id: str, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kw):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", kw))
        root = Path(kw["folder_path"])
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        self.uploaded = sorted(filter_repo_objects(files, ignore_patterns=kw.get("ignore_patterns")))


def test_training_writes_card_and_pushes(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA run with --push_to_hub: card in output_dir, repo created, folder uploaded without checkpoints or the token."""
    from diffusers import StableDiffusionPipeline

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "create_repo", hub.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", hub.upload_folder)
    from tcdistill.tiny import shard_pattern, write_tiny_shards

    write_tiny_shards(tmp_path / "shards", n_shards=1, per_shard=4, image_size=32)
    out = tmp_path / "out"
    run_script("train_tcd_distill_lora_sd_wds.py", train_flags(tiny_teacher, shard_pattern(tmp_path / "shards", 1), out, 2, "--lora_rank=4",
                                                               "--push_to_hub", "--hub_model_id=me/tcd-lora", "--hub_token=hf_SECRET"))
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1]["exist_ok"] is True and hub.calls[0][1]["token"] == "hf_SECRET"
    up = hub.calls[1][1]
    assert up["repo_id"] == "me/tcd-lora" and Path(up["folder_path"]) == out
    assert {"README.md", "pytorch_lora_weights.safetensors", "tcdistill_config.json", "validation/lora-step000002.png"} <= set(hub.uploaded)
    assert (out / ".tcdistill.lock").is_file() and ".tcdistill.lock" not in hub.uploaded  # the run's lock stays local
    assert not [f for f in hub.uploaded if f.startswith("checkpoint-")] and (out / "checkpoint-2").is_dir()
    for f in hub.uploaded:  # the hub token is in no uploaded file
        assert b"hf_SECRET" not in (out / f).read_bytes(), f
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_teacher}" in card and 'load_lora_weights("me/tcd-lora", weight_name="pytorch_lora_weights.safetensors")' in card
    assert "![validation/lora-step000002.png](validation/lora-step000002.png)" in card

    # The card's usage code runs as written (on CPU in fp32, with the output folder standing in for the hub repo).
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('"me/tcd-lora"', repr(str(out))).replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32")
    scope: dict = {}
    exec(code, scope)
    assert isinstance(scope["pipe"], StableDiffusionPipeline) and np.asarray(scope["image"]).shape == (32, 32, 3)


def test_card_for_full_sdxl_with_vae(tmp_path: Path) -> None:
    """Full SDXL card: unet_target usage with the embedded guidance, the custom VAE, the training grid, newest grids only."""
    (tmp_path / "validation").mkdir()
    for name in ("ema-step000002.png", "ema-step000010.png", "online-step000010.png", "notes.txt"):
        (tmp_path / "validation" / name).write_bytes(b"")
    cfg = TrainConfig(pretrained_teacher_model="stabilityai/stable-diffusion-xl-base-1.0", train_shards_path_or_url="s/{0..9}.tar",
                      output_dir=str(tmp_path), max_train_steps=10, model_family="sdxl", resolution=1024, w_min=3.0,
                      min_image_size=700, max_pwatermark=0.5, num_ddim_timesteps=25,
                      pretrained_vae_model_name_or_path="madebyollin/sdxl-vae-fp16-fix")
    assert latest_validation_grids(tmp_path) == ["validation/ema-step000010.png", "validation/online-step000010.png"]
    card = render_model_card(cfg, [str(tmp_path / "unet"), str(tmp_path / "unet_target")], repo="me/tcd-xl")
    assert "StableDiffusionXLPipeline" in card and 'subfolder="unet_target"' in card and "guidance_scale=8.0" in card
    assert 'AutoencoderKL.from_pretrained("madebyollin/sdxl-vae-fp16-fix"' in card
    assert "original_inference_steps=25" in card and "train_tcd_distill_sdxl_wds.py" in card
    flags = re.search(r"defaults of `train_tcd_distill_sdxl_wds.py`:\n\n```\n(.*?)```", card, re.S).group(1)
    assert "--num_ddim_timesteps=25" in flags and "--w_min" not in flags and "--resolution" not in flags
    assert "- Data: `s/{0..9}.tar`\n" in card
    # QA: with cached shards too (they win in training) the card named the pixel shards
    cached = render_model_card(dataclasses.replace(cfg, train_latents_path_or_url="c/{0..3}.tar"), [str(tmp_path / "unet_target")])
    assert "- Data: `c/{0..3}.tar` (latents and prompt states cached by `tcdistill cache`)\n" in cached


def test_card_for_lcm_mode_names_lcm_scheduler(tmp_path: Path) -> None:
    """An LCM-mode run's card samples with LCMScheduler (with its boundary scaling), without TCD's gamma."""
    cfg = TrainConfig(pretrained_teacher_model="runwayml/stable-diffusion-v1-5", train_shards_path_or_url="s/{0..9}.tar",
                      output_dir=str(tmp_path), max_train_steps=10, variant="lora", distill_mode="lcm", timestep_scaling_factor=1.0)
    card = render_model_card(cfg, [str(tmp_path / "pytorch_lora_weights.safetensors")])
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=1.0)" in code
    assert "TCDScheduler" not in card and "eta=" not in code and "gamma" not in card


def test_lcm_sampling_does_not_clip_x0_a_teacher_config_asks_to_clip() -> None:
    """QA: an LCM-mode run whose teacher's scheduler config sets clip_sample (or thresholding) sampled with x0 clipped
    to [-1, 1] in validation and generate (the SDXL pipeline, unlike SD's, does not reset it), though the student was
    trained on the unclipped consistency map; the card's code now turns both off too."""
    from tcdistill.validation import sampling_scheduler

    config = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "num_train_timesteps": 1000, "clip_sample": True, "thresholding": True}
    lcm = sampling_scheduler(config, "lcm")
    assert not lcm.config.clip_sample and not lcm.config.thresholding
    cfg = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s.tar", max_train_steps=1, variant="lora",
                      model_family="sdxl", distill_mode="lcm")
    code = re.search(r"```python\n(.*?)```", render_model_card(cfg, ["p"], schedule=config), re.S).group(1)
    assert "clip_sample=False" in code and "thresholding=False" in code


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_card_samples_on_the_trained_schedule(variant: str, tmp_path: Path) -> None:
    """The card's `TCDScheduler.from_config(pipe.scheduler.config, ...)` runs on the schedule the student was trained on:
    from_config keeps only the fields a teacher's scheduler file set, so betas it left to its own class's defaults (DDIM:
    linear 0.0001..0.02) must be spelled out, or TCDScheduler's (scaled_linear 0.00085..0.012) would replace them. SD 1.5's
    file sets them all, and its card's call stays bare."""
    import torch
    from diffusers import DDIMScheduler, PNDMScheduler, TCDScheduler

    cfg = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s/{0..9}.tar", output_dir=str(tmp_path),
                      max_train_steps=10, variant=variant)
    for teacher in (DDIMScheduler.from_config({"num_train_timesteps": 1000}),  # a file leaving the betas to DDIM's defaults
                    PNDMScheduler.from_config({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                                               "num_train_timesteps": 1000, "prediction_type": "v_prediction"})):
        trained = teacher.config  # what training ran on (families.load_noise_scheduler fills the same fields)
        code = re.search(r"```python\n(.*?)```", render_model_card(cfg, [], schedule=trained), re.S).group(1)
        call = re.search(r"pipe\.scheduler = (TCDScheduler\.from_config\(.*\))\n", code).group(1)
        # the user's pipe.scheduler: the teacher's scheduler as loaded from its file (defaults dropped by from_config)
        sampler = eval(call, {"TCDScheduler": TCDScheduler, "pipe": type("P", (), {"scheduler": teacher})})
        torch.testing.assert_close(sampler.alphas_cumprod, teacher.alphas_cumprod)
        assert sampler.config.prediction_type == teacher.config.prediction_type
    assert call == "TCDScheduler.from_config(pipe.scheduler.config, prediction_type='v_prediction')"


@pytest.mark.parametrize("mode", ["tcd", "lcm"])
def test_card_samples_on_the_run_grid_under_a_consistency_scheduler_teacher(mode: str) -> None:
    """A teacher shipping an LCMScheduler (or TCDScheduler) config sets its own original_inference_steps (and LCM's
    timestep_scaling), which from_config keeps: the card's bare call then sampled a run with the defaults (N 50, scaling 10)
    on the teacher's 100-step grid (4 steps: 999, 749, 499, 249, not the trained 999, 759, 499, 259) and its scaling."""
    from diffusers import LCMScheduler, TCDScheduler

    from tcdistill.families import ddpm_schedule
    from tcdistill.schedule import ddim_grid

    teacher = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=100,
                           timestep_scaling=1.0)
    cfg = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s.tar", max_train_steps=1, variant="lora",
                      distill_mode=mode)
    trained = ddpm_schedule(dict(teacher.config)).config  # what training ran on, as the trainer passes it to the card
    code = re.search(r"```python\n(.*?)```", render_model_card(cfg, [], schedule=trained), re.S).group(1)
    call = re.search(r"pipe\.scheduler = (\w+Scheduler\.from_config\(.*\))\n", code).group(1)
    sampler = eval(call, {"TCDScheduler": TCDScheduler, "LCMScheduler": LCMScheduler, "pipe": type("P", (), {"scheduler": teacher})})
    sampler.set_timesteps(4)
    assert set(sampler.timesteps.tolist()) <= set(ddim_grid(1000, 50).tolist()), call
    if mode == "lcm":
        assert sampler.config.timestep_scaling == 10.0, call


def test_card_loads_the_teacher_revision_it_was_trained_on(tmp_path: Path) -> None:
    """--teacher_revision: the usage code loads that revision of the base, not its main branch."""
    for variant in ("full", "lora"):
        cfg = TrainConfig(pretrained_teacher_model="org/sd", train_shards_path_or_url="s/{0..9}.tar", output_dir=str(tmp_path),
                          max_train_steps=10, variant=variant, teacher_revision="fp16")
        code = re.search(r"```python\n(.*?)```", render_model_card(cfg, []), re.S).group(1)
        assert 'from_pretrained("org/sd", revision="fp16", ' in code
        cfg = TrainConfig(pretrained_teacher_model="org/sd", train_shards_path_or_url="s/{0..9}.tar", output_dir=str(tmp_path),
                          max_train_steps=10, variant=variant)
        assert "revision=" not in render_model_card(cfg, [])


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_pushed_cards_command_line_runs(variant: str, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pushed card's `tcdistill generate --unet/--lora REPO` line runs as written: generate fetches the repo's output
    (huggingface_hub monkeypatched: the repo is the output folder, filtered by the requested patterns) and samples it
    with the run's saved flags. Before, --lora REPO was 'no LoRA weights at REPO' and --unet REPO looked for REPO/config.json."""
    import shlex
    import shutil

    from huggingface_hub.utils import filter_repo_objects

    from tcdistill.cli import main

    repo, out = "me/tcd-out", tmp_path / "out"
    if variant == "full":
        full_output(tiny_teacher, out)
    else:
        make_lora(tiny_teacher, out)
    (out / "unet").mkdir()  # the online student, which sampling does not need
    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url="s/{0..9}.tar", output_dir=str(out),
                      max_train_steps=10, variant=variant, num_ddim_timesteps=20, resolution=48)
    (out / "tcdistill_config.json").write_text(json.dumps(cfg.to_dict()))

    def snapshot_download(repo_id: str, allow_patterns: list[str], **kw) -> str:
        assert repo_id == repo
        snap = tmp_path / "snapshot"
        files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
        for f in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snap / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / f, snap / f)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    line = re.search(r"Or from the command line: `(.*?)`", render_model_card(cfg, [], repo=repo)).group(1)
    argv = shlex.split(line)
    assert argv[:2] == ["tcdistill", "generate"] and repo in argv
    main([*argv[1:], "--device", "cpu", "--output_dir", str(tmp_path / "samples")])
    meta = json.loads((tmp_path / "samples" / "metadata.jsonl").read_text())
    assert meta[variant if variant == "lora" else "unet"] == repo and meta["guidance_scale"] == (8.0 if variant == "full" else 0.0)
    assert (meta["height"], meta["width"]) == (48, 48)  # the run's --resolution, from the repo's tcdistill_config.json
    assert (tmp_path / "samples" / meta["file_name"]).is_file()
    # `tcdistill eval` takes the same repo (on the run's saved grid: N = 20)
    (tmp_path / "p.txt").write_text("a red circle\n")
    main(["eval", "--teacher", str(tiny_teacher), f"--{'unet' if variant == 'full' else 'lora'}", repo, "--prompts",
          str(tmp_path / "p.txt"), "--steps", "1", "--reference_steps", "2", "--output", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows["settings"]["original_steps"] == 20 and any(r["model"] != "teacher" for r in rows["rows"])


def test_full_cards_guidance_is_inside_the_trained_w_range(tmp_path: Path) -> None:
    """QA: a full run trained on w in [1, 3] (the demo's range) got a card recommending guidance_scale=8.0, i.e. w = 7,
    which the student never trained on (training itself warns of it for validation); the card now moves it into the range,
    as `tcdistill generate` moves its default, and keeps an in-range --validation_guidance_scale as it is."""
    for kw, scale in ((dict(w_min=1.0, w_max=3.0), 4.0), (dict(validation_guidance_scale=6.5), 6.5)):
        cfg = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s/{0..9}.tar", output_dir=str(tmp_path),
                          max_train_steps=10, **kw)
        card = render_model_card(cfg, [])
        assert f"guidance_scale={scale}, eta=0.3)" in card and f"Guidance scale: {scale} (embedded" in card


def test_card_flags_and_command_line_paste_into_a_shell(tmp_path: Path) -> None:
    """QA: the card listed `--train_shards_path_or_url=pipe:curl -L -s https://...` and `--validation_prompts=a|b` bare, and
    its `tcdistill generate` line named an output folder with a space bare: pasted into a shell, they split into other
    arguments. Both are shell-quoted now; the flags block parses back to the same values."""
    import shlex

    from tcdistill.config import parse_config

    out = tmp_path / "my run"
    cfg = TrainConfig(pretrained_teacher_model="/models/my teacher", output_dir=str(out), max_train_steps=10, variant="lora",
                      train_shards_path_or_url="pipe:curl -L -s https://host/data/{00000..00009}.tar?download=true",
                      validation_prompts="a red circle|a blue square", learning_rate=4.5e-6, use_8bit_adam=True)
    card = render_model_card(cfg, [])
    block = re.search(r"defaults of `train_tcd_distill_lora_sd_wds.py`:\n\n```\n(.*?)```", card, re.S).group(1)
    back = parse_config(shlex.split(block), defaults={"variant": "lora"})
    assert back.to_dict() == cfg.to_dict()
    line = re.search(r"Or from the command line: `(.*?)`", card).group(1)
    argv = shlex.split(line)
    assert "--base" not in argv and argv[argv.index("--lora") + 1] == str(out)  # the run's teacher: test_run_record.py


def test_a_relative_teacher_folder_is_recorded_absolute(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: `--pretrained_teacher_model=teacher --output_dir=out` (folders under the working directory) wrote "teacher" into
    tcdistill_config.json and the card, so `tcdistill generate --unet /abs/out` run from another directory failed with
    "teacher does not appear to have a file named model_index.json", and the card's code loaded "teacher" and "out". A
    local model folder is now recorded absolute, and the card names the output folder absolute; a hub id stays as given."""
    monkeypatch.chdir(tiny_teacher.parent)
    (tmp_path / "vae").mkdir()
    for variant in ("full", "lora"):
        cfg = TrainConfig(pretrained_teacher_model=tiny_teacher.name, output_dir="out", train_shards_path_or_url="s/{0..9}.tar",
                          max_train_steps=10, variant=variant, pretrained_vae_model_name_or_path=os.path.relpath(tmp_path / "vae"))
        assert (cfg.pretrained_teacher_model, cfg.pretrained_vae_model_name_or_path) == (str(tiny_teacher), str(tmp_path / "vae"))
        code = re.search(r"```python\n(.*?)```", render_model_card(cfg, []), re.S).group(1)
        assert f'from_pretrained("{tiny_teacher}"' in code and f'"{tiny_teacher.parent / "out"}"' in code, code
    hub = TrainConfig(pretrained_teacher_model="org/sd", train_shards_path_or_url="s/{0..9}.tar", max_train_steps=10)
    assert hub.pretrained_teacher_model == "org/sd"


def test_card_code_samples_at_the_trained_size(tmp_path: Path) -> None:
    """QA: the card's code called the pipeline without a size, i.e. at the teacher's default (UNet sample_size x VAE
    factor), which need not be the run's --resolution (SD 2.1's 768 px default for a run at 512; the tiny teacher's 32 px
    for a run at 64). It now passes the run's size (rounded down to a multiple of 8, as validation samples)."""
    for variant, resolution, size in (("lora", 64, 64), ("full", 515, 512)):
        cfg = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s/{0..9}.tar", output_dir=str(tmp_path),
                          max_train_steps=10, variant=variant, resolution=resolution)
        assert f'pipe("a photo of a cat", height={size}, width={size}, num_inference_steps=4' in render_model_card(cfg, [])


def test_list_in_card_says_whether_it_listed_the_file(tmp_path: Path) -> None:
    """Mutation testing: list_in_card's return value (listed or not) was never checked, nor a tcdistill card whose file
    list is "- (none)" (it has no list to add to: no change, and no AttributeError from the unmatched list)."""
    from tcdistill.modelcard import list_in_card, write_model_card

    cfg = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s/{0..9}.tar", output_dir=str(tmp_path),
                      max_train_steps=10, variant="lora")
    write_model_card(cfg, [str(tmp_path / "pytorch_lora_weights.safetensors")])
    assert list_in_card(tmp_path / "kohya.safetensors") is True
    assert list_in_card(tmp_path / "kohya.safetensors") is False  # listed once
    assert list_in_card(tmp_path / "elsewhere" / "kohya.safetensors") is False  # no card beside it
    card = (tmp_path / "README.md").read_text()
    assert "- `pytorch_lora_weights.safetensors`\n- `kohya.safetensors`\n" in card
    write_model_card(cfg, [])
    card = (tmp_path / "README.md").read_text()
    assert "Files:\n- (none)\n" in card and list_in_card(tmp_path / "kohya.safetensors") is False
    assert (tmp_path / "README.md").read_text() == card


def test_a_model_card_cut_short_by_a_full_disk_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: the card was written in place: a disk that filled up part-way through it (here `ulimit -f`) left the previous
    run's card cut short to what fitted, under an error line saying the trained weights are saved. It is written whole
    or not at all now."""
    import resource

    import tcdistill.modelcard as modelcard

    (tmp_path / "README.md").write_text("previous card")
    monkeypatch.setattr(modelcard, "render_model_card", lambda *args, **kwargs: "x" * 200_000)
    cfg = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s.tar", max_train_steps=1, output_dir=str(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # Python ignores SIGXFSZ: the write fails with EFBIG
    try:
        with pytest.raises(OSError, match="File too large"):
            modelcard.write_model_card(cfg, [])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (tmp_path / "README.md").read_text() == "previous card"
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
