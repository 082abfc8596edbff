"""SDXL through the one training loop: the family adapter, the tiny SDXL teacher, the data filters, and both SDXL
entry scripts training, resuming and producing outputs that load and sample in diffusers."""

from __future__ import annotations

import dataclasses
import json
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # shards_util lives next to this file

from conftest import PROMPT, run_script, sample, train_and_resume  # noqa: E402
from shards_util import image_bytes, solid, write_shard  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tcdistill.tiny import shard_pattern, write_tiny_shards

    path = tmp_path_factory.mktemp("sdxl_shards")
    write_tiny_shards(path, n_shards=2, per_shard=4, image_size=(32, 40), seed=0)  # non-square: real crops
    return shard_pattern(path, 2)


def test_tiny_sdxl_layout(sdxl_teacher: Path) -> None:
    """The tiny teacher has SDXL's conditioning layout and an SDXL scheduler config; it loads as SDXL."""
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    pipe = DiffusionPipeline.from_pretrained(sdxl_teacher)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    u, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert u.addition_embed_type == "text_time"
    assert u.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert u.projection_class_embeddings_input_dim == te2.projection_dim + 6 * u.addition_time_embed_dim
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.vae.config.force_upcast
    sample(pipe)


def test_family_matches_sdxl_pipeline(sdxl_teacher: Path) -> None:
    """encode() equals the pipeline's encode_prompt; time ids follow the batch or --use_fix_crop_and_size; uncond is zeros."""
    from tcdistill.config import TrainConfig
    from tcdistill.families import SDXLFamily

    cfg = TrainConfig(pretrained_teacher_model=str(sdxl_teacher), train_shards_path_or_url="x.tar", resolution=32,
                      max_train_steps=1, model_family="sdxl")
    fam = SDXLFamily.load(cfg)
    batch = {"captions": [PROMPT, ""], "original_sizes": torch.tensor([[40, 50], [32, 32]]),
             "crop_top_lefts": torch.tensor([[3, 7], [0, 0]])}
    cond = fam.encode(batch, torch.device("cpu"))
    embeds, _, pooled, _ = fam.pipeline(fam.unet, fam.noise_scheduler).encode_prompt(
        [PROMPT, ""], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["text_embeds"], pooled)
    assert cond["time_ids"].tolist() == [[40, 50, 3, 7, 32, 32], [32, 32, 0, 0, 32, 32]]
    unc = fam.uncond(batch, torch.device("cpu"))
    assert unc["encoder_hidden_states"].shape == embeds.shape and not unc["encoder_hidden_states"].any()
    assert unc["text_embeds"].shape == pooled.shape and not unc["text_embeds"].any()
    assert torch.equal(unc["time_ids"], cond["time_ids"])
    fam.fix_crop_and_size = True
    assert fam.time_ids(batch, torch.device("cpu")).tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    # Under fp16 SDXL's own VAE stays fp32 (it overflows in fp16); text encoders take the weight dtype.
    fam.to(torch.device("cpu"), torch.float16)
    assert fam.vae.dtype == torch.float32 and fam.text_encoder_2.dtype == torch.float16


def _teacher_copy(src: Path, dst: Path, edit: dict[str, dict]) -> Path:
    """A copy of a teacher folder with json fields changed: {relative json path: {field: value}}."""
    import shutil

    shutil.copytree(src, dst)
    for rel, fields in edit.items():
        f = dst / rel
        f.write_text(json.dumps({**json.loads(f.read_text()), **fields}))
    return dst


def _config_only_cfg(sdxl_teacher: Path, dst: Path, edit: dict[str, dict]):  # -> TrainConfig
    """The SDXL config of a `_teacher_copy` without weight files (a weights load would fail with another message)."""
    from tcdistill.config import TrainConfig

    teacher = _teacher_copy(sdxl_teacher, dst, edit)
    for f in teacher.glob("*/*.safetensors"):
        f.unlink()
    return TrainConfig(pretrained_teacher_model=str(teacher), train_shards_path_or_url="x.tar", resolution=32,
                       max_train_steps=1, model_family="sdxl")


def test_uncond_follows_force_zeros_for_empty_prompt(sdxl_teacher: Path, tmp_path: Path) -> None:
    """A teacher with force_zeros_for_empty_prompt false guides with the encoding of "" (its pipeline's negative
    prompt), not zeros; the validation pipeline keeps the teacher's setting."""
    from diffusers import StableDiffusionXLPipeline

    from tcdistill.config import TrainConfig
    from tcdistill.families import SDXLFamily

    teacher = _teacher_copy(sdxl_teacher, tmp_path / "t", {"model_index.json": {"force_zeros_for_empty_prompt": False}})
    cfg = TrainConfig(pretrained_teacher_model=str(teacher), train_shards_path_or_url="x.tar", resolution=32,
                      max_train_steps=1, model_family="sdxl")
    fam = SDXLFamily.load(cfg)
    batch = {"captions": [PROMPT, PROMPT], "original_sizes": torch.tensor([[40, 50], [32, 32]]),
             "crop_top_lefts": torch.tensor([[3, 7], [0, 0]])}
    unc = fam.uncond(batch, torch.device("cpu"))
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher)
    _, neg, _, neg_pooled = pipe.encode_prompt([PROMPT, PROMPT], device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True)
    assert neg.abs().sum() > 0  # the teacher's negative prompt is not zeros
    torch.testing.assert_close(unc["encoder_hidden_states"], neg)
    torch.testing.assert_close(unc["text_embeds"], neg_pooled)
    assert unc["time_ids"].tolist() == [[40, 50, 3, 7, 32, 32], [32, 32, 0, 0, 32, 32]]
    assert fam.pipeline(fam.unet, fam.noise_scheduler).config.force_zeros_for_empty_prompt is False


@pytest.mark.parametrize("index, zeros", [(None, True), ({}, True), ({"force_zeros_for_empty_prompt": False}, False)])
def test_force_zeros_defaults_to_the_sdxl_pipelines(index: dict | None, zeros: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An SDXL model_index.json without force_zeros_for_empty_prompt (or none readable) guides with zeros, as
    StableDiffusionXLPipeline's own default does."""
    from tcdistill import families

    monkeypatch.setattr(families, "teacher_index", lambda cfg: index)
    assert families.sdxl_force_zeros(None) is zeros


@pytest.mark.parametrize("embed, family", [(None, "sd"), ("text", "sd"), ("text_time", "sdxl")])
def test_only_text_time_conditioning_makes_an_sdxl_unet(embed: str | None, family: str) -> None:
    """An SD UNet with a text addition embedding (fed from the prompt states alone) is not an SDXL one."""
    from tcdistill.families import unet_family

    assert unet_family({"addition_embed_type": embed}) == family


@pytest.mark.parametrize("passed", [False, True])
@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_keeps_a_force_upcast_vae_fp32(sdxl_teacher: Path, tmp_path: Path, passed: bool, force_upcast: bool) -> None:
    """Under fp16 a VAE whose config sets force_upcast (SDXL's own, which overflows in fp16) stays fp32, as the SDXL pipeline
    upcasts it; the fp16-fix VAE (force_upcast false) runs in fp16. QA: a --pretrained_vae_model_name_or_path was taken as
    fp16-safe whatever its config said, so a passed copy of SDXL's own VAE (stabilityai/sdxl-vae) encoded in fp16."""
    import shutil

    from tcdistill.config import TrainConfig
    from tcdistill.families import SDXLFamily

    teacher = sdxl_teacher
    vae = tmp_path / "vae"
    shutil.copytree(sdxl_teacher / "vae", vae)
    conf = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**conf, "force_upcast": force_upcast}))
    if not passed:  # the teacher's own VAE says it
        teacher = tmp_path / "teacher"
        shutil.copytree(sdxl_teacher, teacher, ignore=shutil.ignore_patterns("vae"))
        shutil.copytree(vae, teacher / "vae")
    cfg = TrainConfig(pretrained_teacher_model=str(teacher), train_shards_path_or_url="x.tar", resolution=32, max_train_steps=1,
                      model_family="sdxl", pretrained_vae_model_name_or_path=str(vae) if passed else None)
    fam = SDXLFamily.load(cfg)
    fam.to(torch.device("cpu"), torch.float16)
    assert next(fam.vae.parameters()).dtype == (torch.float32 if force_upcast else torch.float16)
    assert next(fam.text_encoder_2.parameters()).dtype == torch.float16


def test_validation_decodes_an_fp32_vae_in_fp32_under_fp16_autocast(sdxl_teacher: Path) -> None:
    """QA: validation samples under the run's autocast; under fp16 the SDXL VAE kept fp32 (force_upcast) still decoded
    with fp16 convs there, where SDXL's VAE overflows (black validation grids, diffusers issues 4325, 5209)."""
    from tcdistill.config import TrainConfig
    from tcdistill.families import SDXLFamily
    from tcdistill.validation import build_pipeline, sample_grid

    cfg = TrainConfig(pretrained_teacher_model=str(sdxl_teacher), train_shards_path_or_url="x.tar", resolution=16, max_train_steps=1,
                      model_family="sdxl", variant="lora")
    fam = SDXLFamily.load(cfg)
    fam.to(torch.device("cpu"), torch.float16)
    assert fam.vae.dtype == torch.float32
    seen: list[torch.dtype] = []
    fam.vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    pipe = build_pipeline(fam, fam.unet.to(torch.float16), cfg)
    pipe.set_progress_bar_config(disable=True)
    with torch.autocast("cpu", dtype=torch.float16):
        rows = sample_grid(pipe, [PROMPT], [1], 0.0, 0.3, 0, 16)
    assert seen == [torch.float32] and rows[0][0].shape == (16, 16, 3)
    assert "decode" not in vars(fam.vae)  # the fp32 decode is undone after sampling


def test_tokenizers_of_unequal_length_refused(sdxl_teacher: Path, tmp_path: Path) -> None:
    """Tokenizers padding to different lengths cannot be concatenated per token: one ConfigError before any weights load."""
    from tcdistill.config import ConfigError
    from tcdistill.teacher_checks import check_teacher_config

    cfg = _config_only_cfg(sdxl_teacher, tmp_path / "t", {"tokenizer_2/tokenizer_config.json": {"model_max_length": 8}})
    # shorter, not longer: past text_encoder_2's 16 positions it is refused for that first
    with pytest.raises(ConfigError, match=r"tokenizer_2 pad to different lengths \(16, 8\)"):
        check_teacher_config(cfg)


def test_refiner_layout_refused(sdxl_teacher: Path, tmp_path: Path) -> None:
    """A refiner-style teacher (only text_encoder_2) is refused from model_index.json in one line, before any load."""
    from tcdistill.config import ConfigError, TrainConfig
    from tcdistill.teacher_checks import check_teacher_config

    teacher = _teacher_copy(sdxl_teacher, tmp_path / "t", {"model_index.json": {
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None], "tokenizer": [None, None]}})
    cfg = TrainConfig(pretrained_teacher_model=str(teacher), train_shards_path_or_url="x.tar", resolution=32,
                      max_train_steps=1, model_family="sdxl")
    with pytest.raises(ConfigError, match="has no tokenizer, text_encoder: SDXL distillation needs both"):
        check_teacher_config(cfg)
    check_teacher_config(dataclasses.replace(cfg, pretrained_teacher_model=str(sdxl_teacher)))  # the full layout passes


def test_text_encoder_2_without_projection_refused(sdxl_teacher: Path, tmp_path: Path) -> None:
    """A text_encoder_2 saved as CLIPTextModel has no text projection: it loaded as CLIPTextModelWithProjection with a
    randomly initialised one and trained on it silently (diffusers' pipeline and `generate` fail on that teacher)."""
    from tcdistill.config import ConfigError, TrainConfig
    from tcdistill.teacher_checks import check_teacher_config

    teacher = _teacher_copy(sdxl_teacher, tmp_path / "t", {"model_index.json": {"text_encoder_2": ["transformers", "CLIPTextModel"]}})
    cfg = TrainConfig(pretrained_teacher_model=str(teacher), train_shards_path_or_url="x.tar", resolution=32,
                      max_train_steps=1, model_family="sdxl")
    with pytest.raises(ConfigError, match="text_encoder_2 is a CLIPTextModel \\(model_index.json\\), which has no text projection"):
        check_teacher_config(cfg)


def test_aesthetic_score_unet_refused(sdxl_teacher: Path, tmp_path: Path) -> None:
    """A UNet whose added conditioning takes five time ids (a refiner's aesthetic score) or another pooled width than
    text_encoder_2 projects to: one line before any load (it was a matmul shape traceback in the first step)."""
    from tcdistill.config import ConfigError
    from tcdistill.teacher_checks import check_teacher_config

    cfg = _config_only_cfg(sdxl_teacher, tmp_path / "t", {"unet/config.json": {"projection_class_embeddings_input_dim": 16 + 5 * 8}})
    with pytest.raises(ConfigError, match=r"projection_class_embeddings_input_dim=56.* = 64; it expects 5 time ids \(a refiner"):
        check_teacher_config(cfg)


def test_vae_latent_channels_must_match_unet(sdxl_teacher: Path, tmp_path: Path) -> None:
    """--pretrained_vae_model_name_or_path with another latent width than the UNet takes: one line before any load
    (it was a conv traceback in the first step)."""
    from diffusers import AutoencoderKL

    from tcdistill.config import ConfigError, TrainConfig
    from tcdistill.teacher_checks import check_teacher_config

    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=8).save_pretrained(tmp_path / "vae")
    cfg = TrainConfig(pretrained_teacher_model=str(sdxl_teacher), train_shards_path_or_url="x.tar", resolution=32,
                      max_train_steps=1, model_family="sdxl", pretrained_vae_model_name_or_path=str(tmp_path / "vae"))
    with pytest.raises(ConfigError, match="has 8 latent channels but the teacher's UNet takes 4 input channels"):
        check_teacher_config(cfg)


def test_sdxl_script_defaults(capsys: pytest.CaptureFixture) -> None:
    """The SDXL scripts default to 1024 px, w_min 3 and the 700 px / pwatermark 0.5 filters."""
    from tcdistill.config import parse_config
    from tcdistill.families import SDXL_FLAG_DEFAULTS

    cfg = parse_config(["--pretrained_teacher_model=t", "--train_shards_path_or_url=s", "--max_train_steps=1"], defaults=SDXL_FLAG_DEFAULTS)
    assert (cfg.resolution, cfg.w_min, cfg.w_max, cfg.min_image_size, cfg.max_pwatermark) == (1024, 3.0, 15.0, 700, 0.5)
    with pytest.raises(SystemExit) as exc:
        run_script("train_tcd_distill_lora_sdxl_wds.py", ["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1024)" in text and "(default: 700)" in text and "--use_fix_crop_and_size" in text


def _filter_shard(path: Path) -> str:
    """Samples covering the filter cases at a 30 px threshold; each caption names the case."""
    small = image_bytes(solid("RGB", (40, 24), (10, 200, 10)), "JPEG")
    big = image_bytes(solid("RGB", (48, 48), (10, 200, 10)), "JPEG")

    def meta(**kw) -> str:
        return json.dumps(kw)

    return write_shard(path, [
        ("a", {"jpg": big, "txt": "keep: json sizes pass", "json": meta(original_width=900, original_height=800, pwatermark=0.1)}),
        ("b", {"jpg": big, "txt": "drop: json short side", "json": meta(original_width=900, original_height=20, pwatermark=0.1)}),
        ("c", {"jpg": big, "txt": "drop: watermark", "json": meta(original_width=900, original_height=800, pwatermark=0.9)}),
        ("d", {"jpg": big, "txt": "keep: no json, decoded 48 px"}),
        ("e", {"jpg": small, "txt": "drop: no json, decoded 24 px"}),
        ("f", {"jpg": big, "txt": "keep: null fields", "json": meta(original_width=None, pwatermark=None)}),
        ("g", {"jpg": big, "txt": "keep: unreadable json", "json": "{not json"}),
        ("h", {"jpg": big, "txt": "drop: json size wins over decoded", "json": meta(original_width=20, original_height=20)}),
        ("i", {"jpg": big, "txt": "keep: pwatermark at the limit", "json": meta(original_width=900, original_height=800, pwatermark=0.5)}),
    ])


def test_size_and_watermark_filters(tmp_path: Path) -> None:
    """json original_width/height and pwatermark filter like diffusers' SDXL script; missing fields fall back/pass."""
    from shards_util import within

    from tcdistill.data import DataConfig, DataError, build_train_dataloader

    shard = _filter_shard(tmp_path / "f.tar")
    # A 30 px threshold stands in for SDXL's 700 so the decoded-size fallback can be tested with small images.
    cfg = DataConfig(train_shards_path_or_url=shard, resolution=16, train_batch_size=4, seed=0, min_image_size=30,
                     max_pwatermark=0.5, failure_patience=50)
    batches = list(islice(iter(build_train_dataloader(cfg)), 4))
    caps = {c for b in batches for c in b["captions"]}
    assert caps == {"keep: json sizes pass", "keep: no json, decoded 48 px", "keep: null fields", "keep: unreadable json",
                    "keep: pwatermark at the limit"}
    kinds = {k for b in batches for k in b["skipped"]}
    assert {"too_small", "watermark"} <= kinds
    # A dataset that the filters empty stops with a data error instead of hanging (reference defect 4).
    cfg.min_image_size, cfg.failure_patience = 10_000, 10
    with within(60), pytest.raises(DataError, match="too_small"):
        next(iter(build_train_dataloader(cfg)))


def test_sdxl_full_trains_resumes_and_samples(sdxl_teacher: Path, shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train_tcd_distill_sdxl_wds.py: 2 steps, resume to 3; the EMA UNet samples in StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    out = tmp_path / "out"
    train_and_resume("train_tcd_distill_sdxl_wds.py", sdxl_teacher, shards, out, caplog, "--min_image_size=0")
    unet = UNet2DConditionModel.from_pretrained(out / "unet_target")
    assert unet.config.time_cond_proj_dim == 256 and unet.config.addition_embed_type == "text_time"
    sample(StableDiffusionXLPipeline.from_pretrained(sdxl_teacher, unet=unet), guidance_scale=8.0)
    assert {p.name for p in (out / "validation").iterdir()} == {"online-step000002.png", "ema-step000002.png"}
    card = (out / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and "validation/ema-step000002.png" in card
    assert "--min_image_size=0" in card and "--w_min" not in card  # flags listed against the SDXL script's defaults


def test_sdxl_lora_trains_resumes_and_loads(sdxl_teacher: Path, shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """train_tcd_distill_lora_sdxl_wds.py with --use_fix_crop_and_size and --export_kohya: both LoRA files load alike."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    train_and_resume("train_tcd_distill_lora_sdxl_wds.py", sdxl_teacher, shards, out, caplog, "--min_image_size=0",
                     "--lora_rank=4", "--use_fix_crop_and_size", "--export_kohya")
    base = sample(StableDiffusionXLPipeline.from_pretrained(sdxl_teacher))
    outs = []
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_teacher)
        pipe.load_lora_weights(out, weight_name=name)
        outs.append(sample(pipe))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    assert np.abs(outs[0] - base).max() > 1e-3  # the adapters are loaded and matter
    assert "load_lora_weights" in (out / "README.md").read_text()
