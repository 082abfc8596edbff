"""QA: what a real teacher folder may hold beyond the tiny default. A scheduler config that leaves its betas to its class's
defaults, a UNet that already takes a guidance embedding, fp16 variant / fp16 weight files, an SDXL VAE with
latents_mean/std: training and sampling agree on them, or the run refuses in one line before loading weights."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(teacher: Path, shards: str, out: Path, **kw):
    from tcdistill.config import TrainConfig

    base = dict(pretrained_teacher_model=str(teacher), train_shards_path_or_url=shards, output_dir=str(out), resolution=32,
                train_batch_size=2, max_train_steps=1, report_to="none", mixed_precision="no", validation_steps=0, seed=0)
    return TrainConfig(**{**base, **kw})


def _set_scheduler(teacher: Path, config: dict) -> None:
    """A scheduler config as saved by hand: only the given fields; model_index.json names the same class."""
    (teacher / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((teacher / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", config["_class_name"]]
    (teacher / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("config, cls_name", [
    # DDIM's own betas are linear 0.0001..0.02; TCDScheduler.from_config replaced the omitted ones with its 0.00085..0.012
    ({"_class_name": "DDIMScheduler", "beta_schedule": "linear", "num_train_timesteps": 500}, "DDIMScheduler"),
    # no beta_schedule either: DDIM's default (linear), as the teacher's pipeline samples (was refused as "EDM")
    ({"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000}, "EulerDiscreteScheduler"),
    # an LCMScheduler-class config: its class defaults are SD's scaled_linear 0.00085..0.012, not DDPMScheduler's linear ones
    ({"_class_name": "LCMScheduler", "beta_schedule": "scaled_linear"}, "LCMScheduler"),
])
def test_schedule_defaults_of_the_teachers_class(config: dict, cls_name: str, tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """Training's schedule, the validation scheduler and `tcdistill generate`'s scheduler are all the teacher's own schedule
    (its scheduler class with the config's fields), also for fields the config leaves to the class defaults."""
    import diffusers

    from tcdistill.generate import load_pipeline
    from tcdistill.trainer import Trainer
    from tcdistill.validation import build_pipeline

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    _set_scheduler(teacher, config)
    want = getattr(diffusers, cls_name).from_pretrained(teacher, subfolder="scheduler").alphas_cumprod.float()

    trainer = Trainer(_cfg(teacher, tiny_shards, tmp_path / "out", variant="lora", lora_rank=4))
    torch.testing.assert_close(trainer.schedule.alphas_cumprod.cpu(), want)
    val = build_pipeline(trainer.family, trainer.strategy.student, trainer.cfg).scheduler
    assert type(val).__name__ == "TCDScheduler"
    torch.testing.assert_close(val.alphas_cumprod.float(), want)
    gen = load_pipeline(str(teacher), None, None, "cpu", torch.float32).scheduler
    assert type(gen).__name__ == "TCDScheduler"
    torch.testing.assert_close(gen.alphas_cumprod.float(), want)


@pytest.mark.parametrize("dim", [256, 512])
def test_teacher_with_guidance_embedding_is_refused(dim: int, config_only_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """A UNet with time_cond_proj_dim (an LCM/TCD student as teacher): a LoRA on it trained without the embedding but
    sampled with it (its pipeline embeds guidance_scale - 1), and the full script crashed with a size-mismatch traceback
    for a width other than --unet_time_cond_proj_dim. Refused from the config, before any weights load."""
    from tcdistill.config import ConfigError
    from tcdistill.trainer import Trainer

    teacher = tmp_path / "teacher"
    shutil.copytree(config_only_teacher, teacher)
    unet_cfg = json.loads((teacher / "unet" / "config.json").read_text())
    unet_cfg["time_cond_proj_dim"] = dim
    (teacher / "unet" / "config.json").write_text(json.dumps(unet_cfg))
    for variant in ("full", "lora"):
        with pytest.raises(ConfigError, match=f"already takes a guidance embedding \\(time_cond_proj_dim={dim}\\)"):
            Trainer(_cfg(teacher, tiny_shards, tmp_path / variant, variant=variant, lora_rank=4))


@pytest.fixture(scope="module")
def fp16_variant_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher saved as `save_pretrained(..., variant="fp16")` in fp16: only `*.fp16.safetensors` weight files."""
    from tcdistill.tiny import build_tiny_sd_pipeline

    path = tmp_path_factory.mktemp("fp16_variant") / "teacher"
    pipe = build_tiny_sd_pipeline(None)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(path), safe_serialization=True, variant="fp16")
    assert not list(path.glob("*/diffusion_pytorch_model.safetensors"))
    return path


def test_fp16_variant_teacher_trains_generates_and_evaluates(fp16_variant_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """An fp16-variant teacher folder loaded nowhere: training said "pass --allow_pickle_weights to allow .bin" (which
    fails too), generate and eval could not load the base; eval of fp16 weights then crashed on a half text encoder."""
    from tcdistill.evaluate import EvalSettings, Evaluator, load_teacher
    from tcdistill.generate import load_pipeline
    from tcdistill.trainer import Trainer

    trainer = Trainer(_cfg(fp16_variant_teacher, tiny_shards, tmp_path / "out", variant="full"))
    loss, _ = trainer.train_step(next(iter(trainer.data_loader())))
    assert torch.isfinite(loss)
    pipe = load_pipeline(str(fp16_variant_teacher), None, None, "cpu", torch.float32)
    assert pipe.unet.dtype == torch.float32
    teacher = load_teacher(str(fp16_variant_teacher))
    assert {m.dtype for m in (teacher.unet, teacher.vae, teacher.text_encoder)} == {torch.float32}
    ev = Evaluator(teacher, ["a red circle"], EvalSettings(steps=(1,), gammas=(0.0,), reference_steps=2, original_steps=2))
    assert torch.isfinite(ev.reference).all()


def test_latents_mean_std_apply_to_sdxl_only() -> None:
    """SD pipelines decode `x / scaling_factor` whatever the VAE config says: an SD teacher's VAE with latents_mean/std
    (as some fine-tunes ship) must train on `z * scaling_factor`, SDXL's on the normalised latents."""
    from tcdistill.models import latent_normalization

    config = {"latents_mean": [0.5, -0.5, 1.0, 0.0], "latents_std": [2.0, 0.5, 1.0, 3.0], "scaling_factor": 0.13025}
    assert latent_normalization(config, "sd") is None
    mean, std = latent_normalization(config, "sdxl")
    assert mean.shape == std.shape == (1, 4, 1, 1) and mean.flatten().tolist() == config["latents_mean"]
    assert latent_normalization({"scaling_factor": 0.13025}, "sdxl") is None  # SDXL base's VAE sets neither


def test_sdxl_vae_latents_mean_std(tmp_path: Path) -> None:
    """StableDiffusionXLPipeline decodes `x * latents_std / scaling_factor + latents_mean` when the VAE config sets both:
    training (and `tcdistill cache`) must encode `x0 = (z - latents_mean) * scaling_factor / latents_std`, not `z *
    scaling_factor`, or every sample decodes in another latent space than the student learned."""
    from diffusers import AutoencoderKL

    from tcdistill.cache import _encode
    from tcdistill.tiny import build_tiny_sdxl_pipeline, shard_pattern, write_tiny_shards
    from tcdistill.trainer import Trainer

    pipe = build_tiny_sdxl_pipeline(None)
    mean, std = [0.5, -0.5, 1.0, 0.0], [2.0, 0.5, 1.0, 3.0]
    vae = AutoencoderKL.from_config(dict(pipe.vae.config), latents_mean=mean, latents_std=std)
    vae.load_state_dict(pipe.vae.state_dict())
    pipe.register_modules(vae=vae)
    pipe.save_pretrained(str(tmp_path / "teacher"), safe_serialization=True)
    write_tiny_shards(tmp_path / "shards", n_shards=1, per_shard=2, image_size=32)
    cfg = _cfg(tmp_path / "teacher", shard_pattern(tmp_path / "shards", 1), tmp_path / "out", variant="lora", lora_rank=4,
               model_family="sdxl", min_image_size=0, w_min=3.0)
    trainer = Trainer(cfg)
    batch = next(iter(trainer.data_loader()))
    seen = {}
    def record(student, target, teacher, x0, *args):
        seen["x0"] = x0
        return x0.sum(), {}

    trainer.loss_fn = record
    torch.manual_seed(0)
    trainer.train_step(batch)
    fvae = trainer.family.vae
    torch.manual_seed(0)
    z = fvae.encode(batch["pixel_values"]).latent_dist.sample()
    sf, m, s = fvae.config.scaling_factor, torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    decoded_as = seen["x0"] * s / sf + m  # what the SDXL pipeline hands to vae.decode for these latents
    torch.testing.assert_close(decoded_as, z, rtol=1e-4, atol=1e-4)
    # the cache stores the posterior in the same space
    dist = fvae.encode(batch["pixel_values"]).latent_dist
    cached_mean, cached_std, _ = _encode(trainer.family, batch, torch.device("cpu"))
    torch.testing.assert_close(cached_mean * s / sf + m, dist.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached_std * s / sf, dist.std, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("w", [dict(w_max=float("inf")), dict(w_min=float("inf"), w_max=float("inf"))])
def test_infinite_guidance_range_is_refused(w: dict) -> None:
    """--w_max inf passed the checks, then every step's loss was non-finite and the run stopped after 10 skipped steps
    advising a lower --learning_rate."""
    from tcdistill.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--w_min/--w_max must be finite"):
        TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s", max_train_steps=1, **w)


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("component, fields, message", [
    # an upscaler-style class embedding: "class_labels should be provided" traceback in the first step
    ("unet/config.json", dict(class_embed_type="timestep"), "needs class labels \\(class_embed_type=timestep"),
    # resnets sized for [time, class] embeddings: "mat1 and mat2 shapes cannot be multiplied" in the first step
    ("unet/config.json", dict(class_embeddings_concat=True), "needs class labels \\(.*class_embeddings_concat=True\\)"),
    ("unet/config.json", dict(addition_embed_type="image", encoder_hid_dim=32), "needs image embeddings \\(addition_embed_type='image'\\)"),
    # Versatile Diffusion's dual attention: "DualTransformer2DModel.forward() got an unexpected keyword argument
    # 'encoder_attention_mask'" in the first step (diffusers' own pipeline fails the same way)
    ("unet/config.json", dict(dual_cross_attention=True), "needs image tokens beside the prompt's \\(dual_cross_attention=True\\)"),
    # GLIGEN's grounding layers never run without boxes: their weights got no gradient and DDP runs failed at step 2
    ("unet/config.json", dict(attention_type="gated"), "GLIGEN grounding layers \\(attention_type='gated'\\).*distill the SD model"),
    # inpainting (9) and depth-to-image (5) UNets take extra input channels beside the latents
    ("unet/config.json", dict(in_channels=9), "takes 9 input channels; .*such as inpainting or depth-to-image ones, are not supported"),
    ("unet/config.json", dict(in_channels=5), "takes 5 input channels; .*such as inpainting or depth-to-image ones, are not supported"),
    # a learned-variance UNet (eps + variance): "The size of tensor a (4) must match the size of tensor b (8)" in the first step
    ("unet/config.json", dict(out_channels=8), "--pretrained_teacher_model .*: the teacher's UNet outputs 8 channels but takes 4 "
                                                  "\\(out_channels != in_channels in unet/config.json.*; use a teacher whose"),
    # a text encoder of another width than cross_attention_dim: "mat1 and mat2 shapes cannot be multiplied" in the first step
    ("text_encoder/config.json", dict(hidden_size=48), "width 32 \\(cross_attention_dim\\), but its text encoder hidden size is text_encoder 48"),
    ("unet/config.json", dict(encoder_hid_dim=48), "width 48 \\(encoder_hid_dim\\), but its text encoder hidden size is text_encoder 32"),
    # prompts padded past CLIP's position embeddings: "Sequence length must be less than max_position_embeddings"
    ("tokenizer/tokenizer_config.json", dict(model_max_length=77), "model_max_length 77, but the teacher's text_encoder has only max_position_embeddings 16"),
])
def test_teacher_the_pipeline_cannot_condition_is_refused(component: str, fields: dict, message: str, config_only_teacher: Path,
                                                          tiny_shards: str, tmp_path: Path) -> None:
    """A teacher whose UNet needs inputs a text-to-image pipeline does not give, or whose text encoder does not fit its UNet
    or its tokenizer, failed inside the first training step with a shape or missing-input traceback: refused in one line
    from the configs, before any weights load (the folder holds none)."""
    from tcdistill.config import ConfigError
    from tcdistill.trainer import Trainer

    teacher = tmp_path / "teacher"
    shutil.copytree(config_only_teacher, teacher)
    _edit_json(teacher / component, **fields)
    with pytest.raises(ConfigError, match=message):
        Trainer(_cfg(teacher, tiny_shards, tmp_path / "out", variant="lora", lora_rank=4))


@pytest.mark.parametrize("unet_cfg, needs", [
    ({}, None), ({"addition_embed_type": "text"}, None), ({"addition_embed_type": "text_time"}, None),
    ({"encoder_hid_dim_type": "text_proj"}, None),  # all fed from the prompt states (+ SDXL's ids) the pipelines give
    ({"num_class_embeds": 10}, "class labels"), ({"class_embeddings_concat": True}, "class labels"),
    ({"class_embeddings_concat": False}, None), ({"addition_embed_type": "image_hint"}, "image embeddings"),
    ({"encoder_hid_dim_type": "image_proj"}, "image embeddings"),
    ({"dual_cross_attention": True}, "image tokens"), ({"dual_cross_attention": False}, None),
])
def test_unet_extra_inputs_names_only_what_the_pipelines_cannot_give(unet_cfg: dict, needs: str | None) -> None:
    from tcdistill.teacher_checks import unet_extra_inputs

    got = unet_extra_inputs(unet_cfg)
    assert got == needs if needs is None else got.startswith(needs), got


def test_text_encoder_with_projection_samples_as_trained(tmp_path: Path) -> None:
    """An SD teacher whose text_encoder is saved as CLIPTextModelWithProjection trained (conditioned on the last hidden
    state), but `tcdistill generate` and `eval` failed with "not enough values to unpack": StableDiffusionPipeline took the
    pooled projection as prompt states. Both now sample on the hidden states training used."""
    from transformers import CLIPTextModelWithProjection

    from tcdistill.evaluate import load_teacher
    from tcdistill.generate import load_pipeline
    from tcdistill.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(None)
    te = CLIPTextModelWithProjection(pipe.text_encoder.config)
    te.load_state_dict(pipe.text_encoder.state_dict(), strict=False)
    pipe.register_modules(text_encoder=te)
    pipe.save_pretrained(str(tmp_path / "teacher"), safe_serialization=True)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    want = te(ids).last_hidden_state
    for loaded in (load_pipeline(str(tmp_path / "teacher"), None, None, "cpu", torch.float32), load_teacher(str(tmp_path / "teacher"))):
        states, _ = loaded.encode_prompt("a red circle", "cpu", 1, False)
        torch.testing.assert_close(states, want)
        out = loaded("a red circle", num_inference_steps=1, guidance_scale=0.0, output_type="latent").images
        assert torch.isfinite(out).all()


def test_weights_variant_picks_a_variant_only_where_no_plain_weights_load(tmp_path: Path) -> None:
    """Variant files are loaded only when they are all a folder holds: plain weights next to them win (a folder saved
    both plain and with variant="fp16" loads fp32), and a plain .bin counts as loadable only under --allow_pickle_weights."""
    from tcdistill.families import pipeline_variant, weights_variant

    def folder(name: str, *files: str) -> Path:
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"")
        return tmp_path / name

    assert weights_variant(str(folder("only_fp16", "diffusion_pytorch_model.fp16.safetensors", "config.json"))) == "fp16"
    assert weights_variant(str(folder("both", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"))) is None
    bin_and_fp16 = str(folder("bin", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors"))
    assert weights_variant(bin_and_fp16) == "fp16" and weights_variant(bin_and_fp16, allow_bin=True) is None
    assert weights_variant(str(folder("two", "model.fp16.safetensors", "model.bf16.safetensors"))) is None
    # A pipeline folder: components with only .bin variant files count (DiffusionPipeline takes .bin per component).
    (tmp_path / "pipe").mkdir()
    for sub, f in (("unet", "diffusion_pytorch_model.fp16.bin"), ("text_encoder", "model.safetensors")):
        (tmp_path / "pipe" / sub).mkdir()
        (tmp_path / "pipe" / sub / f).write_bytes(b"")
    assert pipeline_variant(str(tmp_path / "pipe")) == "fp16"


@pytest.mark.parametrize("use_attention_mask", [False, True])
def test_sd_prompt_states_follow_the_pipelines_use_attention_mask(use_attention_mask: bool) -> None:
    """A text encoder config with `use_attention_mask` true: StableDiffusionPipeline.encode_prompt passes the padding mask,
    and training (conditional and "" unconditional states) ignored it, so the teacher saw states up to 2.9 off what it
    samples with (tiny encoder, 77 positions). Both now agree exactly, with the mask and without."""
    from tcdistill.families import SDFamily, ddpm_schedule
    from tcdistill.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(None, max_length=24)
    pipe.text_encoder.config.use_attention_mask = use_attention_mask
    fam = SDFamily(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, ddpm_schedule(pipe.scheduler.config))
    prompts, cpu = ["a red circle", "", "a 🐱 on a blue background"], torch.device("cpu")
    cond, neg = pipe.encode_prompt(prompts, cpu, 1, True)
    torch.testing.assert_close(fam.encode({"captions": prompts}, cpu)["encoder_hidden_states"], cond, rtol=0, atol=0)
    torch.testing.assert_close(fam.uncond({"captions": prompts}, cpu)["encoder_hidden_states"], neg, rtol=0, atol=0)


def test_multi_vector_textual_inversion_tokens_expand_as_in_the_pipeline() -> None:
    """A fine-tune saved after `load_textual_inversion` of a multi-vector embedding holds `<tok>`, `<tok>_1`, ... as added
    tokens; the pipelines expand "<tok>" in a prompt to all its vectors (`maybe_convert_prompt`), training fed the first
    alone: the teacher saw other states for every caption naming the concept."""
    from tcdistill.families import SDFamily, ddpm_schedule
    from tcdistill.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(None)
    pipe.tokenizer.add_tokens(["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"])
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[-3:] = torch.randn(3, pipe.text_encoder.config.hidden_size,
                                                                          generator=torch.Generator().manual_seed(0))
    fam = SDFamily(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, ddpm_schedule(pipe.scheduler.config))
    prompts, cpu = ["a <cat-toy> on a red square", "a red circle"], torch.device("cpu")
    cond, _ = pipe.encode_prompt(prompts, cpu, 1, False)
    torch.testing.assert_close(fam.encode({"captions": prompts}, cpu)["encoder_hidden_states"], cond, rtol=0, atol=0)


def test_scheduler_class_whose_backend_is_missing_is_refused_when_its_defaults_are_needed(
        config_only_teacher: Path, tiny_shards: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: a config naming a scheduler class diffusers only has as a placeholder here (DPMSolverSDEScheduler without torchsde)
    gave no class defaults, so the betas the file leaves out silently became DDPMScheduler's (linear 0.0001..0.02, not
    DPMSolverSDE's 0.00085..0.012) in training; one line now. A file that sets them trains as before."""
    import diffusers
    from diffusers.utils import DummyObject

    from tcdistill.config import ConfigError
    from tcdistill.teacher_checks import check_teacher_schedule

    class DPMSolverSDEScheduler(metaclass=DummyObject):  # what diffusers exports when torchsde is not installed
        _backends = ["torch", "torchsde"]

    monkeypatch.setattr(diffusers, "DPMSolverSDEScheduler", DPMSolverSDEScheduler)
    teacher = tmp_path / "teacher"
    shutil.copytree(config_only_teacher, teacher)
    _set_scheduler(teacher, {"_class_name": "DPMSolverSDEScheduler", "beta_schedule": "linear"})
    cfg = _cfg(teacher, tiny_shards, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"DPMSolverSDEScheduler needs torchsde .*beta_start, beta_end"):
        check_teacher_schedule(cfg)
    _set_scheduler(teacher, {"_class_name": "DPMSolverSDEScheduler", "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012})
    check_teacher_schedule(cfg)


def test_a_base_whose_scheduler_class_is_missing_its_backend_loads_for_generate_and_eval(
        tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: a teacher saved with LMSDiscreteScheduler trained without scipy (only its schedule is read), but `tcdistill
    generate` and `eval` loaded the whole pipeline, whose placeholder class raised "requires the scipy library" as a
    traceback, though neither samples with it. The base now loads with the schedule as training reads it (generate's
    TCDScheduler samples on it, eval reads it); a file that leaves the betas to that class's defaults is one line."""
    import diffusers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import dummy_torch_and_scipy_objects

    from tcdistill.config import ConfigError
    from tcdistill.generate import base_pipeline, load_pipeline

    # What diffusers exports when scipy is not installed (as here, whether or not it is).
    monkeypatch.setattr(diffusers, "LMSDiscreteScheduler", dummy_torch_and_scipy_objects.LMSDiscreteScheduler)
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    lms = {"_class_name": "LMSDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
           "num_train_timesteps": 1000}
    _set_scheduler(teacher, lms)
    pipe = base_pipeline(StableDiffusionPipeline, str(teacher), torch.float32, safety_checker=None, requires_safety_checker=False)
    own = StableDiffusionPipeline.from_pretrained(tiny_teacher).scheduler  # the same betas under DDPMScheduler
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, own.alphas_cumprod, rtol=0, atol=0)
    assert type(load_pipeline(str(teacher), None, None, "cpu", torch.float32).scheduler).__name__ == "TCDScheduler"
    _set_scheduler(teacher, {"_class_name": "LMSDiscreteScheduler", "num_train_timesteps": 1000})
    with pytest.raises(ConfigError, match=r"LMSDiscreteScheduler needs scipy \(not installed\) for the defaults of beta_start"):
        base_pipeline(StableDiffusionPipeline, str(teacher), torch.float32)


@pytest.mark.parametrize("own", [False, True])
def test_a_vae_that_is_not_an_autoencoder_kl_is_refused(own: bool, config_only_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """QA: --pretrained_vae_model_name_or_path of a tiny autoencoder (TAESD, mistaken for an fp16-safe VAE) was loaded as
    an AutoencoderKL of default shape: "cannot load the teacher ...: num_channels (8) must be divisible by num_groups (32)",
    naming the teacher, not the VAE. Training encodes with an AutoencoderKL's latent distribution: any other class is
    refused in one line naming the flag, before any weights load."""
    from diffusers import AutoencoderTiny

    from tcdistill.config import ConfigError
    from tcdistill.trainer import Trainer

    teacher = tmp_path / "teacher"
    shutil.copytree(config_only_teacher, teacher)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                            num_decoder_blocks=(1, 1))
    taesd.save_config(teacher / "vae" if own else tmp_path / "taesd")
    flag = {} if own else {"pretrained_vae_model_name_or_path": str(tmp_path / "taesd")}
    where = "--pretrained_teacher_model" if own else "--pretrained_vae_model_name_or_path"
    with pytest.raises(ConfigError, match=f"^{where} .*: its VAE is an AutoencoderTiny; training encodes images with an AutoencoderKL"):
        Trainer(_cfg(teacher, tiny_shards, tmp_path / "out", variant="lora", lora_rank=4, **flag))


@pytest.mark.parametrize("resolution, batch", [(4, 1), (8, 2)])
def test_resolution_that_leaves_a_one_channel_group_at_one_pixel_is_refused(resolution: int, batch: int, config_only_teacher: Path,
                                                                            tiny_shards: str, tmp_path: Path) -> None:
    """QA (fuzz): a UNet whose level is as wide as norm_num_groups (one channel per GroupNorm group) reached at a 1x1
    latent pixel failed every one-image sample (validation after the training steps, `generate`) and every step at
    batch 1 with torch's "Expected more than 1 value per channel" traceback: refused in one line before weights load,
    naming the smallest --resolution that works (the student samples at a multiple of 8)."""
    from tcdistill.config import ConfigError
    from tcdistill.teacher_checks import check_latent_size
    from tcdistill.trainer import Trainer

    teacher = tmp_path / "teacher"
    shutil.copytree(config_only_teacher, teacher)
    # VAE factor 2: a latent of size / 2, level i at ceil(latent / 2^i); level 2 holds one channel per group, so sampling
    # at 8 px (a 4 px latent) reaches it at 1x1, and 16 px is the least size that works
    fields = dict(block_out_channels=[32, 64, 8], norm_num_groups=8, attention_head_dim=8,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
    _edit_json(teacher / "unet" / "config.json", **fields)
    with pytest.raises(ConfigError, match=f"--resolution {resolution} is too small for the teacher's UNet: its level 2 .*"
                                          "norm_num_groups 8: one channel per GroupNorm group.*use --resolution >= 16\\.$"):
        Trainer(_cfg(teacher, tiny_shards, tmp_path / "out", resolution=resolution, train_batch_size=batch))
    check_latent_size(_cfg(teacher, tiny_shards, tmp_path / "o", resolution=16, train_batch_size=1), fields, 2)
    # One channel per group up to level 1 (its first resnet takes level 0's 8 channels): sampling at 8 px reaches it at 2x2; training at 4 px fails at batch 1 alone
    level1 = {**fields, "block_out_channels": [8, 16, 32]}
    check_latent_size(_cfg(teacher, tiny_shards, tmp_path / "o", resolution=4, train_batch_size=2), level1, 2)
    with pytest.raises(ConfigError, match="its level 1 .*use --resolution >= 8\\.$"):
        check_latent_size(_cfg(teacher, tiny_shards, tmp_path / "o", resolution=4, train_batch_size=1), level1, 2)


def test_generate_at_a_size_that_leaves_a_one_channel_group_at_one_pixel_is_one_line(tmp_path_factory: pytest.TempPathFactory,
                                                                                     tmp_path: Path, capsys) -> None:
    """QA: `generate --height/--width` below the run's --resolution, on a UNet whose level 2 holds one channel per
    GroupNorm group (tiny widths 8, 8, 16), reached that level at 1x1 latent pixel and exited with torch's "Expected more
    than 1 value per channel when training": refused by check_latent_size's rule, naming the least size; one side of
    16 px (2 latent pixels there) is enough."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import full_output, saved_tiny_pipeline

    from tcdistill.cli import main
    from tcdistill.teacher_checks import check_sample_size

    teacher = saved_tiny_pipeline(tmp_path_factory, "one_channel_levels", block_out_channels=(8, 8, 16))
    out = full_output(teacher, tmp_path / "out")
    (out / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": str(teacher), "resolution": 32}))
    with pytest.raises(SystemExit):
        main(["generate", "--unet", str(out), "--prompt", "x", "--steps", "1", "--height", "8", "--width", "8",
              "--output_dir", str(tmp_path / "g")])
    assert re.fullmatch(r"tcdistill generate: error: --height 8 --width 8 is too small for the UNet: its level 2 .*norm_num_groups 8: "
                        r"one channel per GroupNorm group.*use --height or --width >= 16\.", capsys.readouterr().err.splitlines()[-1])
    unet_cfg = json.loads((teacher / "unet" / "config.json").read_text())
    check_sample_size(unet_cfg, 2, 8, 16)
    check_sample_size({**unet_cfg, "block_out_channels": [32, 64, 128]}, 2, 8, 8)  # no one-channel level: any size
