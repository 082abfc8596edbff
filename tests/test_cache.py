"""`tcdistill cache` and training from cached shards: the cache holds the VAE posterior and prompt embeddings of the
pixel path, the loss from a cached batch equals the loss from pixels under the same seed, and the seed scripts
train from the cache without the VAE encoder or the text encoder (budget: ~60 s on 2 cores)."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import CACHE_RES, cache_trainer, check_ok, make_cache, run_train, seed_flags

from tcdistill.config import ConfigError, TrainConfig
from tcdistill.data_cached import META_NAME, UNCOND_NAME, read_sidecar
from tcdistill.export import LORA_WEIGHT_NAME
from tcdistill.tiny import shard_pattern


def _read_tar(path: str) -> dict[str, dict[str, np.ndarray | str]]:
    """key -> {member ext: array or text} of a cached shard."""
    out: dict[str, dict[str, Any]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            data = tar.extractfile(m).read()
            out.setdefault(key, {})[ext] = np.load(io.BytesIO(data)) if ext.endswith(".npy") else data.decode()
    return out


def test_cache_holds_vae_posterior_and_prompt_embeddings(tiny_teacher: Path, one_shard: str, fp32_cache: str) -> None:
    """Per key: latents = posterior mean x scaling, latents_std = posterior std x scaling, embeddings = text encoder."""
    from diffusers import AutoencoderKL

    from tcdistill.cache import _OnePass
    from tcdistill.data import DataConfig
    from tcdistill.families import SDFamily

    cached = _read_tar(fp32_cache)
    assert len(cached) == 4
    meta, uncond = read_sidecar(fp32_cache)
    assert meta["num_samples"] == 4 and meta["resolution"] == CACHE_RES and meta["cond_keys"] == ["encoder_hidden_states"]
    vae = AutoencoderKL.from_pretrained(tiny_teacher, subfolder="vae").eval()
    fam = SDFamily.load(TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=one_shard, max_train_steps=1))
    src = _OnePass(DataConfig(train_shards_path_or_url=one_shard, resolution=CACHE_RES, center_crop=True, seed=0))
    seen = 0
    for key, sample in src.read_once(src.urls[0], Counter()):
        with torch.no_grad():
            dist = vae.encode(sample["pixel_values"][None]).latent_dist
            ehs = fam.encode({"captions": [sample["caption"]]}, torch.device("cpu"))["encoder_hidden_states"][0]
        sf = vae.config.scaling_factor
        got = cached[key]
        assert got["txt"] == sample["caption"]
        np.testing.assert_allclose(got["latents.npy"], (dist.mean[0] * sf).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["latents_std.npy"], (dist.std[0] * sf).numpy(), rtol=1e-5, atol=1e-7)
        assert got["latents_std.npy"].min() > 0  # a real posterior: training still samples x0
        np.testing.assert_allclose(got["encoder_hidden_states.npy"], ehs.numpy(), rtol=1e-5, atol=1e-6)
        seen += 1
    assert seen == 4
    with torch.no_grad():
        empty = fam.encode({"captions": [""]}, torch.device("cpu"))["encoder_hidden_states"]
    torch.testing.assert_close(uncond["encoder_hidden_states"], empty)
    torch.testing.assert_close(uncond["empty.encoder_hidden_states"], empty)  # SD: "" is the unconditional prompt
    assert meta["uncond_from_cond"] == []


def test_loss_from_cache_equals_loss_from_pixels(tiny_teacher: Path, one_shard: str, fp32_cache: str, tmp_path: Path) -> None:
    """Same seed: the cached batch draws the same VAE noise, (t, t_n, s), w and eps, so the TCD loss agrees to float precision."""
    losses = _loss_pixels_vs_cached(cache_trainer(tiny_teacher, one_shard, tmp_path / "out"), one_shard, fp32_cache)
    assert losses["cached"] == pytest.approx(losses["pixels"], rel=1e-4, abs=1e-7)
    # The tolerance is far tighter than what a different draw changes.
    assert abs(losses["cached_other_seed"] - losses["pixels"]) > 100 * abs(losses["cached"] - losses["pixels"])


def _loss_pixels_vs_cached(trainer: Any, shards: str, cached: str) -> dict[str, float]:
    """Loss of the first 4-sample batch from pixels and from the cache, same seed (and cached with another seed)."""
    from tcdistill.data import DataConfig, build_train_dataloader
    from tcdistill.data_cached import build_cached_dataloader

    common = dict(resolution=CACHE_RES, train_batch_size=4, center_crop=True, seed=0)
    # One shard of 4 samples and a batch of 4: both loaders return the whole shard, in tar order.
    pixel_batch = next(iter(build_train_dataloader(DataConfig(train_shards_path_or_url=shards, **common))))
    cached_batch = next(iter(build_cached_dataloader(DataConfig(train_shards_path_or_url=cached, **common))))
    assert pixel_batch["captions"] == cached_batch["captions"]
    losses = {}
    for name, batch, seed in (("pixels", pixel_batch, 0), ("cached", cached_batch, 0), ("cached_other_seed", cached_batch, 1)):
        torch.manual_seed(seed)
        with torch.no_grad():
            losses[name] = trainer.train_step(batch)[0].item()
    return losses


def test_sdxl_cache_keeps_per_sample_time_ids_and_the_loss(one_shard: str, tmp_path: Path) -> None:
    """SDXL: time ids stay per sample (the unconditional pass reuses them), zeros are the stored unconditional
    embeddings, the encoding of "" is stored for empty-prompt dropout, and the loss matches the pixel path."""
    from tcdistill.tiny import build_tiny_sdxl_pipeline

    teacher = tmp_path / "sdxl"
    build_tiny_sdxl_pipeline(teacher)
    # the filters of the trainer below (TrainConfig's own defaults; the SDXL scripts' 700 px would drop these 32 px images)
    cached = make_cache(teacher, one_shard, tmp_path / "cache", "--storage_dtype", "fp32", "--model_family", "sdxl",
                    "--min_image_size", "0", "--max_pwatermark", "1")
    meta, uncond = read_sidecar(cached)
    assert meta["uncond_from_cond"] == ["time_ids"] and "time_ids" not in uncond
    assert not uncond["encoder_hidden_states"].any() and not uncond["text_embeds"].any()
    assert uncond["empty.encoder_hidden_states"].any()
    losses = _loss_pixels_vs_cached(cache_trainer(teacher, one_shard, tmp_path / "out", model_family="sdxl"), one_shard, cached)
    assert losses["cached"] == pytest.approx(losses["pixels"], rel=1e-4, abs=1e-7)
    assert abs(losses["cached_other_seed"] - losses["pixels"]) > 100 * abs(losses["cached"] - losses["pixels"])
    # The cached time ids were made without --use_fix_crop_and_size: training with it is refused, not silently ignored.
    with pytest.raises(ConfigError, match="use_fix_crop_and_size"):
        cache_trainer(teacher, "", tmp_path / "out2", train_shards_path_or_url=None, train_latents_path_or_url=cached, model_family="sdxl",
                 use_fix_crop_and_size=True)


def test_seed_scripts_train_from_cache(tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Default fp16 cache -> 2 steps of each seed script from --train_latents_path_or_url; no encoder runs in the step."""
    from diffusers import AutoencoderKL

    from tcdistill.cli import train_main
    from tcdistill.families import SDFamily

    cache_dir = tmp_path / "cache"
    make_cache(tiny_teacher, tiny_shards, cache_dir)
    assert (cache_dir / META_NAME).is_file() and (cache_dir / UNCOND_NAME).is_file()
    latents = shard_pattern(cache_dir, 2)
    over = dict(train_shards_path_or_url=None, train_latents_path_or_url=latents, max_train_steps=2, validation_steps=0,
                checkpointing_steps=2, report_to="none", use_8bit_adam=None, gradient_checkpointing=None,
                enable_xformers_memory_efficient_attention=None)
    # The full-model script as a user runs it (subprocess).
    out = tmp_path / "full"
    check_ok(run_train("full", seed_flags("full", teacher=tiny_teacher, shards=tiny_shards, output_dir=out, **over), run_env))
    assert (out / "unet_target" / "config.json").is_file() and (out / "checkpoint-2").is_dir()

    # The LoRA script's entry point in-process, with the VAE encoder and the text encoder booby-trapped.
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("an encoder ran in a step trained from cached latents")

    monkeypatch.setattr(AutoencoderKL, "encode", boom)
    monkeypatch.setattr(SDFamily, "_encode_text", boom)
    out = tmp_path / "lora"
    train_main("lora", seed_flags("lora", teacher=tiny_teacher, shards=tiny_shards, output_dir=out, **over))
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_fp16_cache_batches_are_fp32_and_run_under_cpu_bf16_autocast() -> None:
    """An fp16-stored cache is cast to fp32 in the loader's collate: a bf16 CPU autocast rejects a cat of fp16
    tensors (the batched teacher's cond+uncond), which is what a bf16 run from an fp16 cache used to hit."""
    from tcdistill.data_cached import collate_cached
    from tcdistill.tcd import cat_cond

    samples = [dict(latents=torch.zeros(4, 2, 2), latents_std=None, caption="a", skipped={},
                    cond={"encoder_hidden_states": torch.randn(3, 8).half()}) for _ in range(2)]
    batch = collate_cached(samples, {"encoder_hidden_states": torch.randn(1, 3, 8).half()})
    assert batch["cond"]["encoder_hidden_states"].dtype == torch.float32
    assert batch["uncond"]["encoder_hidden_states"].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        both = cat_cond(batch["cond"], batch["uncond"])
    assert both["encoder_hidden_states"].shape == (4, 3, 8)


def test_cache_defaults_follow_the_family_scripts() -> None:
    """Unset --resolution/--min_image_size/--max_pwatermark take the family's training-script defaults (SDXL: 1024 px,
    700, 0.5), so a cache made with the defaults holds what the SDXL scripts' defaults would train on."""
    from tcdistill.cache import build_parser, fill_family_defaults

    base = ["--pretrained_teacher_model", "t", "--train_shards_path_or_url", "s", "--output_dir", "o"]
    for family, want in (("sd", (512, 0, 1.0)), ("sdxl", (1024, 700, 0.5))):
        args = build_parser().parse_args([*base, "--model_family", family])
        fill_family_defaults(args)
        assert (args.resolution, args.min_image_size, args.max_pwatermark) == want
    args = build_parser().parse_args([*base, "--model_family", "sdxl", "--min_image_size", "0", "--resolution", "512"])
    fill_family_defaults(args)
    assert (args.resolution, args.min_image_size, args.max_pwatermark) == (512, 0, 0.5)


def test_sdxl_cache_with_fp16_encoding_keeps_the_vae_fp32(sdxl_teacher: Path, one_shard: str, tmp_path: Path) -> None:
    """QA: `tcdistill cache --model_family sdxl --encode_dtype fp16` (the natural choice on a GPU) crashed in the first
    batch ("Input type (c10::Half) and bias type (float) should be the same"): SDXL's VAE stays fp32 under fp16 (its
    `force_upcast`, as in training) but the pixels were cast to fp16. The pixels follow the VAE's own dtype, as training
    encodes them; the latents equal those of an fp32 encode, and the text embeddings come from the fp16 encoders."""
    caches = {dtype: _read_tar(make_cache(sdxl_teacher, one_shard, tmp_path / dtype, "--model_family", "sdxl", "--encode_dtype", dtype,
                                      "--storage_dtype", "fp32", "--min_image_size", "0", "--max_pwatermark", "1"))
              for dtype in ("fp32", "fp16")}
    assert caches["fp16"].keys() == caches["fp32"].keys() and len(caches["fp16"]) == 4
    for key, want in caches["fp32"].items():
        got = caches["fp16"][key]
        for member in ("latents.npy", "latents_std.npy", "time_ids.npy"):  # the VAE ran in fp32 both times
            np.testing.assert_array_equal(got[member], want[member])
        np.testing.assert_allclose(got["encoder_hidden_states.npy"], want["encoder_hidden_states.npy"], rtol=0.02, atol=0.02)


def test_sdxl_time_ids_are_cached_exactly_in_an_fp16_cache(sdxl_teacher: Path, tmp_path: Path) -> None:
    """QA: the default fp16 cache stored SDXL's time ids in fp16, which holds integers exactly only up to 2048: an
    original width of 2051 px was cached as 2052 (and 2053 as 2052), so the cached micro-conditioning (sinusoidally
    embedded per pixel) was not what the live path computes from the same image. They are stored in fp32."""
    from shards_util import image_bytes, solid, write_shard

    from tcdistill.data import DataConfig, build_train_dataloader
    from tcdistill.families import load_family

    # 33 px high: resized to 32 x ~2000, so the crop's left edge is past 2048 too (under --center_crop: 978, 979).
    shard = write_shard(tmp_path / "wide.tar", [(f"k{i}", {"png": image_bytes(solid("RGB", (2051 + 2 * i, 33), (200, 30, 30)), "PNG"),
                                                        "txt": "a wide red band"}) for i in range(2)])
    cached = _read_tar(make_cache(sdxl_teacher, shard, tmp_path / "cache", "--model_family", "sdxl", "--min_image_size", "0",
                              "--max_pwatermark", "1"))
    cfg = TrainConfig(pretrained_teacher_model=str(sdxl_teacher), train_shards_path_or_url=shard, max_train_steps=1,
                      model_family="sdxl", resolution=CACHE_RES, center_crop=True)
    live = next(iter(build_train_dataloader(DataConfig(train_shards_path_or_url=shard, resolution=CACHE_RES, center_crop=True,
                                                       train_batch_size=2, seed=0))))
    want = load_family(cfg).time_ids(live, torch.device("cpu"))
    assert want[:, 1].tolist() == [2051, 2053]
    got = torch.from_numpy(np.stack([cached[k]["time_ids.npy"] for k in ("k0", "k1")]))
    assert torch.equal(got.float(), want), (got, want)
    assert cached["k0"]["latents.npy"].dtype == np.float16  # the rest keeps the storage dtype


def test_sdxl_cache_with_fix_crop_and_size(sdxl_teacher: Path, one_shard: str, tmp_path: Path) -> None:
    """SDXL --use_fix_crop_and_size through the cache: the cached time ids are (R, R, 0, 0, R, R) whatever the image's size
    and crop (here 48x40 px, center-cropped at top 3), the run with the flag accepts the cache, and its loss equals the
    live path's under the same flag; a run without the flag is refused (the cached time ids cannot change)."""
    cached = make_cache(sdxl_teacher, one_shard, tmp_path / "cache", "--storage_dtype", "fp32", "--model_family", "sdxl",
                    "--min_image_size", "0", "--max_pwatermark", "1", "--use_fix_crop_and_size")
    meta, uncond = read_sidecar(cached)
    assert meta["use_fix_crop_and_size"] is True and meta["uncond_from_cond"] == ["time_ids"] and "time_ids" not in uncond
    rows = [v["time_ids.npy"].tolist() for v in _read_tar(cached).values()]
    assert rows == [[CACHE_RES, CACHE_RES, 0, 0, CACHE_RES, CACHE_RES]] * 4, rows
    trainer = cache_trainer(sdxl_teacher, "", tmp_path / "out", train_shards_path_or_url=None, train_latents_path_or_url=cached,
                       model_family="sdxl", use_fix_crop_and_size=True)
    assert trainer.family.vae.encoder is None  # the cache was accepted
    live = cache_trainer(sdxl_teacher, one_shard, tmp_path / "live", model_family="sdxl", use_fix_crop_and_size=True)
    losses = _loss_pixels_vs_cached(live, one_shard, cached)
    assert losses["cached"] == pytest.approx(losses["pixels"], rel=1e-4, abs=1e-7)
    assert abs(losses["cached_other_seed"] - losses["pixels"]) > 100 * abs(losses["cached"] - losses["pixels"])
    with pytest.raises(ConfigError, match="use_fix_crop_and_size"):
        cache_trainer(sdxl_teacher, "", tmp_path / "out2", train_shards_path_or_url=None, train_latents_path_or_url=cached,
                 model_family="sdxl")


def test_proportion_empty_prompts_in_a_cached_run(sdxl_teacher: Path, one_shard: str, tmp_path: Path) -> None:
    """--proportion_empty_prompts from the cache: a dropped caption gets the encoding of "" the live path computes (SDXL:
    prompt states and pooled embeddings; each sample keeps its own time ids), at the asked rate."""
    from itertools import islice

    from tcdistill.data import DataConfig
    from tcdistill.data_cached import build_cached_dataloader
    from tcdistill.families import load_family

    cached = make_cache(sdxl_teacher, one_shard, tmp_path / "cache", "--storage_dtype", "fp32", "--model_family", "sdxl",
                    "--min_image_size", "0", "--max_pwatermark", "1")
    family = load_family(TrainConfig(pretrained_teacher_model=str(sdxl_teacher), train_shards_path_or_url=one_shard,
                                     max_train_steps=1, model_family="sdxl", resolution=CACHE_RES))
    common = dict(train_shards_path_or_url=cached, resolution=CACHE_RES, train_batch_size=4, seed=0)
    kept = next(iter(build_cached_dataloader(DataConfig(**common))))
    dropped = next(iter(build_cached_dataloader(DataConfig(**common, proportion_empty_prompts=1.0))))
    assert dropped["captions"] == [""] * 4 and "" not in kept["captions"]
    live = family.encode(dict(captions=[""] * 4), torch.device("cpu"))
    for key in ("encoder_hidden_states", "text_embeds"):
        torch.testing.assert_close(dropped["cond"][key], live[key], rtol=1e-5, atol=1e-6)
        assert not torch.equal(dropped["cond"][key], kept["cond"][key])
    torch.testing.assert_close(dropped["cond"]["time_ids"], kept["cond"]["time_ids"])
    torch.testing.assert_close(dropped["uncond"], kept["uncond"])  # the unconditional pass is unchanged (zeros, own time ids)
    torch.testing.assert_close(dropped["latents"], kept["latents"])
    n = 200
    caps = [c for b in islice(iter(build_cached_dataloader(DataConfig(**common, proportion_empty_prompts=0.3))), n // 4)
            for c in b["captions"]]
    empty = sum(c == "" for c in caps) / len(caps)
    assert abs(empty - 0.3) <= 4 * (0.3 * 0.7 / n) ** 0.5, empty  # Bernoulli(p) per sample (4 sigma)


def test_resumed_cached_run_continues_the_stream_exactly(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """A run from cached latents resumed from its step-2 checkpoint logs the same losses for steps 3..5 as the run that
    went on (data position, the per-step posterior draw and the empty-prompt draws all continue)."""
    import json
    import shutil

    from accelerate.state import AcceleratorState

    cache = tmp_path / "cache"
    make_cache(tiny_teacher, tiny_shards, cache)  # the default fp16 storage
    kw = dict(train_shards_path_or_url=None, train_latents_path_or_url=shard_pattern(cache, 2), train_batch_size=3,
              max_train_steps=5, checkpointing_steps=2, validation_steps=0, dataloader_num_workers=1, proportion_empty_prompts=0.3,
              learning_rate=1e-3)

    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    cache_trainer(tiny_teacher, "", tmp_path / "a", **kw).train()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    AcceleratorState._reset_state(True)
    cache_trainer(tiny_teacher, "", tmp_path / "b", resume_from_checkpoint="latest", **kw).train()
    ref, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(got) == [3, 4, 5] and len(set(ref.values())) == 5
    assert got == {s: ref[s] for s in got}, (got, ref)


@pytest.mark.usefixtures("fresh_accelerator_state")
@pytest.mark.parametrize("variant", ["full", "lora"])
def test_sdxl_bf16_run_from_a_bf16_encoded_cache(variant: str, sdxl_teacher: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 end to end on CPU through the cache: an SDXL cache encoded in bf16 (stored fp16), 2 steps of the SDXL script
    with --gradient_checkpointing and validation; the validation images are finite, the outputs are stored in fp32 (the
    student's master weights) and load in diffusers."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from tcdistill.cli import train_main
    from tcdistill.tiny import write_tiny_shards

    write_tiny_shards(tmp_path / "src", n_shards=1, per_shard=4, image_size=32, seed=1)
    cached = make_cache(sdxl_teacher, shard_pattern(tmp_path / "src", 1), tmp_path / "cache", "--model_family", "sdxl",
                    "--encode_dtype", "bf16", "--min_image_size", "0", "--max_pwatermark", "1")
    finite: list[bool] = []
    call = StableDiffusionXLPipeline.__call__

    def checked(self: Any, *a: Any, **k: Any) -> Any:
        out = call(self, *a, **k)
        finite.append(bool(np.isfinite(out.images).all()))
        return out

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", checked)
    out = tmp_path / "out"
    train_main(variant, ["--pretrained_teacher_model", str(sdxl_teacher), "--output_dir", str(out), "--train_latents_path_or_url",
                         cached, "--resolution", str(CACHE_RES), "--center_crop", "--mixed_precision", "bf16", "--gradient_checkpointing",
                         "--train_batch_size", "2", "--max_train_steps", "2", "--validation_steps", "2", "--validation_prompts",
                         "a red circle", "--validation_inference_steps", "2", "--report_to", "none", "--seed", "0",
                         "--min_image_size", "0", "--max_pwatermark", "1", *(["--lora_rank", "4"] if variant == "lora" else [])],
               family="sdxl")
    assert finite == ([True, True] if variant == "full" else [True])  # full: online and EMA
    files = ([out / d / "diffusion_pytorch_model.safetensors" for d in ("unet", "unet_target")] if variant == "full"
             else [out / "pytorch_lora_weights.safetensors"])
    for f in files:
        assert {v.dtype for v in load_file(f).values()} == {torch.float32}, f
    if variant == "full":
        assert UNet2DConditionModel.from_pretrained(out / "unet_target").config.time_cond_proj_dim == 256
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_teacher)
        pipe.load_lora_weights(out, weight_name=LORA_WEIGHT_NAME)
        assert pipe.get_list_adapters() == {"unet": ["default_0"]}


def test_the_printed_train_flags_fit_the_cache(sdxl_teacher: Path, one_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: `tcdistill cache` ended with "train with: --train_latents_path_or_url=... --resolution=N" only, so a user who
    followed it after caching with --use_fix_crop_and_size was refused, and one who cached with --center_crop,
    --random_flip or other filters got "has no effect" warnings. The printed flags now carry what the cache fixed, and a
    run of the SDXL scripts' defaults plus them accepts the cache without a warning."""
    import logging
    import shlex

    from tcdistill.config import parse_config
    from tcdistill.data_cached import prepare_cached_training
    from tcdistill.families import flag_defaults, load_family

    monkeypatch.chdir(sdxl_teacher.parent)  # the teacher given relative: recorded absolute, as training records it
    cached = make_cache(Path(sdxl_teacher.name), one_shard, tmp_path / "cache", "--model_family", "sdxl", "--random_flip",
                    "--use_fix_crop_and_size", "--min_image_size", "0", "--max_pwatermark", "1", "--interpolation_type", "bicubic")
    assert read_sidecar(cached)[0]["teacher"] == str(sdxl_teacher)
    hint = capsys.readouterr().out.splitlines()[-1]
    assert hint.startswith("train with: ")
    flags = shlex.split(hint[len("train with: "):])
    cfg = parse_config([*flags, f"--pretrained_teacher_model={sdxl_teacher.name}", f"--output_dir={tmp_path / 'out'}", "--max_train_steps=1",
                        "--report_to=none"], defaults={**flag_defaults("sdxl"), "variant": "full", "model_family": "sdxl"})
    with caplog.at_level(logging.WARNING, logger="tcdistill"):
        prepare_cached_training(cfg, load_family(cfg))
    assert not [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage() or "Cache was made" in r.getMessage()]
    assert (cfg.center_crop, cfg.random_flip, cfg.use_fix_crop_and_size, cfg.interpolation_type) == (True, True, True, "bicubic")
