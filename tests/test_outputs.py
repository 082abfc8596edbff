"""The trained outputs work in plain diffusers the way the README's users will load them (TCDScheduler sampling)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import PROMPT, check_ok, run_train, seed_flags

from tcdistill.export import LORA_WEIGHT_NAME

pytestmark = pytest.mark.usefixtures("one_thread")
LORA_KEY = re.compile(r"^unet\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


@pytest.fixture(scope="module")
def lora_run(tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README LoRA command at lr 1e-3 for 3 steps, so the adapters move measurably away from B = 0."""
    out = tmp_path_factory.mktemp("lora_lr1e-3") / "out"
    flags = seed_flags("lora", teacher=tiny_teacher, shards=tiny_shards, output_dir=out, learning_rate=1e-3,
                       validation_steps=0, checkpointing_steps=3)
    check_ok(run_train("lora", flags, run_env))
    return out


def _pipeline(teacher: Path, **kw: Any) -> Any:
    from diffusers import StableDiffusionPipeline, TCDScheduler

    pipe = StableDiffusionPipeline.from_pretrained(teacher, **kw)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe: Any, steps: int, guidance_scale: float) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(1234)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance_scale, eta=0.3, generator=gen, output_type="np").images


def test_full_unet_target_samples_with_tcd(full_seed_run: dict[str, Any], tiny_teacher: Path) -> None:
    """`unet=UNet2DConditionModel.from_pretrained(out/'unet_target')` in the teacher's pipeline samples in 2 and 4 steps."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(full_seed_run["out"] / "unet_target")
    pipe = _pipeline(tiny_teacher, unet=unet)
    images = {}
    for steps, grid in ((2, [999, 499]), (4, [999, 759, 499, 259])):
        images[steps] = _sample(pipe, steps, guidance_scale=8.0)  # embedded as w = 7 through time_cond_proj_dim
        assert pipe.scheduler.timesteps.tolist() == grid  # the training grid (original_inference_steps = 50)
        assert images[steps].shape == (1, 32, 32, 3)
        assert np.isfinite(images[steps]).all() and 0.0 <= images[steps].min() and images[steps].max() <= 1.0
    assert not np.array_equal(images[2], images[4])


def test_lora_loads_fuses_and_changes_samples(lora_run: Path, tiny_teacher: Path) -> None:
    """`load_lora_weights(out_dir)` takes the file as is, every tensor lands in the UNet, fuse_lora keeps the function."""
    pipe = _pipeline(tiny_teacher)
    base = _sample(pipe, 4, guidance_scale=0.0)
    pipe.load_lora_weights(lora_run, weight_name=LORA_WEIGHT_NAME)

    # Every tensor of the file is in the UNet with the trained scaling (diffusers loads partial files silently).
    cfg = json.loads((lora_run / "tcdistill_config.json").read_text())
    state = safetensors.torch.load_file(lora_run / "pytorch_lora_weights.safetensors")
    (adapter,) = pipe.unet.peft_config
    modules = dict(pipe.unet.named_modules())
    for key, tensor in state.items():
        m = LORA_KEY.match(key)
        assert m, key
        layer = modules[m["module"]]
        assert torch.equal(getattr(layer, f"lora_{m['ab']}")[adapter].weight, tensor), key
        assert layer.scaling[adapter] == pytest.approx(cfg["lora_alpha"] / cfg["lora_rank"]), key
    lora_modules = {name for name, mod in modules.items() if adapter in getattr(mod, "lora_A", {})}
    assert lora_modules == {LORA_KEY.match(k)["module"] for k in state}
    assert any(".attn1.to_q" in name for name in lora_modules) and any(".conv1" in name for name in lora_modules)

    with_lora = _sample(pipe, 4, guidance_scale=0.0)
    pipe.fuse_lora()
    fused = _sample(pipe, 4, guidance_scale=0.0)
    assert np.isfinite(fused).all() and fused.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(fused, with_lora, atol=1e-4)  # fusing folds B A into W without changing the model
    # Training moved the sample: the LoRA's effect is far above float noise (the fuse tolerance above).
    assert np.abs(with_lora - base).max() > 100 * 1e-4
