"""SD 2.x-style v-prediction teachers: both SD scripts train, resume, and produce outputs that sample in diffusers
with TCDScheduler (which takes prediction_type from the teacher's scheduler config)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import sample, train_and_resume  # noqa: E402

from tcdistill.export import LORA_WEIGHT_NAME  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tcdistill.tiny import shard_pattern, write_tiny_shards

    path = tmp_path_factory.mktemp("vpred_shards")
    write_tiny_shards(path, n_shards=2, per_shard=4, image_size=32, seed=1)
    return shard_pattern(path, 2)


def test_trainer_reads_v_prediction(vpred_teacher: Path, shards: str, tmp_path: Path) -> None:
    """The loss's schedule and the validation pipeline's TCDScheduler both take v_prediction from the teacher."""
    from tcdistill.config import TrainConfig
    from tcdistill.trainer import Trainer
    from tcdistill.validation import build_pipeline

    cfg = TrainConfig(pretrained_teacher_model=str(vpred_teacher), train_shards_path_or_url=shards, output_dir=str(tmp_path),
                      resolution=32, max_train_steps=1, variant="lora", lora_rank=4, report_to="none", mixed_precision="no")
    trainer = Trainer(cfg)
    assert trainer.schedule.prediction_type == "v_prediction"
    pipe = build_pipeline(trainer.family, trainer.strategy.student, cfg)
    assert type(pipe.scheduler).__name__ == "TCDScheduler" and pipe.scheduler.config.prediction_type == "v_prediction"


def test_vpred_full_trains_resumes_and_samples(vpred_teacher: Path, shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train_tcd_distill_sd_wds.py on a v-prediction teacher: 2 steps, resume to 3; the EMA UNet samples."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "out"
    train_and_resume("train_tcd_distill_sd_wds.py", vpred_teacher, shards, out, caplog)
    unet = UNet2DConditionModel.from_pretrained(out / "unet_target")
    assert unet.config.time_cond_proj_dim == 256
    pipe = StableDiffusionPipeline.from_pretrained(vpred_teacher, unet=unet)
    sample(pipe, guidance_scale=8.0)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert (out / "validation" / "ema-step000002.png").is_file() and (out / "README.md").is_file()


def test_vpred_lora_trains_resumes_and_samples(vpred_teacher: Path, shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train_tcd_distill_lora_sd_wds.py on a v-prediction teacher: 2 steps, resume to 3; the LoRA loads and samples."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    train_and_resume("train_tcd_distill_lora_sd_wds.py", vpred_teacher, shards, out, caplog, "--lora_rank=4")
    base = sample(StableDiffusionPipeline.from_pretrained(vpred_teacher))
    pipe = StableDiffusionPipeline.from_pretrained(vpred_teacher)
    pipe.load_lora_weights(out, weight_name=LORA_WEIGHT_NAME)
    assert np.abs(sample(pipe) - base).max() > 1e-3  # the trained adapters load and change the samples
    assert pipe.scheduler.config.prediction_type == "v_prediction"
