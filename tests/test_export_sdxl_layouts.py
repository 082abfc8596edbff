"""QA (fuzz): kohya SDXL LoRA files of UNets laid out unlike SDXL's. `tcdistill export` names their modules after the
original (sgm) UNet, but diffusers maps those names back assuming SDXL's own layout, so `generate`/`eval --lora FILE`
failed with a traceback or a bare KeyError line, or loaded without some modules: refused in one line naming the layout,
while the run's diffusers file loads."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_lora  # noqa: E402

from tcdistill.export import LORA_WEIGHT_NAME, export_kohya, load_unet_lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("unet, message", [
    # diffusers computes `layers_per_block + 1`: "can only concatenate list (not "int") to list" traceback
    (dict(layers_per_block=[1, 2]), r"one layers_per_block on every level \(this UNet's is \[1, 2\]\)"),
    # block N's keys are gathered by substring, so input_blocks.1 took 10's: "'lora_unet_input_blocks_10_0_emb_layers_1.alpha'"
    (dict(layers_per_block=5), r"at most 10 input blocks \(this UNet has 12; diffusers reads the keys of input_blocks.10 as "
                               r"input_blocks.1's\)"),
    # output_blocks.N.1.conv (the upsampler of an up block without cross-attention) was mapped to an attention module that
    # does not exist, with a warning only: the LoRA loaded without that upsampler's adapter, sampling unlike the diffusers file
    (dict(block_out_channels=[32, 32, 64], down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
          up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
     r"upsamplers only in cross-attention up blocks \(this UNet's up block 1, a UpBlock2D, has one\)"),
])
def test_kohya_sdxl_file_diffusers_cannot_map_back_is_refused(unet: dict, message: str, sdxl_teacher: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    teacher, run = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(sdxl_teacher, teacher)
    UNet2DConditionModel.from_config({**UNet2DConditionModel.load_config(teacher, subfolder="unet"), **unet}).save_pretrained(teacher / "unet")
    make_lora(teacher, run)
    (run / "tcdistill_config.json").write_text(json.dumps({"model_family": "sdxl", "pretrained_teacher_model": str(teacher)}))
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher)
    with pytest.raises(ValueError, match=r"^cannot load the LoRA .*kohya.safetensors onto the base: its kohya keys name the original "
                                         rf"SDXL UNet's blocks, which diffusers maps back only for SDXL's layout: {message}; load "
                                         r"the diffusers file pytorch_lora_weights.safetensors of its training output instead$"):
        load_unet_lora(pipe, export_kohya(run), "the base")
    assert load_unet_lora(pipe, run, "the base") == run / LORA_WEIGHT_NAME
