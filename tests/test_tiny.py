"""Fast tests for the tiny offline SD pipeline, tokenizer and webdataset shards."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tcdistill.tiny import build_tiny_sd_pipeline, build_tiny_tokenizer, shard_pattern, write_tiny_shards

CAPTION_RE = re.compile(r"^a (\w+) (circle|square|triangle) on a (\w+) background$")


def test_tokenizer_round_trip_and_padding(tmp_path: Path) -> None:
    """The tokenizer pads to max_length and survives save_pretrained/from_pretrained (with subfolder)."""
    from transformers import CLIPTokenizer

    tok = build_tiny_tokenizer(tmp_path / "raw", model_max_length=16)
    assert (tmp_path / "raw" / "vocab.json").is_file() and (tmp_path / "raw" / "merges.txt").is_file()
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.bos_token == "<|startoftext|>"
    text = "a red circle on a blue background"
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 16
    assert ids[0] == tok.bos_token_id
    # A merge was applied, so this is genuinely BPE and not byte-per-token.
    assert "red</w>" in tok.convert_ids_to_tokens(ids)
    assert text.startswith(tok.decode(ids, skip_special_tokens=True))  # truncated prefix of the text
    short = tok("a red square", padding="max_length", max_length=16).input_ids
    assert len(short) == 16 and short[-1] == tok.pad_token_id
    assert tok.decode(short, skip_special_tokens=True) == "a red square"

    tok.save_pretrained(tmp_path / "model" / "tokenizer")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "model", subfolder="tokenizer")
    assert loaded.model_max_length == 16
    assert len(loaded) == len(tok)
    assert loaded.pad_token_id == tok.pad_token_id
    assert loaded(text, padding="max_length", max_length=16, truncation=True).input_ids == ids
    # The directory build_tiny_tokenizer wrote loads directly as well.
    direct = CLIPTokenizer.from_pretrained(tmp_path / "raw")
    assert direct.model_max_length == 16 and direct(text).input_ids == tok(text).input_ids


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {
            "prediction_type": "v_prediction",
            "max_length": 77,
            "sample_size": 8,
            "block_out_channels": (16, 32, 48),
            "cross_attention_dim": 24,
            "vae_block_out_channels": (8, 16, 16),
            "seed": 3,
        },
    ],
    ids=["default-eps", "v-pred-77-3level"],
)
def test_pipeline_save_load_and_sample(tmp_path: Path, kwargs: dict) -> None:
    """The pipeline saves, reloads whole and per component, and samples 2 steps at the right size."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        TCDScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    rng_before = torch.get_rng_state()
    pipe = build_tiny_sd_pipeline(tmp_path, **kwargs)
    assert torch.equal(rng_before, torch.get_rng_state())  # caller's RNG untouched

    max_length = kwargs.get("max_length", 16)
    sample_size = kwargs.get("sample_size", 16)
    n_vae = len(kwargs.get("vae_block_out_channels", (16, 32)))
    assert pipe.vae_scale_factor == 2 ** (n_vae - 1)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.tokenizer.model_max_length == max_length
    assert pipe.scheduler.config.prediction_type == kwargs.get("prediction_type", "epsilon")
    # set_alpha_to_one travels in the config to schedulers that use it (TCD).
    assert TCDScheduler.from_config(pipe.scheduler.config).config.set_alpha_to_one is False
    assert pipe.scheduler.config.steps_offset == 1

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet"), UNet2DConditionModel)
    assert isinstance(AutoencoderKL.from_pretrained(tmp_path, subfolder="vae"), AutoencoderKL)
    assert isinstance(CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder"), CLIPTextModel)
    tok = CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer")
    assert tok.model_max_length == max_length and tok.pad_token == "<|endoftext|>"
    sched = DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert sched.config.beta_schedule == "scaled_linear"

    h = sample_size * loaded.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    out = loaded("a red square", num_inference_steps=2, height=h, width=h, output_type="np", generator=gen)
    assert out.images.shape == (1, h, h, 3)
    assert np.isfinite(out.images).all()


def test_pipeline_deterministic_from_seed() -> None:
    """Same seed gives the same weights; a different seed gives different ones."""
    a = build_tiny_sd_pipeline(block_out_channels=(16, 32), vae_block_out_channels=(8, 16), seed=1)
    b = build_tiny_sd_pipeline(block_out_channels=(16, 32), vae_block_out_channels=(8, 16), seed=1)
    c = build_tiny_sd_pipeline(block_out_channels=(16, 32), vae_block_out_channels=(8, 16), seed=2)
    wa, wb, wc = (p.unet.conv_in.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_shards_readable_by_webdataset(tmp_path: Path) -> None:
    """Shards decode with webdataset into jpg+txt samples of the requested size and count."""
    import webdataset as wds

    paths = write_tiny_shards(tmp_path, n_shards=3, per_shard=5, image_size=24, seed=7)
    assert paths == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]
    pattern = shard_pattern(tmp_path, 3)
    assert pattern == f"{tmp_path}/{{00000..00002}}.tar"

    samples = list(wds.WebDataset(pattern, shardshuffle=False).decode("pil"))
    assert len(samples) == 15
    keys = {s["__key__"] for s in samples}
    assert len(keys) == 15
    for s in samples:
        assert {"jpg", "txt"} <= s.keys()
        assert s["jpg"].size == (24, 24) and s["jpg"].mode == "RGB"
        m = CAPTION_RE.match(s["txt"])
        assert m is not None and m.group(1) != m.group(3)
    # Procedural, so the captions should not all be identical.
    assert len({s["txt"] for s in samples}) > 1


def test_shards_deterministic_nonsquare_png(tmp_path: Path) -> None:
    """Same seed -> same content; image_size=(h, w) gives non-square images; other extensions work."""
    import webdataset as wds

    a = write_tiny_shards(tmp_path / "a", n_shards=1, per_shard=4, image_size=(16, 40), seed=1, ext="png")
    b = write_tiny_shards(tmp_path / "b", n_shards=1, per_shard=4, image_size=(16, 40), seed=1, ext="png")

    def contents(path: str) -> dict[str, bytes]:
        with tarfile.open(path) as tf:
            return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}

    assert contents(a[0]) == contents(b[0])
    samples = list(wds.WebDataset(shard_pattern(tmp_path / "a", 1), shardshuffle=False).decode("pil"))
    assert len(samples) == 4
    assert all(s["png"].size == (40, 16) for s in samples)  # PIL size is (width, height)
