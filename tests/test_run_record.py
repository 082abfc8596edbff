"""A run's recorded flags (tcdistill_config.json) that change sampling, as `generate`, `eval` and the model card read them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from conftest import hub_teacher_revisions, make_lora  # noqa: E402

from tcdistill.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def png(folder: Path) -> np.ndarray:
    (image,) = sorted(folder.glob("*.png"))
    return np.asarray(Image.open(image).convert("RGB"), dtype=np.int16)


def other_vae(teacher: Path, folder: Path, **save: str) -> Path:
    """The teacher's VAE with another decoder (so that decoding with it changes pixels), saved to `folder`."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(teacher, subfolder="vae")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    vae.save_pretrained(folder, **save)
    return folder


@pytest.mark.parametrize("where", ["hub_cache", "variant_folder"])
def test_generate_loads_the_runs_vae_as_training_did(where: str, tiny_teacher: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: the run's --pretrained_vae_model_name_or_path was loaded by `generate` without the run's --cache_dir (a hub id
    that only that cache holds: offline, "tiny/vae does not appear to have a file named config.json"), and a VAE folder
    holding only variant weights (save_pretrained(variant="fp16"), which training loads) failed with "no file named
    diffusion_pytorch_model.bin". Both now sample as --vae with the same VAE saved plainly does."""
    import huggingface_hub.constants

    plain = other_vae(tiny_teacher, tmp_path / "plain")
    if where == "hub_cache":
        repo = tmp_path / "hub" / "models--tiny--vae"
        shutil.copytree(plain, repo / "snapshots" / ("c" * 40))
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("c" * 40)
        run_vae, flags = "tiny/vae", {"cache_dir": str(tmp_path / "hub")}
    else:
        run_vae, flags = str(other_vae(tiny_teacher, tmp_path / "fp16", variant="fp16")), {}
        assert not (Path(run_vae) / "diffusion_pytorch_model.safetensors").exists()
    lora = make_lora(tiny_teacher, tmp_path / "lora")
    (lora / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": str(tiny_teacher), "variant": "lora",
                                                             "pretrained_vae_model_name_or_path": run_vae, **flags}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub VAE comes from the run's cache only
    common = ["generate", "--lora", str(lora), "--prompt", "a red square", "--steps", "2", "--device", "cpu"]
    main([*common, "--output_dir", str(tmp_path / "run")])
    main([*common, "--vae", str(plain), "--output_dir", str(tmp_path / "plain_out")])
    main([*common, "--vae", str(tiny_teacher / "vae"), "--output_dir", str(tmp_path / "teacher_vae")])
    run, given, own = (png(tmp_path / d) for d in ("run", "plain_out", "teacher_vae"))
    assert np.array_equal(run, given) and not np.array_equal(run, own)


def test_the_cards_command_line_samples_the_teacher_revision_it_trained_on(tiny_teacher: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: the card's `tcdistill generate --base TEACHER --lora OUT` line passed the run's teacher as --base, which generate
    loads as given: from main in the default cache, not at the run's --teacher_revision from its --cache_dir (offline here:
    no such model; online: another UNet under the LoRA). Without --base, generate takes the run's teacher as trained."""
    import re
    import shlex

    import huggingface_hub.constants

    from tcdistill.config import TrainConfig
    from tcdistill.modelcard import render_model_card

    snapshots = hub_teacher_revisions(tiny_teacher, tmp_path / "hub")
    out = make_lora(tiny_teacher, tmp_path / "out")
    cfg = TrainConfig(pretrained_teacher_model="tiny/teacher", teacher_revision="v1", cache_dir=str(tmp_path / "hub"),
                      train_shards_path_or_url="s/{0..9}.tar", output_dir=str(out), max_train_steps=10, variant="lora", resolution=32)
    (out / "tcdistill_config.json").write_text(json.dumps(cfg.to_dict()))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the teacher comes from the run's cache only
    argv = shlex.split(re.search(r"Or from the command line: `(.*?)`", render_model_card(cfg, [])).group(1))
    main([*argv[1:], "--steps", "2", "--device", "cpu", "--output_dir", str(tmp_path / "card")])
    main([*argv[1:], "--steps", "2", "--device", "cpu", "--base", str(snapshots["v1"]), "--output_dir", str(tmp_path / "v1")])
    main([*argv[1:], "--steps", "2", "--device", "cpu", "--base", str(snapshots["main"]), "--output_dir", str(tmp_path / "main")])
    card, v1, head = (png(tmp_path / d) for d in ("card", "v1", "main"))
    assert np.array_equal(card, v1) and not np.array_equal(v1, head)


def test_eval_decodes_through_the_runs_vae(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: `tcdistill eval` decoded every row (the images its FID, CLIP score and world classifier score) through the
    teacher's own VAE, never the run's --pretrained_vae_model_name_or_path that the student was trained with and
    `generate` samples with; it had no --vae either. It now takes the run's (a hub id through the run's --cache_dir)."""
    import huggingface_hub.constants

    import tcdistill.evaluate as evaluate

    plain = other_vae(tiny_teacher, tmp_path / "plain")
    repo = tmp_path / "hub" / "models--tiny--vae"
    shutil.copytree(plain, repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    lora = make_lora(tiny_teacher, tmp_path / "lora")
    record = {"pretrained_teacher_model": str(tiny_teacher), "variant": "lora", "pretrained_vae_model_name_or_path": "tiny/vae",
              "cache_dir": str(tmp_path / "hub")}
    (lora / "tcdistill_config.json").write_text(json.dumps(record))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    decoded = []
    monkeypatch.setattr(evaluate, "torchmetrics_scorers", lambda prompts, reference, *a: decoded.append(reference) or {})
    (tmp_path / "p.txt").write_text("a red circle\n")
    common = ["eval", "--teacher", str(tiny_teacher), "--lora", str(lora), "--prompts", str(tmp_path / "p.txt"), "--steps", "1",
              "--gamma", "0", "--reference_steps", "2"]
    for vae in ([], ["--vae", str(plain)], ["--vae", str(tiny_teacher / "vae")]):
        main([*common, *vae])
    run, given, own = decoded
    assert np.array_equal(run, given) and not np.array_equal(run, own)


@pytest.mark.parametrize("variant", ["lora", "full"])
def test_the_cards_code_loads_variant_only_teacher_and_vae_folders(variant: str, tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: a run whose teacher (and --pretrained_vae_model_name_or_path) are local folders of variant-only weights
    (save_pretrained(variant="fp16")) trains, and generate samples it, but the card's code loaded them without
    `variant=`: "no file named diffusion_pytorch_model.bin". It now names the variant; its code runs as written."""
    import re

    from diffusers import StableDiffusionPipeline

    from conftest import full_output
    from tcdistill.config import TrainConfig
    from tcdistill.modelcard import render_model_card

    teacher, out = tmp_path / "teacher", tmp_path / "out"
    StableDiffusionPipeline.from_pretrained(tiny_teacher).save_pretrained(teacher, variant="fp16")
    vae = other_vae(tiny_teacher, tmp_path / "vae", variant="fp16")
    full_output(tiny_teacher, out) if variant == "full" else make_lora(tiny_teacher, out)
    cfg = TrainConfig(pretrained_teacher_model=str(teacher), pretrained_vae_model_name_or_path=str(vae), variant=variant,
                      train_shards_path_or_url="s/{0..9}.tar", output_dir=str(out), max_train_steps=10, resolution=32)
    code = re.search(r"```python\n(.*?)```", render_model_card(cfg, []), re.S).group(1)
    assert code.count('variant="fp16"') == 2, code
    scope: dict = {}
    exec(code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32"), scope)
    assert np.asarray(scope["image"]).shape == (32, 32, 3)


def test_eval_measures_the_run_on_the_teacher_revision_it_trained_on(tiny_teacher: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: `tcdistill eval` required --teacher, which loads as given (a hub id: main, from the default cache), so a LoRA
    distilled from the teacher at --teacher_revision v1 was fused onto, and measured against, main's UNet. Without
    --teacher it now takes the run's teacher at its revision from its --cache_dir, as `generate` does without --base."""
    import huggingface_hub.constants

    snapshots = hub_teacher_revisions(tiny_teacher, tmp_path / "hub")
    lora = make_lora(tiny_teacher, tmp_path / "lora")
    (lora / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": "tiny/teacher", "teacher_revision": "v1",
                                                             "cache_dir": str(tmp_path / "hub"), "variant": "lora"}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the teacher comes from the run's cache only
    (tmp_path / "p.txt").write_text("a red circle\n")
    common = ["eval", "--lora", str(lora), "--prompts", str(tmp_path / "p.txt"), "--steps", "1", "--gamma", "0",
              "--reference_steps", "2"]
    rmse = {}
    for name, teacher in (("run", []), ("v1", ["--teacher", str(snapshots["v1"])]), ("main", ["--teacher", str(snapshots["main"])])):
        main([*common, *teacher, "--output", str(tmp_path / f"{name}.json")])
        rmse[name] = [r["rmse"] for r in json.loads((tmp_path / f"{name}.json").read_text())["rows"]]
    assert rmse["run"] == rmse["v1"] != rmse["main"]


def test_the_cards_code_samples_a_projection_text_encoder_teacher_as_trained(tmp_path: Path) -> None:
    """QA: an SD teacher whose text_encoder is saved as CLIPTextModelWithProjection trains (on the last hidden state) and
    generate samples it so (`sd_text_encoder`), but the card's code loaded the pipeline as saved, which takes the pooled
    projection as prompt states: "not enough values to unpack (expected 3, got 2)". Its code now loads the encoder as a
    CLIPTextModel, as generate does, and conditions on the same prompt states."""
    import re

    from transformers import CLIPTextModelWithProjection

    from tcdistill.config import TrainConfig
    from tcdistill.generate import load_pipeline
    from tcdistill.modelcard import render_model_card
    from tcdistill.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(None)
    te = CLIPTextModelWithProjection(pipe.text_encoder.config)
    te.load_state_dict(pipe.text_encoder.state_dict(), strict=False)
    pipe.register_modules(text_encoder=te)
    pipe.save_pretrained(str(tmp_path / "teacher"), safe_serialization=True)
    out = make_lora(tmp_path / "teacher", tmp_path / "out")
    cfg = TrainConfig(pretrained_teacher_model=str(tmp_path / "teacher"), variant="lora", train_shards_path_or_url="s/{0..9}.tar",
                      output_dir=str(out), max_train_steps=10, resolution=32)
    code = re.search(r"```python\n(.*?)```", render_model_card(cfg, []), re.S).group(1)
    scope: dict = {}
    exec(code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32"), scope)
    want = load_pipeline(str(tmp_path / "teacher"), None, str(out), "cpu", torch.float32).encode_prompt("a cat", "cpu", 1, False)[0]
    torch.testing.assert_close(scope["pipe"].encode_prompt("a cat", "cpu", 1, False)[0], want)


def test_a_relative_cache_dir_is_recorded_absolute(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: `--cache_dir=hub` (relative) was recorded as "hub" in tcdistill_config.json, so `generate` run from another
    directory looked for the run's hub teacher in another folder: offline "tiny/teacher ... at --teacher_revision v1 from
    --cache_dir hub" could not be found. It is recorded absolute, as local model folders are."""
    import huggingface_hub.constants

    from tcdistill.config import TrainConfig

    snapshots = hub_teacher_revisions(tiny_teacher, tmp_path / "hub")
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(pretrained_teacher_model="tiny/teacher", teacher_revision="v1", cache_dir="hub", variant="lora",
                      train_shards_path_or_url="s/{0..9}.tar", output_dir="out", max_train_steps=10, resolution=32)
    assert cfg.cache_dir == str(tmp_path / "hub")
    lora = make_lora(tiny_teacher, tmp_path / "out")
    (lora / "tcdistill_config.json").write_text(json.dumps(cfg.to_dict()))  # as the trainer writes it
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    common = ["generate", "--lora", str(lora), "--prompt", "a red square", "--steps", "2", "--device", "cpu"]
    main([*common, "--output_dir", str(tmp_path / "run")])
    main([*common, "--base", str(snapshots["v1"]), "--output_dir", str(tmp_path / "v1")])
    assert np.array_equal(png(tmp_path / "run"), png(tmp_path / "v1"))


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_run_teacher_or_vae_that_is_not_here_is_one_line_naming_the_flag(command: str, tiny_teacher: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """QA: an output copied to another machine (or whose teacher folder moved) named the run's teacher by the absolute
    path training recorded: generate said "We couldn't connect to 'https://huggingface.co' to load this model, ...",
    not that the path came from the run record or that --base fixes it. The run's --vae likewise. `eval`, which takes the
    run's teacher (without --teacher) and VAE too, gave that hub line after the merge that made it so: the same line now."""
    lora = make_lora(tiny_teacher, tmp_path / "run")
    gone = str(tmp_path / "elsewhere" / "teacher")
    (tmp_path / "p.txt").write_text("x\n")
    argv = (["generate", "--lora", str(lora), "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "imgs")]
            if command == "generate" else
            ["eval", "--lora", str(lora), "--prompts", str(tmp_path / "p.txt"), "--steps", "1", "--gamma", "0", "--reference_steps", "2"])
    base = "--base" if command == "generate" else "--teacher"
    for record, flag, what in (({"pretrained_teacher_model": gone}, base, "teacher"),
                               # not taken for a hub id by the run's --cache_dir/--teacher_revision ("Repo id must be...")
                               ({"pretrained_teacher_model": gone, "cache_dir": str(tmp_path), "teacher_revision": "v1"}, base, "teacher"),
                               ({"pretrained_teacher_model": str(tiny_teacher), "pretrained_vae_model_name_or_path": gone}, "--vae", "VAE")):
        (lora / "tcdistill_config.json").write_text(json.dumps(record))
        with pytest.raises(SystemExit) as e:
            main(argv)
        said = capsys.readouterr().err if command == "generate" else f"{e.value.code}\n"
        assert said == (f"tcdistill {command}: error: the run's {what} {gone} (its tcdistill_config.json) is not "
                        f"on this machine (moved, or the output copied here?); pass {flag} with where it is now\n")
    main([*argv, "--vae", str(tiny_teacher / "vae")])  # given: the recorded one is not looked for
    if command == "generate":
        assert (tmp_path / "imgs" / "00000_x.png").is_file()
