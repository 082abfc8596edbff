"""`tcdistill generate` on CPU: LoRA and full-UNet students on SD and SDXL bases -> PNGs + metadata.jsonl."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from conftest import full_output, hub_teacher_revisions, make_lora, run_script, train_flags  # noqa: E402

from tcdistill.cli import main  # noqa: E402
from tcdistill.export import LORA_WEIGHT_NAME  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in sorted(folder.glob("*.png"))}


def test_generate_lora_sd(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Prompts from flags and a file; image i uses seed + i whatever the batch size; image 0 equals diffusers' own call."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    lora = make_lora(tiny_teacher, tmp_path / "lora")
    (tmp_path / "prompts.txt").write_text("a green triangle\n\n  a white circle  \n")
    common = ["generate", "--lora", str(lora), "--base", str(tiny_teacher), "--prompt", "a red square", "--prompt_file",
              str(tmp_path / "prompts.txt"), "--steps", "2", "--gamma", "0.3", "--seed", "5", "--device", "cpu"]
    main([*common, "--batch_size", "2", "--output_dir", str(tmp_path / "b2")])
    printed = capsys.readouterr().out.split()
    main([*common, "--batch_size", "1", "--output_dir", str(tmp_path / "b1")])
    b2, b1 = pngs(tmp_path / "b2"), pngs(tmp_path / "b1")
    assert list(b2) == ["00000_a_red_square.png", "00001_a_green_triangle.png", "00002_a_white_circle.png"]
    assert printed == [str(tmp_path / "b2" / n) for n in b2]
    assert all(im.shape == (32, 32, 3) for im in b2.values())
    assert max(np.abs(b2[n] - b1[n]).max() for n in b2) <= 1  # batching changes float rounding only
    meta = [json.loads(line) for line in (tmp_path / "b2" / "metadata.jsonl").read_text().splitlines()]
    assert [(m["prompt"], m["seed"], m["guidance_scale"]) for m in meta] == [
        ("a red square", 5, 0.0), ("a green triangle", 6, 0.0), ("a white circle", 7, 0.0)]
    # QA: the LoRA scale, image size and dtype were missing, so a line did not say how to make its image again
    assert {(m["lora_scale"], m["height"], m["width"], m["dtype"], m["vae"]) for m in meta} == {(1.0, 32, 32, "fp32", None)}

    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(lora, weight_name=LORA_WEIGHT_NAME)
    ref = pipe("a red square", num_inference_steps=2, guidance_scale=0.0, eta=0.3, generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(np.asarray(ref, dtype=np.int16) - b2["00000_a_red_square.png"]).max() <= 1


def test_generate_full_unet_sdxl(sdxl_teacher: Path, tmp_path: Path) -> None:
    """A full-model output folder on an SDXL base (and a --vae): base and grid from the run's config, guidance default 8."""
    out = full_output(sdxl_teacher, tmp_path / "run")
    main(["generate", "--unet", str(out), "--prompt", "a blue circle", "--steps", "2", "--height", "32", "--width", "32",
          "--vae", str(sdxl_teacher / "vae"), "--output_dir", str(tmp_path / "imgs")])
    imgs = pngs(tmp_path / "imgs")
    assert list(imgs) == ["00000_a_blue_circle.png"] and imgs["00000_a_blue_circle.png"].shape == (32, 32, 3)
    meta = json.loads((tmp_path / "imgs" / "metadata.jsonl").read_text())
    assert meta["base"] == str(sdxl_teacher) and meta["guidance_scale"] == 8.0


def test_generate_full_unet_sd_matches_pipeline(tiny_teacher: Path, tmp_path: Path) -> None:
    """--unet on an SD base with an explicit guidance scale gives diffusers' own TCD sample."""
    from diffusers import StableDiffusionPipeline, TCDScheduler, UNet2DConditionModel

    out = full_output(tiny_teacher, tmp_path / "run")
    main(["generate", "--unet", str(out / "unet_target"), "--base", str(tiny_teacher), "--prompt", "a red circle",
          "--steps", "2", "--gamma", "0", "--guidance_scale", "6", "--output_dir", str(tmp_path / "imgs")])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher, unet=UNet2DConditionModel.from_pretrained(out / "unet_target"))
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    ref = pipe("a red circle", num_inference_steps=2, guidance_scale=6.0, eta=0.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(np.asarray(ref, dtype=np.int16) - pngs(tmp_path / "imgs")["00000_a_red_circle.png"]).max() <= 1


def test_generate_errors(tiny_teacher: Path, tmp_path: Path) -> None:
    """No prompts, or a base that is not an SD/SDXL text-to-image pipeline, exit 2 with one line."""
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--lora", str(tmp_path), "--base", str(tiny_teacher)])
    assert exc.value.code == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--lora", str(tmp_path), "--base", str(other), "--prompt", "x"])
    assert exc.value.code == 2


def test_generate_height_alone_and_refusals(tiny_teacher: Path, sdxl_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: --height without --width is honoured on an SD base (diffusers' SD pipeline reset both sides to its default);
    --steps past the run's grid, an --output_dir that is a file, a missing --lora and an SDXL UNet on an SD base are
    one-line refusals (exit 2), not tracebacks or diffusers' "strength" message."""
    lora = make_lora(tiny_teacher, tmp_path / "lora")
    main(["generate", "--lora", str(lora), "--base", str(tiny_teacher), "--prompt", "x", "--steps", "1", "--height", "64",
          "--output_dir", str(tmp_path / "h")])
    assert next(iter(pngs(tmp_path / "h").values())).shape == (64, 32, 3)
    (tmp_path / "afile").write_text("")
    xl = full_output(sdxl_teacher, tmp_path / "xl")
    cases = {
        "exceeds the 50 points": ["--lora", str(lora), "--base", str(tiny_teacher), "--steps", "51"],
        "is a file, not a folder": ["--lora", str(lora), "--base", str(tiny_teacher), "--output_dir", str(tmp_path / "afile")],
        "no LoRA weights at": ["--lora", str(tmp_path / "missing"), "--base", str(tiny_teacher)],
        "h/pytorch_lora_weights": ["--lora", str(tmp_path / "h"), "--base", str(tiny_teacher)],
        # refused at the load, past the output folder's check: its folder (and lock file) go under tmp_path, not the cwd
        "SDXL model but --base": ["--unet", str(xl), "--base", str(tiny_teacher), "--output_dir", str(tmp_path / "xl_out")],
        "must be >= 1": ["--lora", str(lora), "--height", "0"],
        "--device 'bogus'": ["--lora", str(lora), "--device", "bogus"],
    }
    capsys.readouterr()
    for needle, argv in cases.items():
        with pytest.raises(SystemExit) as exc:
            main(["generate", "--prompt", "x", *argv])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # (diffusers' loading progress bars come before it)
        assert exc.value.code == 2 and "Traceback" not in err and last.startswith("tcdistill generate: error:") and needle in last, (needle, err)


def test_generate_default_size_of_a_non_square_unet(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: a base whose UNet config has sample_size [h, w] got square images (size[0] for both sides) by default;
    each side now defaults to its own entry times the VAE factor."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_teacher, base)
    cfg_path = base / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["sample_size"] = [16, 8]
    cfg_path.write_text(json.dumps(cfg))
    lora = make_lora(tiny_teacher, tmp_path / "lora")
    main(["generate", "--lora", str(lora), "--base", str(base), "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "o")])
    assert next(iter(pngs(tmp_path / "o").values())).shape == (32, 16, 3)


def test_device_values_are_one_line_errors() -> None:
    """`--device` of generate and cache: a malformed name, or cuda where there is none, was a traceback."""
    from tcdistill.config import ConfigError
    from tcdistill.preflight import resolve_device

    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device 'bogus'"):
        resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_generate_lcm_run_uses_lcm_scheduler_and_rerun_replaces_metadata(tiny_teacher: Path, tmp_path: Path, capsys) -> None:
    """QA: an LCM-mode run was sampled with TCDScheduler (gamma 0.3). It now samples as it was trained: LCMScheduler on the
    run's grid with its --timestep_scaling_factor, as diffusers' own pipeline does. A re-run into the same folder
    replaces its images' metadata lines instead of appending duplicates."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    out = full_output(tiny_teacher, tmp_path / "run")
    cfg = {"pretrained_teacher_model": str(tiny_teacher), "num_ddim_timesteps": 20, "distill_mode": "lcm", "timestep_scaling_factor": 0.05,
           "final_step": 7}
    (out / "tcdistill_config.json").write_text(json.dumps(cfg))
    argv = ["generate", "--unet", str(out), "--prompt", "a red circle", "--steps", "2", "--guidance_scale", "6",
            "--output_dir", str(tmp_path / "imgs")]
    main(argv)
    main(argv)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher, unet=UNet2DConditionModel.from_pretrained(out / "unet_target"))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=20, timestep_scaling=0.05)
    ref = pipe("a red circle", num_inference_steps=2, guidance_scale=6.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(np.asarray(ref, dtype=np.int16) - pngs(tmp_path / "imgs")["00000_a_red_circle.png"]).max() <= 1
    lines = (tmp_path / "imgs" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["scheduler"] == "lcm" and json.loads(lines[0])["gamma"] is None
    assert json.loads(lines[0])["train_step"] == 7  # QA: no line said which step's weights made the image
    # --scheduler tcd overrides the run's mode: a different sample (TCD keeps part of x_t's noise at gamma 0.3)
    main([*argv, "--scheduler", "tcd", "--output_dir", str(tmp_path / "tcd")])
    assert np.abs(pngs(tmp_path / "tcd")["00000_a_red_circle.png"] - np.asarray(ref, dtype=np.int16)).max() > 1
    # QA: --gamma under LCM sampling was dropped without a word; it is refused in one line naming both ways out
    for extra in (["--gamma", "0.5"], ["--scheduler", "lcm", "--gamma", "0"]):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main([*argv, *extra, "--output_dir", str(tmp_path / "g")])
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and re.search(r"--gamma is TCD's; .*LCMScheduler .*drop --gamma, or pass --scheduler tcd", err), err
    assert not (tmp_path / "g").exists()


def test_prompt_file_with_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    """QA: a prompt file saved with a UTF-8 BOM (Windows editors) kept U+FEFF in its first prompt, which the CLIP
    tokenizer turns into extra tokens (a different image, and the BOM in metadata.jsonl); eval's --prompts reads them
    with the same function."""
    from tcdistill.generate import read_prompts

    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa red circle\r\n\r\n  un chat été 猫 \r\n".encode("utf-8"))
    assert read_prompts(None, str(f)) == ["a red circle", "un chat été 猫"]


def test_full_default_guidance_stays_in_the_runs_w_range(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: a full student trained with --w_min 1 --w_max 3 (the demo's) was sampled at the default scale 8 (w = 7, never
    trained); the default w now moves into the run's range (w 3, scale 4). A run in the default range keeps 8."""
    from tcdistill.run_outputs import run_guidance

    assert run_guidance({}, 8.0) == run_guidance({"w_min": 5.0, "w_max": 15.0}, 8.0) == 8.0
    assert run_guidance({"w_min": 1.0, "w_max": 3.0}, 8.0) == 4.0 and run_guidance({"w_min": 1.0, "w_max": 3.0}, 3.0) == 3.0
    out = full_output(tiny_teacher, tmp_path / "run")
    cfg = json.loads((out / "tcdistill_config.json").read_text())
    (out / "tcdistill_config.json").write_text(json.dumps({**cfg, "w_min": 1.0, "w_max": 3.0}))
    main(["generate", "--unet", str(out), "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "o")])
    assert json.loads((tmp_path / "o" / "metadata.jsonl").read_text())["guidance_scale"] == 4.0


def test_a_folder_of_another_model_as_unet_is_one_line(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: `--unet BASE/vae` (a diffusers folder of another model) built a weightless UNet and died in a meta-tensor
    traceback, in generate and in eval; each now refuses it in one line."""
    from tcdistill.evaluate import load_student

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--unet", str(tiny_teacher / "vae"), "--base", str(tiny_teacher), "--prompt", "x", "--output_dir", str(tmp_path)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "AutoencoderKL" in last and last.startswith("tcdistill generate: error:")
    with pytest.raises(ValueError, match="AutoencoderKL"):
        load_student(None, unet=str(tiny_teacher / "vae"))


def test_eval_lora_missing_or_of_another_base_is_one_line(tiny_teacher: Path, sdxl_teacher: Path, tmp_path: Path) -> None:
    """QA: eval's --lora went straight to diffusers: a missing path said "When using the offline mode, you must specify
    a `weight_name`" and an SDXL LoRA on an SD teacher was a RuntimeError traceback; both are errors eval's main prints
    in one line now (OSError, ValueError)."""
    from tcdistill.evaluate import load_student, load_teacher

    pipe = load_teacher(str(tiny_teacher))
    with pytest.raises(FileNotFoundError, match="no LoRA weights at"):
        load_student(pipe, lora=str(tmp_path / "missing"))
    xl = make_lora(sdxl_teacher, tmp_path / "xl")
    # QA: the line was diffusers' first ("Error(s) in loading state_dict for UNet2DConditionModel:"), naming no module
    # and no flag; it is export's now, naming the module and eval's own flag for the base.
    with pytest.raises(ValueError, match=rf"^the LoRA does not fit the UNet of --teacher {re.escape(str(tiny_teacher))}: its module "
                                         r"\S+ \(weight \[\d+, \d+\] there\) belongs to another base model; pass the model it was "
                                         "trained on as --teacher$"):
        load_student(pipe, lora=str(xl))


def test_a_full_unet_onto_a_base_of_other_text_encoder_widths_is_one_line(tiny_teacher: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """QA: a full-model student with a --base (eval: --teacher) of its family but another text encoder width sampled into
    a "RuntimeError: mat1 and mat2 shapes cannot be multiplied" traceback; a teacher of the same widths still works."""
    from tcdistill.evaluate import load_student, load_teacher
    from tcdistill.tiny import build_tiny_sd_pipeline

    out, wide = full_output(tiny_teacher, tmp_path / "run"), tmp_path / "wide"
    build_tiny_sd_pipeline(wide, cross_attention_dim=48)
    with pytest.raises(SystemExit):
        main(["generate", "--unet", str(out), "--base", str(wide), "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "imgs")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"tcdistill generate: error: the UNet takes prompt states of width 32 (cross_attention_dim) but the text encoders of "
        f"--base {wide} give 48; pass the teacher the UNet was distilled from as --base")
    with pytest.raises(ValueError, match=rf"of --teacher {re.escape(str(wide))} give 48; pass the teacher the UNet was distilled from as --teacher$"):
        load_student(load_teacher(str(wide)), unet=str(out))
    assert not list((tmp_path / "imgs").glob("*.png"))
    assert load_student(load_teacher(str(tiny_teacher)), unet=str(out)).config.cross_attention_dim == 32

def test_ignored_flags_are_refused(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: generate's --lora_scale with a full --unet was accepted and ignored; eval's --guidance_scale nan gave a table of
    NaN rows with exit 0. Both are one-line refusals before any model loads."""
    from tcdistill.evaluate import main as eval_main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--unet", str(tmp_path), "--prompt", "x", "--lora_scale", "0.5"])
    assert exc.value.code == 2
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(SystemExit, match="--guidance_scale must be finite"):
        eval_main(["--teacher", str(tiny_teacher), "--unet", str(tiny_teacher / "unet"), "--prompts", str(tmp_path / "p.txt"),
                   "--steps", "1", "--guidance_scale", "nan"])


def test_a_lora_file_without_unet_keys_is_refused(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: a training checkpoint's `checkpoint-N/lora.safetensors` (bare PEFT keys, no `unet.` prefix) passed as --lora
    loaded nothing (diffusers only warns) and generate/eval sampled the bare base model as the student, exit 0."""
    import safetensors.torch

    from tcdistill.evaluate import load_student, load_teacher

    lora = make_lora(tiny_teacher, tmp_path / "lora")
    bare = {k[len("unet."):]: v for k, v in safetensors.torch.load_file(lora / "pytorch_lora_weights.safetensors").items()}
    ckpt = tmp_path / "checkpoint-2" / "lora.safetensors"
    ckpt.parent.mkdir()
    safetensors.torch.save_file(bare, ckpt)
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--lora", str(ckpt), "--base", str(tiny_teacher), "--prompt", "x", "--steps", "1", "--device", "cpu",
              "--output_dir", str(tmp_path / "gen")])
    assert exc.value.code not in (0, None) and "no UNet LoRA weights" in capsys.readouterr().err
    assert not (tmp_path / "gen").exists() or not list((tmp_path / "gen").glob("*.png"))
    with pytest.raises(ValueError, match="no UNet LoRA weights"):
        load_student(load_teacher(str(tiny_teacher)), lora=str(ckpt))


def test_out_of_range_seed_and_unwritable_outputs_are_refused_before_loading(tiny_teacher: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """QA: generate's image i uses --seed + i and eval draws its noise from --seed and its re-noising from --seed + 1, all
    torch generators: a seed past [-2**63, 2**64 - 1] failed after the models had loaded (and some images were written)
    with "Overflow when unpacking long long". And eval found an --output it could not write only after all the sampling,
    generate an --output_dir it could not make only after loading the pipeline. Each is one line before any model loads."""
    import tcdistill.evaluate as evaluate
    import tcdistill.generate as generate

    monkeypatch.setattr(generate, "load_pipeline", lambda *a, **k: pytest.fail("pipeline loaded before the check"))
    monkeypatch.setattr(evaluate, "load_teacher", lambda *a, **k: pytest.fail("teacher loaded before the check"))
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # nothing can be made below a regular file, as on a read-only filesystem
    gen = ["generate", "--unet", str(tiny_teacher / "unet"), "--base", str(tiny_teacher), "--prompt_file", str(tmp_path / "p.txt")]
    ev = ["--teacher", str(tiny_teacher), "--unet", str(tiny_teacher / "unet"), "--prompts", str(tmp_path / "p.txt"), "--steps", "1"]
    cases = [(lambda a: main([*gen, *a, "--output_dir", str(tmp_path / "g")]), ["--seed", str(2**64 - 1)], r"--seed must be in \[-9223372036854775808, 18446744073709551614\]"),
             (lambda a: main([*gen, *a, "--output_dir", str(tmp_path / "g")]), ["--seed", str(-2**63 - 1)], "--seed must be in"),
             (lambda a: main([*gen, *a]), ["--output_dir", str(blocker / "g")], "--output_dir .* is not writable"),
             (lambda a: evaluate.main([*ev, *a]), ["--seed", str(2**64 - 1)], r"--seed must be in \[-9223372036854775808, 18446744073709551614\]"),
             (lambda a: evaluate.main([*ev, *a]), ["--output", str(blocker / "d" / "e.json")], "--output.* is not writable")]
    for run, argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            run(argv)
        # generate prints its error (argparse's exit); eval's sys.exit(message) leaves the printing to the interpreter
        printed = capsys.readouterr().err if exc.value.code == 2 else str(exc.value.code)
        err = [ln for ln in printed.splitlines() if ln.strip()]
        assert len(err) == 1 and re.search(needle, err[0]), (argv, err)
    assert not (tmp_path / "g").exists()


def test_a_checkpoint_folder_is_named_as_resume_state(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: `generate --unet OUT/checkpoint-3` (or --lora, or `export --lora`) said only "no UNet config.json in ..." / "no
    LoRA weights at ...": the line now says the folder is a training checkpoint and names the output folder to pass."""
    ckpt = tmp_path / "out" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("{}")
    for argv in (["generate", "--unet", str(ckpt), "--base", str(tiny_teacher), "--prompt", "x", "--device", "cpu"],
                 ["generate", "--lora", str(ckpt), "--base", str(tiny_teacher), "--prompt", "x", "--device", "cpu"],
                 ["export", "--lora", str(ckpt)]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, *(["--output_dir", str(tmp_path / "gen")] if argv[0] == "generate" else [])])
        err = f"{exc.value.code}{capsys.readouterr().err}"
        assert "checkpoint-3 is a training checkpoint" in err and f"output folder {tmp_path / 'out'} " in err, err


def test_a_renamed_or_unfinished_checkpoint_folder_is_named_as_resume_state(tmp_path: Path) -> None:
    """Mutation QA: the checkpoint hint was pinned only for a folder both named checkpoint-N and marked complete; one
    copied under another name (its COMPLETE marker kept) or cut short before its marker lost the hint unnoticed."""
    from tcdistill.export import checkpoint_hint

    renamed, unfinished, plain = tmp_path / "out" / "best", tmp_path / "out" / "checkpoint-7", tmp_path / "out" / "unet"
    for d in (renamed, unfinished, plain):
        d.mkdir(parents=True)
    (renamed / "COMPLETE").write_text("{}")
    for d in (renamed, unfinished):
        assert checkpoint_hint(d) == (f"; {d.name} is a training checkpoint (resume state for --resume_from_checkpoint), "
                                      f"not a model: pass the output folder {tmp_path / 'out'} that the run saves at its end")
    assert checkpoint_hint(plain) == checkpoint_hint(tmp_path / "checkpoint-8") == ""  # not a checkpoint; not a folder


def test_generate_defaults_to_the_runs_resolution(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: without --height/--width, generate sampled at the pipeline's default (the tiny teacher's UNet sample_size 16 x
    VAE factor 2 = 32 px), not at the --resolution the run trained at (68 here: 64 px). It now takes the run's size from
    the tcdistill_config.json beside the LoRA file (rounded down to a multiple of 8, as validation); --height or --width
    alone still wins on its side; and --help says what the default is."""
    lora = make_lora(tiny_teacher, tmp_path / "run")
    (lora / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": str(tiny_teacher), "resolution": 68}))
    argv = ["generate", "--lora", str(lora / "pytorch_lora_weights.safetensors"), "--prompt", "x", "--steps", "1"]
    main([*argv, "--output_dir", str(tmp_path / "run_size")])
    main([*argv, "--height", "48", "--output_dir", str(tmp_path / "height")])
    main([*argv, "--width", "48", "--output_dir", str(tmp_path / "width")])
    assert next(iter(pngs(tmp_path / "run_size").values())).shape == (64, 64, 3)
    assert next(iter(pngs(tmp_path / "height").values())).shape == (48, 64, 3)
    assert next(iter(pngs(tmp_path / "width").values())).shape == (64, 48, 3)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "run's --resolution" in " ".join(capsys.readouterr().out.split())


def test_validation_samples_at_the_resolution_rounded_down_to_8(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """Mutation testing: every run size the tests sampled at was a multiple of 8 (or 16), so validation sampling at the
    raw --resolution, or rounding to 16, passed. Pipelines need multiples of 8: a run at 36 px (the tiny VAE's factor
    is 2) samples its grid at 32 px, as generate, eval and the card's code do."""
    from tcdistill.validation import sampling_size

    assert [sampling_size(r) for r in (None, 3, 8, 15, 36, 44, 515)] == [None, 8, 8, 8, 32, 40, 512]
    out = tmp_path / "out"
    run_script("train_tcd_distill_lora_sd_wds.py", train_flags(tiny_teacher, tiny_shards, out, 1, "--resolution=36", "--validation_steps=1",
                                                               "--validation_inference_steps=1", "--checkpointing_steps=5"))
    with Image.open(out / "validation" / "lora-step000001.png") as im:
        assert im.size == (32, 32)


@pytest.mark.parametrize("xl", [False, True])
def test_a_base_saved_from_its_img2img_pipeline_samples_as_text_to_image(xl: bool, tiny_teacher: Path, sdxl_teacher: Path,
                                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: a teacher folder saved from StableDiffusion(XL)Img2ImgPipeline holds the text-to-image pipeline's components and
    trains, but generate (and eval) refused it: "pipeline class 'StableDiffusionImg2ImgPipeline' is not supported". It now
    samples as its text-to-image pipeline, as the model card's snippet loads it. A refiner-style SDXL base (no text_encoder
    or tokenizer) is refused in one line: it sampled into a "mat1 and mat2 shapes cannot be multiplied" traceback."""
    import shutil

    from tcdistill.evaluate import load_teacher

    src = sdxl_teacher if xl else tiny_teacher
    base = tmp_path / "base"
    shutil.copytree(src, base)
    index = json.loads((base / "model_index.json").read_text())
    # what StableDiffusion(XL)Img2ImgPipeline.save_pretrained writes over the same components
    index.update({"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": False} if xl
                 else {"_class_name": "StableDiffusionImg2ImgPipeline"})
    (base / "model_index.json").write_text(json.dumps(index))
    lora = make_lora(src, tmp_path / "lora")
    for b, out in ((src, "plain"), (base, "img2img")):
        main(["generate", "--lora", str(lora), "--base", str(b), "--prompt", "a red circle", "--steps", "1", "--output_dir", str(tmp_path / out)])
    plain, img2img = pngs(tmp_path / "plain"), pngs(tmp_path / "img2img")
    assert list(plain) == list(img2img) == ["00000_a_red_circle.png"]
    assert np.array_equal(plain["00000_a_red_circle.png"], img2img["00000_a_red_circle.png"])
    if not xl:
        assert type(load_teacher(str(base))).__name__ == "StableDiffusionPipeline"
        return
    (base / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None], "tokenizer": [None, None]}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--lora", str(lora), "--base", str(base), "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert "has no tokenizer, text_encoder" in err.strip().splitlines()[-1], err


@pytest.mark.parametrize("kind", ["vae8", "unet"])
def test_a_vae_that_does_not_fit_is_one_line(kind: str, tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: `generate --vae` with a VAE of 8 latent channels on a UNet of 4 died in the final decode with a conv traceback
    ("expected input[1, 4, 8, 8] to have 8 channels"), after sampling (training refuses the same mismatch in one line); a
    folder of another model (BASE/unet) said "cross_attention_dim must be specified for CrossAttnDownBlock2D"."""
    from diffusers import AutoencoderKL

    if kind == "vae8":
        vae = AutoencoderKL.from_pretrained(tiny_teacher, subfolder="vae")
        AutoencoderKL.from_config(dict(vae.config), latent_channels=8).save_pretrained(tmp_path / "vae8")
        folder, needle = tmp_path / "vae8", "has 8 latent channels but the UNet takes 4 input channels"
    else:
        folder, needle = tiny_teacher / "unet", "holds a 'UNet2DConditionModel' config where a 'AutoencoderKL' one is expected"
    lora = make_lora(tiny_teacher, tmp_path / "lora")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--lora", str(lora), "--base", str(tiny_teacher), "--vae", str(folder), "--prompt", "x",
              "--steps", "1", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert needle in last and "--vae" in last, last
    assert not list((tmp_path / "out").glob("*.png"))


def test_generate_samples_on_the_teacher_revision_the_run_trained_on(tiny_teacher: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: a run distilled from a hub teacher at --teacher_revision (read through its --cache_dir) was sampled by
    `generate` on the hub's main revision, from the default cache; the model card's code loads the trained revision."""
    import huggingface_hub.constants

    snapshots = hub_teacher_revisions(tiny_teacher, tmp_path / "hub")
    lora = make_lora(tiny_teacher, tmp_path / "lora")
    (lora / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": "tiny/teacher", "teacher_revision": "v1",
                                                             "cache_dir": str(tmp_path / "hub"), "num_ddim_timesteps": 50}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the teacher comes from the run's cache only
    common = ["generate", "--lora", str(lora), "--prompt", "a red square", "--steps", "2", "--device", "cpu"]
    main([*common, "--output_dir", str(tmp_path / "run")])
    for ref, folder in snapshots.items():
        main([*common, "--base", str(folder), "--output_dir", str(tmp_path / ref)])
    run, v1, head = (pngs(tmp_path / d)["00000_a_red_square.png"] for d in ("run", "v1", "main"))
    assert np.array_equal(run, v1) and not np.array_equal(v1, head)
    meta = json.loads((tmp_path / "run" / "metadata.jsonl").read_text())
    assert (meta["base"], meta["base_revision"]) == ("tiny/teacher", "v1")  # the line names the teacher as the run does
