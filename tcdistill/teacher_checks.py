"""Checks on the teacher run before any weights load: its configs, tokenizers and schedule against the flags, so a
teacher this run cannot distill is refused in one line, not a traceback minutes later."""

from __future__ import annotations

import math
from typing import Any

from .config import SEED_SCRIPTS, ConfigError, TrainConfig, check_clip_skip_floor, first_line
from .families import (PROMPT_COMPONENTS, absent_components, check_scheduler_defaults, ddpm_schedule, load_tokenizer,
                       schedule_fields, teacher_index, teacher_scheduler_config, unet_family)
from .schedule import PREDICTION_TYPES, NoiseSchedule, zero_snr_top


def vae_scale_factor(vae_config: dict) -> int:
    """Pixel-to-latent downscale of an AutoencoderKL config (2 ** (levels - 1))."""
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


def check_teacher_config(cfg: TrainConfig) -> dict[str, Any]:
    """Read only the configs (no weights) and reject a resolution the VAE cannot take (or latents the UNet cannot take,
    or a teacher of another family), before anything loads. Returns the tokenizers read on the way (for `load_family`)."""
    from diffusers import AutoencoderKL

    vae_src, sub = (cfg.pretrained_vae_model_name_or_path, None) if cfg.pretrained_vae_model_name_or_path else (cfg.pretrained_teacher_model, "vae")
    try:
        # The same revision as families._load_vae: --teacher_revision is the teacher repo's, not a separate VAE's.
        revision = None if cfg.pretrained_vae_model_name_or_path else cfg.teacher_revision
        vae_cfg = AutoencoderKL.load_config(vae_src, subfolder=sub, revision=revision, cache_dir=cfg.cache_dir)
    except Exception as e:  # noqa: BLE001 - hub/OS errors come in many types; the message is what matters
        raise ConfigError(f"cannot read the teacher's VAE config from {vae_src!r}: {type(e).__name__}: {first_line(e)}") from None
    # Any config loads as an AutoencoderKL of default shape: a tiny autoencoder (TAESD) then failed the weights load with a
    # GroupNorm message that named the teacher. Training samples x0 from an AutoencoderKL encoder's latent distribution.
    name = vae_cfg.get("_class_name")
    if name not in (None, "AutoencoderKL"):
        flag = "--pretrained_vae_model_name_or_path" if cfg.pretrained_vae_model_name_or_path else "--pretrained_teacher_model"
        raise ConfigError(f"{flag} {vae_src}: its VAE is an {name}; training encodes images with an AutoencoderKL (SD/SDXL's "
                          "VAE, whose encoder gives the latent distribution): pass one, such as the teacher's own VAE.")
    f = vae_scale_factor(vae_cfg)
    if cfg.resolution % f:
        raise ConfigError(f"--resolution {cfg.resolution} is not divisible by the VAE's downscale factor {f}.")
    check_teacher_family(cfg, vae_cfg)
    check_clip_skip(cfg.clip_skip, cfg.pretrained_teacher_model, cfg.model_family, cfg.teacher_revision, cfg.cache_dir)
    return check_teacher_tokenizers(cfg)


def read_text_encoder_config(src: str, subfolder: str, revision: str | None = None, cache_dir: str | None = None) -> Any:
    """The `subfolder` text encoder config (a CLIPTextConfig) of the pipeline `src`, or None where it cannot be read (left
    to the load that follows)."""
    from transformers import CLIPTextConfig

    try:
        return CLIPTextConfig.from_pretrained(src, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - reported by the load that follows
        return None


def text_encoder_config(cfg: TrainConfig, subfolder: str) -> Any:
    """The teacher's `subfolder` text encoder config (`read_text_encoder_config`)."""
    return read_text_encoder_config(cfg.pretrained_teacher_model, subfolder, cfg.teacher_revision, cfg.cache_dir)


def check_clip_skip(clip_skip: int | None, src: str, family: str, revision: str | None = None, cache_dir: str | None = None) -> None:
    """--clip_skip N takes the hidden state N layers before the last of each of the pipeline `src`'s text encoders: refuse,
    in one line before any weights load, an N outside [1, layers - 1] (past the layers, the first prompt encoding failed
    with an IndexError; below 1, another layer was taken silently). Configs that cannot be read are left to the load."""
    check_clip_skip_floor(clip_skip)
    if clip_skip is None:
        return
    subs = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    for sub in subs:
        te = read_text_encoder_config(src, sub, revision, cache_dir)
        n = None if te is None else int(te.num_hidden_layers)
        if n is not None and not 1 <= clip_skip < n:
            raise ConfigError(f"--clip_skip {clip_skip}: the {sub} of {src} has {n} layers; clip skip must be in [1, {n - 1}] "
                              "(a hidden state before its last layer).")


def check_teacher_tokenizers(cfg: TrainConfig) -> dict[str, Any]:
    """Prompts are padded to the tokenizer's own model_max_length (as SD pipelines do): a tokenizer without a pad token,
    or without a model_max_length (transformers then reports ~1e30), failed inside the first training step with a
    transformers traceback (diffusers' pipelines fail on it too). Refuse it in one line before any weights load.
    A tokenizer that cannot be read is left to the load that follows, which reports it. Returns the tokenizers that
    passed, by subfolder, so that the family load does not read them again."""

    lengths, checked = [], {}
    for sub in ("tokenizer", "tokenizer_2") if cfg.model_family == "sdxl" else ("tokenizer",):
        try:
            tok = load_tokenizer(cfg, sub)
        except Exception:  # noqa: BLE001 - reported by the load that follows
            return checked
        where = f"the teacher's {sub} ({cfg.pretrained_teacher_model}/{sub}/tokenizer_config.json)"
        if tok.pad_token is None:
            raise ConfigError(f"{where} has no pad_token; prompts are padded to its model_max_length: set one "
                              f"(CLIP's SD tokenizers pad with {tok.eos_token or '<|endoftext|>'!r}).")
        if not 0 < int(tok.model_max_length) <= 1_000_000:
            raise ConfigError(f"{where} sets no model_max_length (got {tok.model_max_length}); prompts are padded to it: set "
                              f"the text encoder's max_position_embeddings (77 for SD).")
        # CLIP's position embeddings bound the prompt length: a longer padding failed in the text encoder's forward.
        te = text_encoder_config(cfg, sub.replace("tokenizer", "text_encoder"))
        if te is not None and int(tok.model_max_length) > int(te.max_position_embeddings):
            raise ConfigError(f"{where} pads prompts to model_max_length {tok.model_max_length}, but the teacher's "
                              f"{sub.replace('tokenizer', 'text_encoder')} has only max_position_embeddings "
                              f"{te.max_position_embeddings}; set model_max_length to at most that.")
        lengths.append(int(tok.model_max_length))
        checked[sub] = tok
    if len(set(lengths)) > 1:  # SDXL concatenates both encoders' hidden states per token (its own pipeline fails too)
        raise ConfigError(f"the teacher's tokenizer and tokenizer_2 pad to different lengths {tuple(lengths)} (model_max_length); "
                          "SDXL concatenates their hidden states per token, so they must be equal.")
    return checked


def check_teacher_schedule(cfg: TrainConfig) -> None:
    """Read the teacher's scheduler config (no weights) and reject, before anything loads, a scheduler that is not DDPM-type or
    that TCDScheduler cannot take, and a training grid it cannot give:
    one finer than its timesteps, or one whose top step has zero SNR (`rescale_betas_zero_snr`) under epsilon
    prediction, where `x0 = (x_t - sigma_t eps) / alpha_t` divides by zero: NaN losses (skipped steps) in training and
    NaN samples from the TCDScheduler, silently. Also a config no DDPMScheduler can build (an unknown beta_schedule), a
    prediction_type `NoiseSchedule` cannot convert (both were tracebacks at the load), and trained_betas of
    another length than num_train_timesteps (training's grid then was not the sampler's); and a config that leaves its
    betas to the defaults of a class diffusers cannot import here (its optional backend missing), which are unknown.
    A config that cannot be read is left to the load that follows."""
    from diffusers import TCDScheduler

    try:
        raw = teacher_scheduler_config(cfg)
    except Exception:  # noqa: BLE001 - reported by the load that follows
        return
    where = f"{cfg.pretrained_teacher_model}/scheduler/scheduler_config.json"
    try:
        sched = ddpm_schedule(raw)  # what the family load builds from the same config
    except NotImplementedError as e:  # an unknown beta_schedule
        raise ConfigError(f"the teacher's scheduler config ({where}) cannot be used: {first_line(e)}") from None
    except Exception:  # noqa: BLE001 - reported by the load that follows
        return
    # trained_betas set the schedule's length, but TCDScheduler (and the teacher's own sampler) take num_train_timesteps
    # from the config: training's grid would run to t = len - 1 while the outputs sample another grid.
    n_train, n_betas = int(sched.config.num_train_timesteps), int(sched.alphas_cumprod.shape[0])
    if n_betas != n_train:
        raise ConfigError(f"the teacher's scheduler config ({where}) has {n_betas} trained_betas but num_train_timesteps "
                          f"{n_train}: make them equal.")
    check_scheduler_defaults(raw, where)
    if sched.config.prediction_type not in PREDICTION_TYPES:  # NoiseSchedule refused it only after every weight had loaded
        raise ConfigError(f"the teacher's scheduler config sets prediction_type {sched.config.prediction_type!r}; TCD distils "
                          f"{', '.join(PREDICTION_TYPES[:-1])} or {PREDICTION_TYPES[-1]} teachers.")
    # TCD distils a variance-preserving (DDPM-type) teacher. An EDM or flow-matching scheduler config defines no betas,
    # and DDPMScheduler would silently fill in its default linear ones: a schedule the teacher was never trained on.
    # (A DDPM-type class's config may leave beta_schedule to the class default, as the teacher's pipeline then does.)
    if "beta_schedule" not in schedule_fields(raw) and raw.get("trained_betas") is None:
        raise ConfigError(f"the teacher's scheduler ({raw.get('_class_name')}) defines no beta schedule: TCD distils variance-preserving "
                          "(DDPM-type) teachers such as SD 1.x/2.x and SDXL, not EDM or flow-matching ones.")
    try:  # the outputs sample with TCDScheduler, which takes fewer beta schedules than DDPMScheduler (no sigmoid)
        TCDScheduler.from_config(sched.config, **schedule_fields(sched.config))
    except NotImplementedError as e:
        raise ConfigError(f"the teacher's scheduler config is not usable by TCDScheduler, which samples the outputs: {first_line(e)}") from None
    if cfg.num_ddim_timesteps > n_train:
        raise ConfigError(f"--num_ddim_timesteps {cfg.num_ddim_timesteps} exceeds the teacher scheduler's num_train_timesteps {n_train}.")
    top = zero_snr_top(NoiseSchedule.from_scheduler(sched), cfg.num_ddim_timesteps)
    if top is not None:
        raise ConfigError(f"the teacher's scheduler has zero SNR at t={top} (rescale_betas_zero_snr) but predicts epsilon, which "
                          f"cannot give x0 there: distill a v_prediction teacher (zero-SNR schedules need one), or choose a "
                          f"--num_ddim_timesteps that does not divide {n_train} so the grid stops short of t={n_train - 1}.")


def unet_extra_inputs(unet_cfg: Any) -> str | None:
    """What a UNet config needs beyond the prompt states (and SDXL's text_time ids), or None. Training, validation and
    the SD/SDXL pipelines call the UNet with `encoder_hidden_states` (+ SDXL's `text_embeds`/`time_ids`) only, so a
    class embedding (`class_labels`) or an image-conditioned embedding (`image_embeds`) failed inside the first step."""
    # class_embeddings_concat sizes every resnet's time input for [time, class] embeddings side by side: without class
    # labels its forward fails with a matmul shape error, also in diffusers' own pipeline.
    if any(unet_cfg.get(k) for k in ("class_embed_type", "num_class_embeds", "class_embeddings_concat")):
        return (f"class labels (class_embed_type={unet_cfg.get('class_embed_type')}, num_class_embeds={unet_cfg.get('num_class_embeds')}"
                f"{', class_embeddings_concat=True' if unet_cfg.get('class_embeddings_concat') else ''})")
    if unet_cfg.get("addition_embed_type") not in (None, "text", "text_time"):
        return f"image embeddings (addition_embed_type={unet_cfg['addition_embed_type']!r})"
    if unet_cfg.get("encoder_hid_dim_type") not in (None, "text_proj"):
        return f"image embeddings (encoder_hid_dim_type={unet_cfg['encoder_hid_dim_type']!r})"
    # Versatile Diffusion's DualTransformer2DModel splits its context into 77 text + 257 image tokens; diffusers'
    # cross-attention blocks no longer call it as it expects (a TypeError on encoder_attention_mask in every forward).
    if unet_cfg.get("dual_cross_attention"):
        return "image tokens beside the prompt's (dual_cross_attention=True)"
    return None


def check_teacher_family(cfg: TrainConfig, vae_cfg: dict | None = None) -> None:
    """Reject an SDXL teacher given to the SD scripts (it failed in the first step's teacher forward) or an SD teacher
    given to the SDXL ones (it failed loading a second tokenizer), from the UNet's config alone. A config that cannot
    be read is left to the weights load, which reports it."""
    from diffusers import UNet2DConditionModel


    try:
        unet_cfg = UNet2DConditionModel.load_config(cfg.pretrained_teacher_model, subfolder="unet", revision=cfg.teacher_revision,
                                                    cache_dir=cfg.cache_dir)
    except Exception:  # noqa: BLE001 - reported by the load that follows
        return
    # The UNet denoises the VAE's latents: another VAE (--pretrained_vae_model_name_or_path, e.g. a 16-channel one) or
    # a UNet taking extra input channels (an inpainting UNet) failed in the first step's forward with a conv traceback.
    latent, unet_in = (vae_cfg or {}).get("latent_channels"), unet_cfg.get("in_channels")
    if latent is not None and unet_in is not None and latent != unet_in:
        vae_name = cfg.pretrained_vae_model_name_or_path or f"{cfg.pretrained_teacher_model}/vae"
        raise ConfigError(f"the VAE {vae_name!r} has {latent} latent channels but the teacher's UNet takes {unet_in} "
                          "input channels; they must match (UNets taking extra input channels, such as inpainting or depth-to-image ones, are "
                          "not supported).")
    # A UNet predicting more channels than it denoises (a learned-variance one: eps plus variance, out_channels = 2 x
    # in_channels) failed in the first step's x0/eps conversion with a broadcast traceback.
    unet_out = unet_cfg.get("out_channels")
    if unet_in is not None and unet_out is not None and unet_out != unet_in:
        raise ConfigError(f"--pretrained_teacher_model {cfg.pretrained_teacher_model}: the teacher's UNet outputs {unet_out} channels "
                          f"but takes {unet_in} (out_channels != in_channels in unet/config.json, e.g. a learned-variance UNet); use "
                          "a teacher whose UNet predicts epsilon, v or x0 of its input latents.")
    # A UNet that already takes a guidance embedding (time_cond_proj_dim) is a guidance-distilled student (LCM/TCD), not
    # a diffusion teacher: training runs it without that input (no w to give it), while its pipeline feeds it
    # guidance_scale - 1, so a LoRA on it sampled another function than it was trained as, and the full student with
    # another --unet_time_cond_proj_dim failed with a load_state_dict size-mismatch traceback.
    if unet_cfg.get("time_cond_proj_dim") is not None:
        raise ConfigError(f"the teacher's UNet already takes a guidance embedding (time_cond_proj_dim="
                          f"{unet_cfg['time_cond_proj_dim']}): it is a guidance-distilled (LCM/TCD) student, not a diffusion "
                          "teacher; distill from the model it was distilled from.")
    extra = unet_extra_inputs(unet_cfg)
    if extra:
        raise ConfigError(f"the teacher's UNet needs {extra}, which SD/SDXL text-to-image pipelines do not give it (an upscaler-, "
                          "Kandinsky-, unCLIP- or Versatile-Diffusion-style UNet): not supported.")
    # GLIGEN's gated self-attention (and its box projection) run only on grounding inputs no text-to-image pipeline gives:
    # their weights (and LoRA adapters on them) got no gradient, so multi-GPU runs failed at the second step with DDP's
    # unused-parameters error. GLIGEN trains only those layers over a frozen SD UNet, whose weights are that SD model's.
    if unet_cfg.get("attention_type") in ("gated", "gated-text-image"):
        raise ConfigError(f"the teacher's UNet has GLIGEN grounding layers (attention_type={unet_cfg['attention_type']!r}), which run "
                          "only on box inputs that SD/SDXL text-to-image pipelines do not give: not supported; distill the "
                          "SD model it was built on.")
    family = unet_family(unet_cfg)
    if family != cfg.model_family:
        scripts = " / ".join(SEED_SCRIPTS[variant, family] for variant in ("full", "lora"))
        raise ConfigError(f"the teacher {cfg.pretrained_teacher_model!r} is an {family.upper()} model (its UNet "
                          f"{'takes' if family == 'sdxl' else 'lacks'} SDXL's text_time conditioning), but this run's "
                          f"--model_family is {cfg.model_family!r}: use {scripts} (--model_family {family}).")
    if family == "sdxl":
        check_sdxl_components(cfg)
        check_sdxl_added_cond(cfg, unet_cfg)
    check_text_width(cfg, unet_cfg)
    if vae_cfg is not None:
        check_latent_size(cfg, unet_cfg, vae_scale_factor(vae_cfg))


def check_latent_size(cfg: TrainConfig, unet_cfg: Any, vae_factor: int) -> None:
    """GroupNorm cannot normalise a group holding one value: a UNet level whose width equals norm_num_groups (one
    channel per group) reached at a 1x1 latent pixel failed with torch's "Expected more than 1 value per channel"
    traceback for a batch of one: every sampled image (validation, `generate`; the full student samples without CFG's
    batch of two) after the training steps had run, and each step at --train_batch_size 1. Refuse such a --resolution
    before any weights load, naming the smallest that works. Level i runs at ceil(latent / 2^i) pixels (each
    downsampler is a stride-2 conv); its first resnet takes the level before's width."""
    from .validation import sampling_size

    deepest, widths, groups = single_channel_level(unet_cfg)
    if deepest is None:
        return
    sizes = [sampling_size(cfg.resolution)] + ([cfg.resolution] if cfg.train_batch_size == 1 else [])
    if all(size // vae_factor > 2 ** deepest for size in sizes):
        return
    raise ConfigError(f"--resolution {cfg.resolution} is too small for the teacher's UNet: its level {deepest} (block_out_channels "
                      f"{widths}, norm_num_groups {groups}: one channel per GroupNorm group) would run one image at 1x1 latent "
                      f"pixel, where GroupNorm has a single value to normalise and fails; use --resolution >= "
                      f"{least_sampling_size(deepest, vae_factor)}.")


def single_channel_level(unet_cfg: Any) -> tuple[int | None, list[int], Any]:
    """(the deepest UNet level with one channel per GroupNorm group, or None; block_out_channels; norm_num_groups). Level i
    runs at ceil(latent / 2^i) pixels (each downsampler is a stride-2 conv); its first resnet takes the level before's width,
    so it is such a level where either width equals norm_num_groups."""
    groups, widths = unet_cfg.get("norm_num_groups"), list(unet_cfg.get("block_out_channels") or [])
    single = [i for i, w in enumerate(widths) if groups and min(w, widths[max(i - 1, 0)]) == groups]
    return (single[-1] if single else None), widths, groups


def least_sampling_size(level: int, vae_factor: int) -> int:
    """The smallest pixel size (a multiple of 8, as pipelines sample) whose latent reaches 2 pixels at UNet level `level`."""
    step = math.lcm(8, vae_factor)
    return max(step, -(-vae_factor * (2 ** level + 1) // step) * step)


def check_sample_size(unet_cfg: Any, vae_factor: int, height: int, width: int) -> None:
    """`tcdistill generate`'s --height/--width by check_latent_size's rule: images sampled where a one-channel-per-group
    level runs at 1x1 latent pixel failed with torch's "Expected more than 1 value per channel" for a batch of one (and at
    a larger batch that GroupNorm gives zeros, whatever the level held). Refused in one line naming the least size."""
    deepest, widths, groups = single_channel_level(unet_cfg)
    if deepest is None or max(height, width) // vae_factor > 2 ** deepest:  # one side of 2 latent pixels is enough
        return
    raise ValueError(f"--height {height} --width {width} is too small for the UNet: its level {deepest} (block_out_channels "
                     f"{widths}, norm_num_groups {groups}: one channel per GroupNorm group) would run at 1x1 latent pixel, "
                     f"where GroupNorm fails; use --height or --width >= {least_sampling_size(deepest, vae_factor)}.")


def check_text_width(cfg: TrainConfig, unet_cfg: Any) -> None:
    """The UNet attends to the text encoders' hidden states (SDXL: both side by side), through its `encoder_hid_dim`
    projection where it has one, else directly at its `cross_attention_dim` (one width per block where a list). Another
    width failed in the first step's teacher forward with a matmul shape traceback: refuse it in one line before any
    weights load. Configs that cannot be read are left to the load that follows."""
    want = unet_cfg.get("encoder_hid_dim") or unet_cfg.get("cross_attention_dim")
    if want is None:
        return
    subs = ("text_encoder", "text_encoder_2") if cfg.model_family == "sdxl" else ("text_encoder",)
    configs = [text_encoder_config(cfg, sub) for sub in subs]
    if any(c is None for c in configs):
        return
    width = sum(int(c.hidden_size) for c in configs)
    if any(int(d) != width for d in (want if isinstance(want, (list, tuple)) else [want])):
        sizes = " + ".join(f"{sub} {c.hidden_size}" for sub, c in zip(subs, configs))
        field = "encoder_hid_dim" if unet_cfg.get("encoder_hid_dim") else "cross_attention_dim"
        raise ConfigError(f"the teacher's UNet takes prompt states of width {want} ({field}), but its text encoder hidden size is "
                          f"{sizes}{f' = {width}' if len(subs) > 1 else ''}: they must match.")


def sdxl_pooled_width(unet_cfg: Any) -> int | None:
    """The pooled prompt width (text_encoder_2's projection) an SDXL UNet's added conditioning takes: its
    `projection_class_embeddings_input_dim` less six time ids (original size, crop top-left, target size) each embedded
    in `addition_time_embed_dim`; None for a UNet without added conditioning."""
    proj_in, time_dim = unet_cfg.get("projection_class_embeddings_input_dim"), unet_cfg.get("addition_time_embed_dim")
    return None if proj_in is None or time_dim is None else int(proj_in) - 6 * int(time_dim)


def check_sdxl_added_cond(cfg: TrainConfig, unet_cfg: Any) -> None:
    """The UNet's added conditioning must take text_encoder_2's pooled projection plus six time ids. A refiner-style
    UNet (five time ids with an aesthetic score) or a text_encoder_2 of another projection width failed in the first
    step with a matmul shape traceback: refuse it in one line before any weights load. A config that cannot be read is
    left to the load that follows."""
    want = sdxl_pooled_width(unet_cfg)
    te2 = text_encoder_config(cfg, "text_encoder_2") if want is not None else None
    if te2 is None or int(te2.projection_dim) == want:
        return
    proj_in, time_dim = int(unet_cfg["projection_class_embeddings_input_dim"]), int(unet_cfg["addition_time_embed_dim"])
    expected = int(te2.projection_dim) + 6 * time_dim
    n_ids = (proj_in - int(te2.projection_dim)) / time_dim
    extra = " (a refiner-style UNet with aesthetic-score time ids)" if n_ids == 5 else ""
    raise ConfigError(f"the teacher's UNet takes projection_class_embeddings_input_dim={proj_in}, but SDXL's added conditioning "
                      f"is text_encoder_2's projection_dim {te2.projection_dim} + 6 time ids x addition_time_embed_dim "
                      f"{time_dim} = {expected}; it expects {n_ids:g} time ids{extra}: not supported.")


def check_sdxl_components(cfg: TrainConfig) -> None:
    """Refuse, from model_index.json alone, an SDXL-type teacher that lacks one of SDXL's two text encoders or tokenizers
    (an SDXL refiner ships only text_encoder_2); loading it failed on the missing folder with a tokenizer backend error.
    A teacher without a readable model_index.json is left to the load."""

    index = teacher_index(cfg)
    if index is None:
        return
    missing = absent_components(index, PROMPT_COMPONENTS["sdxl"])
    if missing:
        raise ConfigError(f"the teacher {cfg.pretrained_teacher_model!r} ({index.get('_class_name')}) has no "
                          f"{', '.join(missing)}: SDXL distillation needs both SDXL text encoders and tokenizers "
                          "(a refiner-style teacher with only text_encoder_2 is not supported).")
    # SDXL's pooled prompt is text_encoder_2's text projection: a CLIPTextModel there has none, so the load as
    # CLIPTextModelWithProjection trained on a randomly initialised projection, silently (diffusers' SDXL pipeline and
    # `tcdistill generate` fail on such a teacher with a NoneType traceback).
    te2 = index["text_encoder_2"][1]
    if te2 != "CLIPTextModelWithProjection":
        raise ConfigError(f"the teacher's text_encoder_2 is a {te2} (model_index.json), which has no text projection: SDXL's pooled "
                          "prompt embedding needs a CLIPTextModelWithProjection with its projection weights (as SDXL base ships).")
