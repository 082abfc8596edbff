"""`tcdistill convert`: a teacher as one original-format (A1111 / CivitAI) checkpoint file -> a diffusers folder, and the
refusal of such a file passed straight to the commands that take a teacher."""

from __future__ import annotations

import logging.handlers
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # ldm_util lives next to this file

from conftest import make_lora, run_script, train_flags  # noqa: E402
from ldm_util import pipeline_to_ldm, save_ldm, save_ldm_vae  # noqa: E402
from tcdistill import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _pipe(folder: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def sd_file(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD teacher as one LDM-format .safetensors file."""
    return save_ldm(_pipe(tiny_teacher), tmp_path_factory.mktemp("ldm") / "model.safetensors")


def _convert(capsys: pytest.CaptureFixture, *argv: object) -> str:
    """`tcdistill convert ARGV`'s one-line error (it must fail)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", *map(str, argv)])
    return str(e.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd", "sd2", "sdxl"])
def test_convert_round_trips_every_weight(family: str, tiny_teacher: Path, vpred_teacher: Path, sdxl_teacher: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """The folder `tcdistill convert` writes from an LDM file is the original pipeline: the same class and components,
    every weight bit-equal (diffusers' key mapping, the VAE's 1x1-conv attention, SD 2.x's and SDXL's fused OpenCLIP
    q/k/v), and the prediction type of --config (SD 2.x's v-prediction: the file holds none)."""
    teacher = {"sd": tiny_teacher, "sd2": vpred_teacher, "sdxl": sdxl_teacher}[family]
    orig = _pipe(teacher)
    out = tmp_path / "converted"
    ldm = save_ldm(orig, tmp_path / "m.safetensors", open_clip=family == "sd2")
    cli.main(["convert", str(ldm), "--output_dir", str(out), "--config", str(teacher)])
    assert "pass it as --pretrained_teacher_model" in capsys.readouterr().out
    conv = _pipe(out)
    assert type(conv) is type(orig)
    for name, module in orig.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        a, b = module.state_dict(), getattr(conv, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert conv.scheduler.config.prediction_type == orig.scheduler.config.prediction_type


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_converted_teacher_trains(family: str, tiny_teacher: Path, sdxl_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """The converted folder is a teacher the seed scripts take: a LoRA run of one step writes its LoRA."""
    teacher = tiny_teacher if family == "sd" else sdxl_teacher
    ldm = save_ldm(_pipe(teacher), tmp_path / "m.safetensors")
    cli.main(["convert", str(ldm), "--output_dir", str(tmp_path / "teacher"), "--config", str(teacher)])
    script, extra = ("train_tcd_distill_lora_sd_wds.py", ()) if family == "sd" else ("train_tcd_distill_lora_sdxl_wds.py", ("--min_image_size=0",))
    run_script(script, train_flags(tmp_path / "teacher", tiny_shards, tmp_path / "out", 1, *extra))
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_convert_lone_vae(tiny_teacher: Path, sdxl_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A lone VAE file (vae-ft-mse, sdxl_vae) converts to an AutoencoderKL folder: its weights bit-equal, its scaling
    factor --config's (a pipeline's vae/ or a VAE folder); without --config it is refused (diffusers would give any VAE
    file SD 1.5's scaling factor, wrong for an SDXL VAE), as is a --config holding another model's config."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tiny_teacher), subfolder="vae")
    f = save_ldm_vae(vae, tmp_path / "vae.safetensors")
    assert "is a lone VAE: pass --config" in _convert(capsys, f, "--output_dir", tmp_path / "x")
    assert "no VAE config in it or its vae/" in _convert(capsys, f, "--output_dir", tmp_path / "x", "--config", tiny_teacher / "unet")
    for config, out in ((sdxl_teacher, tmp_path / "xl"), (tiny_teacher / "vae", tmp_path / "sd")):
        cli.main(["convert", str(f), "--output_dir", str(out), "--config", str(config)])
        assert "--pretrained_vae_model_name_or_path" in capsys.readouterr().out
        conv = AutoencoderKL.from_pretrained(str(out))
        a, b = vae.state_dict(), conv.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        want = AutoencoderKL.load_config(str(config), subfolder="vae" if config == sdxl_teacher else None)["scaling_factor"]
        assert conv.config.scaling_factor == want
    assert AutoencoderKL.from_pretrained(str(tmp_path / "xl")).config.scaling_factor != vae.config.scaling_factor


def test_single_file_teacher_refused_naming_convert(sd_file: Path, tiny_teacher: Path, tiny_shards: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Before: training, cache, generate --base, eval --teacher, export --base and the VAE flags (training's
    --pretrained_vae_model_name_or_path, generate --vae) failed with "... is not a valid JSON file" (a config read of the
    weights file). Now each refuses it in one line naming `tcdistill convert`."""
    lora = make_lora(tiny_teacher, tmp_path / "lora")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    shards = ["--train_shards_path_or_url", tiny_shards]
    commands = {
        "--pretrained_teacher_model": [["train-lora", "--pretrained_teacher_model", sd_file, *shards, "--output_dir", tmp_path / "o",
                                        "--max_train_steps", "1", "--resolution", "32"],
                                       ["cache", "--pretrained_teacher_model", sd_file, *shards, "--output_dir", tmp_path / "c",
                                        "--resolution", "32"]],
        "--base": [["generate", "--lora", lora, "--base", sd_file, "--prompt", "x", "--output_dir", tmp_path / "g"],
                   ["export", "--lora", lora, "--base", sd_file, "--output", tmp_path / "k.safetensors"]],
        "--teacher": [["eval", "--teacher", sd_file, "--lora", lora, "--prompts", prompts]],
        "--pretrained_vae_model_name_or_path": [["train-lora", "--pretrained_teacher_model", tiny_teacher, *shards, "--output_dir",
                                                 tmp_path / "o", "--max_train_steps", "1", "--resolution", "32",
                                                 "--pretrained_vae_model_name_or_path", sd_file]],
        "--vae": [["generate", "--lora", lora, "--base", tiny_teacher, "--vae", sd_file, "--prompt", "x", "--output_dir", tmp_path / "g"]],
    }
    for flag, argvs in commands.items():
        for argv in argvs:
            with pytest.raises(SystemExit) as e:
                cli.main([str(a) for a in argv])
            msg = str(e.value.code) + capsys.readouterr().err
            assert f"{flag} {sd_file} is a single checkpoint file" in msg and "tcdistill convert" in msg, (argv[0], msg)
            assert len(msg.strip().splitlines()) == 1, msg
    assert not any(p.exists() for p in (tmp_path / "o", tmp_path / "c", tmp_path / "g", tmp_path / "k.safetensors"))


def test_convert_refusals(sd_file: Path, tiny_teacher: Path, sdxl_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Each way a conversion cannot work is one line before anything is written: a pickle file without the opt-in, a
    file that is no SD checkpoint, an output folder in use, a config of the other family, a file missing a weight
    (diffusers left it on the meta device without a word), a file of another architecture than --config (diffusers
    advised loading it with random weights), and no --config offline (diffusers' inferred hub repo)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "out"
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(_pipe(tiny_teacher))}, ckpt)
    assert "--allow_pickle_weights" in _convert(capsys, ckpt, "--output_dir", out, "--config", tiny_teacher)
    lora = make_lora(tiny_teacher, tmp_path / "lora") / "pytorch_lora_weights.safetensors"
    assert "holds no original-format Stable Diffusion UNet" in _convert(capsys, lora, "--output_dir", out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "exists and is not empty" in _convert(capsys, sd_file, "--output_dir", tmp_path / "full", "--config", tiny_teacher)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert "is a StableDiffusionXLPipeline but" in _convert(capsys, sd_file, "--output_dir", out, "--config", sdxl_teacher)
    with safe_open(str(sd_file), "pt") as f:
        partial = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("final_layer_norm.bias")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    assert "lacks 1 weight(s) of the text_encoder" in _convert(capsys, tmp_path / "partial.safetensors", "--output_dir", out,
                                                               "--config", tiny_teacher)
    inpaint = dict(pipeline_to_ldm(_pipe(tiny_teacher)))
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint[conv_in] = torch.cat([inpaint[conv_in]] * 2 + [inpaint[conv_in][:, :1]], 1)  # SD inpainting's 9 input channels
    save_file(inpaint, str(tmp_path / "inpaint.safetensors"))
    msg = _convert(capsys, tmp_path / "inpaint.safetensors", "--output_dir", out, "--config", tiny_teacher)
    assert "conv_in.weight expected shape" in msg and "pass the --config of the model" in msg and "randomly" not in msg
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    msg = _convert(capsys, sd_file, "--output_dir", out)
    assert "without --config" in msg and "pass --config with a local diffusers folder" in msg
    assert not out.exists()
    cli.main(["convert", str(ckpt), "--output_dir", str(out), "--config", str(tiny_teacher), "--allow_pickle_weights"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_convert_ema_file_takes_ema_weights_by_default(sd_file: Path, tiny_teacher: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A file holding EMA and training UNet weights (SD 1.5's v1-5-pruned: `model_ema.*`, dots dropped, with
    `model_ema.decay`): before, the teacher got the training weights (diffusers' default, its advice naming an
    `--extract_ema` flag convert lacks). Now the EMA weights, the published model's, unless --unet_weights non_ema; the
    output line says which, and the other keys of real files (position ids, `lora_*` leftovers) are ignored."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(sd_file), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    unet = [k for k in sd if k.startswith("model.diffusion_model.")]
    sd |= {"model_ema." + "".join(k.split(".")[1:]): sd[k] + 1 for k in unet}
    sd |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
           "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
           "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}
    save_file(sd, str(tmp_path / "v1-5-pruned.safetensors"))
    orig = _pipe(tiny_teacher).unet.state_dict()
    notices = logging.handlers.BufferingHandler(1000)  # diffusers' loggers do not propagate to caplog
    logging.getLogger("diffusers").addHandler(notices)
    for flag, shift, said in (((), 1, "the file's EMA weights"), (("--unet_weights", "non_ema"), 0, "non-EMA training weights")):
        out = tmp_path / f"out{shift}"
        cli.main(["convert", str(tmp_path / "v1-5-pruned.safetensors"), "--output_dir", str(out), "--config", str(tiny_teacher), *flag])
        assert said in capsys.readouterr().out
        conv = _pipe(out).unet.state_dict()
        assert all(torch.equal(conv[k], orig[k] + shift) for k in orig), flag
    logging.getLogger("diffusers").removeHandler(notices)
    assert notices.buffer and not any("extract_ema" in r.getMessage() for r in notices.buffer)


def test_convert_file_without_vae_takes_configs(sd_file: Path, tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A fine-tune shipped without a VAE (no `first_stage_model.*`): before, "Failed to load AutoencoderKL. Weights for this
    component appear to be missing". Now the teacher takes --config's VAE, which the output line says; without --config
    it is refused in one line naming --config."""
    from diffusers import AutoencoderKL
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(sd_file), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if not k.startswith("first_stage_model.")}, str(tmp_path / "novae.safetensors"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    msg = _convert(capsys, tmp_path / "novae.safetensors", "--output_dir", tmp_path / "x")
    assert "holds no VAE (first_stage_model.* weights): pass --config" in msg and len(msg.strip().splitlines()) == 1
    cli.main(["convert", str(tmp_path / "novae.safetensors"), "--output_dir", str(tmp_path / "out"), "--config", str(tiny_teacher)])
    assert "VAE from --config: the file holds none" in capsys.readouterr().out
    a = AutoencoderKL.from_pretrained(str(tiny_teacher), subfolder="vae").state_dict()
    b = AutoencoderKL.from_pretrained(str(tmp_path / "out"), subfolder="vae").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_lightning_ckpt(sd_file: Path, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The original SD `.ckpt` releases are Lightning checkpoints: beside `state_dict` they pickle the training callbacks,
    keyed by pytorch_lightning's ModelCheckpoint class. Before, with --allow_pickle_weights, "cannot be read as a checkpoint
    (Weights only load failed ...): a file cut short or damaged?". Now it converts, without Lightning installed, every
    weight as the .safetensors file's."""
    import types

    from safetensors.torch import load_file

    lightning = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = lightning.__name__, "ModelCheckpoint"
    lightning.ModelCheckpoint = ModelCheckpoint
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", lightning.__name__)
    for name in names:  # importable while it is saved only
        monkeypatch.setitem(sys.modules, name, lightning if name == lightning.__name__ else types.ModuleType(name))
    ckpt = tmp_path / "sd-v1-4.ckpt"
    torch.save({"state_dict": load_file(str(sd_file)), "global_step": 470000, "pytorch-lightning_version": "1.4.2",
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}}, ckpt)
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "nested" / "out"
    cli.main(["convert", str(ckpt), "--output_dir", str(out), "--config", str(tiny_teacher), "--allow_pickle_weights"])
    ref = tmp_path / "ref"
    cli.main(["convert", str(sd_file), "--output_dir", str(ref), "--config", str(tiny_teacher)])
    for sub in ("unet", "vae"):
        a = load_file(str(ref / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(out / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["out"]  # the scratch copy is gone


def test_a_ckpt_calling_a_function_reachable_from_torch_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: the Lightning `.ckpt` unpickler let every `torch.*` global load as itself, so a file naming `os.mkdir` through
    `torch.serialization` (a dotted name, pickle protocol 4) ran it with --allow_pickle_weights (before that unpickler,
    torch's weights_only load refused the file). Only what weights_only allows loads; the call meets an inert stand-in."""
    import zipfile

    ckpt, marker = tmp_path / "evil.ckpt", tmp_path / "ran"
    torch.save({"state_dict": {}}, ckpt)
    with zipfile.ZipFile(ckpt) as z:
        records = {n: z.read(n) for n in z.namelist()}
    arg = str(marker).encode()
    # os.mkdir(marker) via STACK_GLOBAL('torch.serialization', 'os.mkdir'), its result dropped, then {} as the checkpoint.
    payload = (b"\x80\x04\x8c\x13torch.serialization\x94\x8c\x08os.mkdir\x94\x93" + b"\x8c" + bytes([len(arg)]) + arg
               + b"\x94\x85R0}.")
    with zipfile.ZipFile(ckpt, "w", zipfile.ZIP_STORED) as z:
        for n, data in records.items():
            z.writestr(n, payload if n.endswith("/data.pkl") else data)
    msg = _convert(capsys, ckpt, "--output_dir", tmp_path / "out", "--allow_pickle_weights")
    assert not marker.exists()
    assert msg.startswith("tcdistill convert: error:") and len(msg.strip().splitlines()) == 1
