"""--clip_skip end to end: prompt states equal to diffusers' `encode_prompt(..., clip_skip=N)` (SD and SDXL), its range
and cache refusals, and a LoRA trained with it that `tcdistill generate` samples as diffusers does with `clip_skip=N`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPT, cache_trainer, make_cache, make_lora, run_script, saved_tiny_pipeline, train_flags
from PIL import Image

from tcdistill.config import ConfigError, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
PROMPTS = [PROMPT, ""]  # "" as --proportion_empty_prompts puts it in


def shim_sd_pipeline_clip_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """StableDiffusionPipeline's clip_skip reads `text_encoder.text_model.final_layer_norm`, which transformers >= 5.6's
    flattened CLIPTextModel lacks (diffusers issue 14124): give the reference pipeline that path (the model itself)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    probe = CLIPTextModel(CLIPTextConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                                         vocab_size=8, max_position_embeddings=4))
    if not hasattr(probe, "text_model"):
        monkeypatch.setattr(CLIPTextModel, "text_model", property(lambda self: self), raising=False)


@pytest.mark.parametrize("n", [1, 2])
def test_sd_states_equal_the_pipelines_clip_skip(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The family's conditioning and unconditional prompt under --clip_skip N: the pipeline's encode_prompt(clip_skip=N),
    to 0 (the encoding of "" too, which training takes with the same N)."""
    from tcdistill.families import SDFamily
    from tcdistill.prompts import sd_prompt_states
    from tcdistill.tiny import build_tiny_sd_pipeline

    shim_sd_pipeline_clip_skip(monkeypatch)
    pipe = build_tiny_sd_pipeline(text_layers=4)
    fam = SDFamily(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler, clip_skip=n)
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=n)
    cond = fam.encode({"captions": PROMPTS}, CPU)["encoder_hidden_states"]
    assert torch.equal(cond, ref)
    empty, _ = pipe.encode_prompt([""], "cpu", 1, False, clip_skip=n)
    assert torch.equal(fam.uncond({"captions": PROMPTS}, CPU)["encoder_hidden_states"], empty.expand_as(ref))
    assert not torch.allclose(cond, sd_prompt_states(pipe.tokenizer, pipe.text_encoder, PROMPTS, CPU))  # another layer


@pytest.mark.parametrize("n", [1, 2])
def test_sdxl_states_equal_the_pipelines_clip_skip(n: int) -> None:
    """Both encoders' states N layers before the penultimate, pooled unchanged: encode_prompt(clip_skip=N) to 0; without
    force_zeros_for_empty_prompt the unconditional prompt is the encoding of "" under the same N."""
    from tcdistill.families import SDXLFamily
    from tcdistill.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    parts = dict(tokenizers=(pipe.tokenizer, pipe.tokenizer_2), text_encoders=(pipe.text_encoder, pipe.text_encoder_2),
                 vae=pipe.vae, unet=pipe.unet, noise_scheduler=pipe.scheduler, resolution=32, force_zeros_for_empty_prompt=False)
    fam, plain = SDXLFamily(**parts, clip_skip=n), SDXLFamily(**parts)
    batch = {"captions": PROMPTS, "original_sizes": torch.tensor([[32, 32]] * 2), "crop_top_lefts": torch.zeros(2, 2)}
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                              clip_skip=n)
    cond = fam.encode(batch, CPU)
    assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["text_embeds"], pooled)
    assert torch.equal(cond["text_embeds"], plain.encode(batch, CPU)["text_embeds"])
    assert not torch.allclose(cond["encoder_hidden_states"], plain.encode(batch, CPU)["encoder_hidden_states"])
    unc = fam.uncond(batch, CPU)
    embeds, _, pooled, _ = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                              clip_skip=n)  # alone, as the family encodes it (a batch shifts the last bit)
    assert torch.equal(unc["encoder_hidden_states"], embeds.expand(2, -1, -1)) and torch.equal(unc["text_embeds"], pooled.expand(2, -1))


def test_sdxl_sampling_under_clip_skip_takes_trainings_negative_prompt() -> None:
    """QA: with CFG, an SDXL pipeline whose empty prompt is not zeros encoded its negative "" at the default layer whatever
    its clip_skip, while training's unconditional prompt is "" at the run's layer (generate --guidance_scale > 1 on a
    LoRA). `pipeline_prompts` passes training's; under force_zeros_for_empty_prompt the pipeline's zeros are training's."""
    from tcdistill.families import SDXLFamily
    from tcdistill.prompts import pipeline_prompts
    from tcdistill.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen: list[dict] = []
    pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    batch = {"captions": PROMPTS, "original_sizes": torch.tensor([[32, 32]] * 2), "crop_top_lefts": torch.zeros(2, 2)}
    for zeros in (False, True):
        pipe.register_to_config(force_zeros_for_empty_prompt=zeros)
        fam = SDXLFamily(tokenizers=(pipe.tokenizer, pipe.tokenizer_2), text_encoders=(pipe.text_encoder, pipe.text_encoder_2),
                         vae=pipe.vae, unet=pipe.unet, noise_scheduler=pipe.scheduler, resolution=32,
                         force_zeros_for_empty_prompt=zeros, clip_skip=1)
        seen.clear()
        pipe(**pipeline_prompts(pipe, PROMPTS, 1), guidance_scale=3.0, num_inference_steps=1, height=32, width=32,
             output_type="latent")
        kw, cond, unc = seen[0], fam.encode(batch, CPU), fam.uncond(batch, CPU)  # the UNet's batch: negatives, then prompts
        assert torch.equal(kw["encoder_hidden_states"], torch.cat([unc["encoder_hidden_states"], cond["encoder_hidden_states"]]))
        assert torch.equal(kw["added_cond_kwargs"]["text_embeds"], torch.cat([unc["text_embeds"], cond["text_embeds"]]))


def test_clip_skip_out_of_range_is_one_line_before_weights_load(config_only_teacher: Path, tiny_shards: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """N < 1 as a flag error; N >= the text encoder's layers (the tiny teacher has 2) before any weights load (the teacher
    here has none), in training, `tcdistill cache`, `generate` and `eval` alike."""
    from tcdistill.cli import main

    with pytest.raises(ConfigError, match=r"^--clip_skip must be >= 1 .*got 0\.$"):
        TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="x.tar", max_train_steps=1, clip_skip=0)
    line = f"--clip_skip 2: the text_encoder of {config_only_teacher} has 2 layers; clip skip must be in [1, 1] (a hidden state before its last layer)."
    with pytest.raises(ConfigError, match=f"^{re.escape(line)}$"):
        cache_trainer(config_only_teacher, tiny_shards, tmp_path / "out", clip_skip=2)
    with pytest.raises(SystemExit, match=f"^tcdistill cache: error: {re.escape(line)}$"):
        make_cache(config_only_teacher, tiny_shards, tmp_path / "cache", "--clip_skip", "2")
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--lora", str(lora), "--base", str(config_only_teacher), "--prompt", "a", "--clip_skip", "2",
              "--device", "cpu", "--output_dir", str(tmp_path / "gen")])
    assert exc.value.code == 2 and not (tmp_path / "gen").exists()
    assert capsys.readouterr().err.splitlines() == [f"tcdistill generate: error: {line}"]
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(SystemExit, match=f"^tcdistill eval: error: {re.escape(line)}$"):
        main(["eval", "--teacher", str(config_only_teacher), "--lora", str(lora), "--prompts", str(tmp_path / "p.txt"),
              "--clip_skip", "2"])
    # generate/eval take 0 (none: the last layer), so their floor is 0, said so; the same check as training's.
    floor = "--clip_skip must be >= 0 (layers skipped before the last; 0: none, the last layer), got -1."
    with pytest.raises(SystemExit):
        main(["generate", "--lora", str(lora), "--base", str(config_only_teacher), "--prompt", "a", "--clip_skip", "-1",
              "--device", "cpu", "--output_dir", str(tmp_path / "gen")])
    assert capsys.readouterr().err.splitlines() == [f"tcdistill generate: error: {floor}"]
    with pytest.raises(SystemExit, match=f"^tcdistill eval: error: {re.escape(floor)}$"):
        main(["eval", "--teacher", str(config_only_teacher), "--lora", str(lora), "--prompts", str(tmp_path / "p.txt"),
              "--clip_skip", "-1"])


def test_a_cache_made_with_another_clip_skip_is_refused(tiny_teacher: Path, config_only_teacher: Path, one_shard: str,
                                                        tmp_path: Path) -> None:
    """The cache records its clip skip; training with another value (or none) is refused in one line before any weights
    load (the teacher here has none: the refusal came after the teacher load), the same one runs."""
    shard = make_cache(tiny_teacher, one_shard, tmp_path / "cache", "--clip_skip", "1", "--storage_dtype", "fp32")
    meta = json.loads((tmp_path / "cache" / "tcdistill_cache.json").read_text())
    assert meta["clip_skip"] == 1
    with pytest.raises(ConfigError, match=r"^--clip_skip unset: the cache's prompt states were made with clip skip 1; pass "
                                          r"--clip_skip 1 or re-run `tcdistill cache` without --clip_skip\.$"):
        cache_trainer(config_only_teacher, "", tmp_path / "a", train_shards_path_or_url=None, train_latents_path_or_url=shard)
    assert not (tmp_path / "a").exists()  # refused before the output folder is made, too
    trainer = cache_trainer(tiny_teacher, "", tmp_path / "b", train_shards_path_or_url=None, train_latents_path_or_url=shard,
                            clip_skip=1)
    assert trainer.family.clip_skip == 1


def test_a_lora_trained_with_clip_skip_samples_as_diffusers_with_it(tiny_shards: str, tmp_path_factory: pytest.TempPathFactory,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short LoRA run with --clip_skip 2 records it (run record, model card); `tcdistill generate` (and `eval`) sample
    with it by default, equal to diffusers' pipeline with the LoRA and clip_skip=2; --clip_skip overrides it."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    from tcdistill.cli import main
    from safetensors import safe_open

    from tcdistill.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME

    teacher = saved_tiny_pipeline(tmp_path_factory, "clip_skip_teacher", text_layers=3)
    out = tmp_path / "run"
    run_script("train_tcd_distill_lora_sd_wds.py", [*train_flags(teacher, tiny_shards, out, 2, "--clip_skip=2"), "--lora_rank=4",
                                                    "--export_kohya"])
    assert json.loads((out / "tcdistill_config.json").read_text())["clip_skip"] == 2
    with safe_open(str(out / KOHYA_WEIGHT_NAME), framework="pt") as fh:  # kohya's count: hidden_states[-3]
        assert fh.metadata()["ss_clip_skip"] == "3"
    card = (out / "README.md").read_text()
    assert "height=32, width=32, clip_skip=2, num_inference_steps" in card and "--clip_skip=2" in card
    assert "in A1111 \"Clip skip\" 3, in ComfyUI CLIPSetLastLayer -3." in card  # their count: hidden_states[-3]
    assert (out / "validation" / "lora-step000002.png").is_file()  # validation sampled through pipeline_prompts
    args = ["generate", "--lora", str(out), "--prompt", "a red square", "--steps", "2", "--seed", "5", "--device", "cpu"]
    main([*args, "--output_dir", str(tmp_path / "g")])
    main([*args, "--clip_skip", "1", "--output_dir", str(tmp_path / "g1")])
    main([*args, "--clip_skip", "0", "--output_dir", str(tmp_path / "g0")])  # 0: none, the last layer
    png = "00000_a_red_square.png"
    got, got1, got0 = (np.asarray(Image.open(tmp_path / d / png).convert("RGB"), dtype=np.int16) for d in ("g", "g1", "g0"))
    assert json.loads((tmp_path / "g" / "metadata.jsonl").read_text())["clip_skip"] == 2
    assert json.loads((tmp_path / "g0" / "metadata.jsonl").read_text())["clip_skip"] is None
    (tmp_path / "p.txt").write_text("a red square\n")
    main(["eval", "--teacher", str(teacher), "--lora", str(out), "--prompts", str(tmp_path / "p.txt"), "--steps", "1",
          "--gamma", "0", "--reference_steps", "2", "--output", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["settings"]["clip_skip"] == 2  # eval follows the run too

    shim_sd_pipeline_clip_skip(monkeypatch)  # the reference only: tcdistill generate ran without it
    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(out, weight_name=LORA_WEIGHT_NAME)
    pipe.set_progress_bar_config(disable=True)

    def ref(n: int | None) -> np.ndarray:
        image = pipe("a red square", num_inference_steps=2, guidance_scale=0.0, eta=0.3, height=32, width=32, clip_skip=n,
                     generator=torch.Generator().manual_seed(5)).images[0]
        return np.asarray(image, dtype=np.int16)

    assert np.abs(ref(2) - got).max() <= 1 and np.abs(ref(1) - got1).max() <= 1 and np.abs(ref(None) - got0).max() <= 1
    assert np.abs(got - got1).max() > 1  # the layer changes the image: the test can tell them apart


def test_a_kohya_file_away_from_its_run_samples_at_its_recorded_clip_skip(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: a kohya file copied away from its output folder (no tcdistill_config.json beside it) was sampled by `generate`
    at the text encoder's last layer, though its ss_clip_skip (kohya's count) names the layer it was trained at: its
    pixels differed from the same file's in its folder. Without a run record the file's tag is the default now (SD: the
    tag - 1, SDXL: - 2; "None" or the family's default layer: none); --clip_skip 0 still overrides it."""
    from safetensors.torch import save_file

    from tcdistill.cli import main
    from tcdistill.export import KOHYA_WEIGHT_NAME, kohya_file_clip_skip

    out = make_lora(tiny_teacher, tmp_path / "run")
    (out / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": str(tiny_teacher), "clip_skip": 1}))
    main(["export", "--lora", str(out)])
    (tmp_path / "alone").mkdir()
    lone = (out / KOHYA_WEIGHT_NAME).rename(tmp_path / "alone" / "k.safetensors")
    for extra, want in (((), 1), (("--clip_skip", "0"), None)):
        imgs = tmp_path / f"imgs{want}"
        main(["generate", "--lora", str(lone), "--base", str(tiny_teacher), "--prompt", "x", "--steps", "1", "--output_dir", str(imgs), *extra])
        assert json.loads((imgs / "metadata.jsonl").read_text())["clip_skip"] == want
    for tag, sd, sdxl in (("3", 2, 1), ("2", 1, None), ("None", None, None)):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "t.safetensors"), metadata={"ss_clip_skip": tag})
        assert (kohya_file_clip_skip(tmp_path / "t.safetensors", "sd"), kohya_file_clip_skip(tmp_path / "t.safetensors", "sdxl")) == (sd, sdxl)
