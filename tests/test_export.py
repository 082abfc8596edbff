"""Kohya-format LoRA export: key format, alpha = PEFT scale x rank, and samples equal to the diffusers file's."""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from test_sdxl import one_thread, sample  # noqa: E402,F401 - one_thread is an autouse fixture

from tcdistill.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, _peft_scale, export_kohya  # noqa: E402

RANK, ALPHA = 4, 8  # alpha != rank, so a converter that assumed scale 1 would give different samples


@pytest.fixture(scope="module")
def sd_teacher(tiny_teacher: Path) -> Path:
    """conftest's session-wide tiny SD teacher (default build_tiny_sd_pipeline), read-only here."""
    return tiny_teacher


def make_lora(teacher: Path, out: Path, rank: int = RANK, alpha: int = ALPHA, mixed_keys: bool = False) -> Path:
    """A LoRA with random (non-zero) up weights, saved the way LoraStrategy.save_outputs saves one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tcdistill.config import TrainConfig

    modules = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s", max_train_steps=1).lora_modules
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    with torch.random.fork_rng(devices=[]):  # the same adapter on every call, caller's RNG untouched
        torch.manual_seed(0)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    layers = get_peft_model_state_dict(unet)
    if mixed_keys:  # the older layout: attention projections renamed to `.lora.down/.lora.up`
        layers = convert_state_dict_to_diffusers(layers)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return out


def test_kohya_keys_and_alpha(sd_teacher: Path, tmp_path: Path) -> None:
    """Every diffusers pair becomes lora_unet_<module>.lora_down/lora_up with alpha = lora_alpha (scale alpha / rank)."""
    src = load_file(make_lora(sd_teacher, tmp_path) / LORA_WEIGHT_NAME)
    dst = load_file(export_kohya(tmp_path))
    key_re = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(key_re.match(k) for k in dst), [k for k in dst if not key_re.match(k)][:3]
    modules = {k.split(".")[0] for k in dst}
    assert len(modules) == len(src) // 2 and len(dst) == 3 * len(modules)
    assert {float(dst[f"{m}.alpha"]) for m in modules} == {float(ALPHA)}
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(dst[f"{name}.lora_down.weight"], src[f"{prefix}.lora_A.weight"])
    assert torch.equal(dst[f"{name}.lora_up.weight"], src[f"{prefix}.lora_B.weight"])
    # Readable by others under the usual umask (safetensors 0.8 alone writes 0600).
    old_mask = os.umask(0o022)
    try:
        os.chmod(export_kohya(tmp_path), 0o600)  # (a re-export replaces the file and its mode)
        assert stat.S_IMODE(os.stat(export_kohya(tmp_path)).st_mode) == 0o644
    finally:
        os.umask(old_mask)
    # Outputs saved in the older mixed-key layout export to the same kohya file.
    mixed = load_file(export_kohya(make_lora(sd_teacher, tmp_path / "mixed", mixed_keys=True)))
    assert mixed.keys() == dst.keys() and all(torch.equal(mixed[k], dst[k]) for k in dst)


def test_kohya_file_samples_like_diffusers_file(sd_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`tcdistill export --lora DIR` writes a file that diffusers' loader reads as kohya and samples identically."""
    from diffusers import StableDiffusionPipeline

    from tcdistill.cli import main

    make_lora(sd_teacher, tmp_path)
    main(["export", "--lora", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / KOHYA_WEIGHT_NAME)
    base = sample(StableDiffusionPipeline.from_pretrained(sd_teacher))
    outs = []
    for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = StableDiffusionPipeline.from_pretrained(sd_teacher)
        pipe.load_lora_weights(tmp_path, weight_name=name)
        outs.append(sample(pipe))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    assert np.abs(outs[0] - base).max() > 1e-2


def test_peft_scale_variants() -> None:
    """Scale = alpha / r, or alpha / sqrt(r) with rsLoRA; alpha_pattern overrides; no metadata means scale 1."""
    assert _peft_scale("down_blocks.0.x", 4, {}) == 1.0
    assert _peft_scale("down_blocks.0.x", 4, {"lora_alpha": 8}) == 2.0
    assert _peft_scale("down_blocks.0.x", 4, {"lora_alpha": 8, "use_rslora": True}) == 4.0
    conf = {"lora_alpha": 8, "alpha_pattern": {"to_q": 2}}
    assert _peft_scale("mid_block.attentions.0.to_q", 4, conf) == 0.5
    assert _peft_scale("mid_block.attentions.0.to_k", 4, conf) == 2.0


def test_export_rejects_bad_input(sd_teacher: Path, tmp_path: Path) -> None:
    """A missing file or a non-LoRA safetensors file is a one-line error (exit 2), not a traceback."""
    from tcdistill.export import main

    with pytest.raises(SystemExit) as exc:
        main(["--lora", str(tmp_path / "nothing")])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="not a diffusers UNet LoRA"):
        export_kohya(sd_teacher / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "x.safetensors")


def test_export_refuses_to_overwrite_its_input_or_a_folder(sd_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: --output equal to the input would replace the diffusers LoRA by the kohya copy; --output a folder and a
    file that is not safetensors gave tracebacks (and a left-over .tmp file). All three are one-line errors now."""
    from tcdistill.export import main

    out = make_lora(sd_teacher, tmp_path / "lora")
    src = out / LORA_WEIGHT_NAME
    before = src.read_bytes()
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    for argv, needle in (([str(out), "--output", str(src)], "is the input file"), ([str(out), "--output", str(tmp_path)], "is a directory"),
                         ([str(tmp_path / "junk.safetensors")], "cannot read")):
        with pytest.raises(SystemExit) as exc:
            main(["--lora", *argv])
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert src.read_bytes() == before and not list(tmp_path.glob(".*tmp-*"))
