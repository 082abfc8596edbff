"""Model-family adapters: how a teacher family loads, encodes prompts, builds its pipeline and saves a LoRA.

The training loop sees only this interface, so SD 1.x/2.x and SDXL share one loop.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .config import ConfigError, TrainConfig, first_line
from .prompts import sd_prompt_states, tokenize
from .tcd import Cond


# A weights file of diffusers / transformers: `<name>[.<variant>][-0000i-of-0000n].<safetensors|bin>`.
_WEIGHT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[A-Za-z0-9_]+))?"
                          r"(?:-\d{5}-of-\d{5})?\.(?P<ext>safetensors|bin)$")


def weights_variant(src: str, subfolder: str | None = None, allow_bin: bool = False) -> str | None:
    """The variant (e.g. 'fp16') of a local model folder whose loadable weights are only variant files (a pipeline saved
    with `save_pretrained(..., variant="fp16")`: `diffusion_pytorch_model.fp16.safetensors`). diffusers and transformers
    load those only when asked for that variant and otherwise fail on the folder. None where plain weights load (`.bin`
    counts only with `allow_bin`), for no or several variants, and for a hub id."""
    folder = Path(src) / subfolder if subfolder else Path(src)
    if not folder.is_dir():
        return None
    variants = set()
    for f in folder.iterdir():
        m = _WEIGHT_FILE.match(f.name)
        if m is None or (m["ext"] == "bin" and not allow_bin):
            continue
        if m["variant"] is None:
            return None
        variants.add(m["variant"])
    return variants.pop() if len(variants) == 1 else None


def pipeline_variant(src: str) -> str | None:
    """`weights_variant` over a local pipeline folder's components: the variant to pass to `DiffusionPipeline.from_pretrained`
    (it then takes plain files for the components that have no variant files)."""
    folder = Path(src)
    found = {weights_variant(src, d.name, allow_bin=True) for d in folder.iterdir() if d.is_dir()} if folder.is_dir() else set()
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def from_pretrained_checked(cls: Any, src: str, subfolder: str | None, cfg: TrainConfig, **kw: Any) -> Any:
    """`cls.from_pretrained` with the run's revision/cache; model weights from safetensors only unless opted in, and from
    a local folder's variant files where it holds only those (`weights_variant`)."""
    if hasattr(cls, "save_pretrained") and not cls.__name__.endswith(("Tokenizer", "Scheduler")):
        if not cfg.allow_pickle_weights:
            kw.setdefault("use_safetensors", True)
        variant = weights_variant(src, subfolder, allow_bin=cfg.allow_pickle_weights)
        if variant is not None:
            kw.setdefault("variant", variant)
    kw.setdefault("revision", cfg.teacher_revision)
    return cls.from_pretrained(src, subfolder=subfolder, cache_dir=cfg.cache_dir, **kw)


def load_tokenizer(cfg: TrainConfig, subfolder: str, loaded: dict[str, Any] | None = None) -> Any:
    """The teacher's tokenizer in `subfolder`: the one in `loaded` (what the pre-load check read) or a fresh load."""
    if loaded and subfolder in loaded:
        return loaded[subfolder]
    import transformers

    # The class model_index.json names, as diffusers' pipelines load it: AutoTokenizer also asks for
    # `<subfolder>/config.json`, which SD repos lack, and offline (HF_HUB_OFFLINE) on a cache made by snapshot_download
    # (no record of that absent file) the lookup failed the run. AutoTokenizer stays for folders without an index.
    entry = (teacher_index(cfg) or {}).get(subfolder)
    name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == "transformers" else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        return from_pretrained_checked(transformers.AutoTokenizer, cfg.pretrained_teacher_model, subfolder, cfg, use_fast=False)
    return from_pretrained_checked(cls, cfg.pretrained_teacher_model, subfolder, cfg)


def load_error(what: str, e: Exception) -> ConfigError:
    """A failed weights load as one line; the --allow_pickle_weights hint only where no safetensors file was found (a
    .bin-only model), not for a damaged one."""
    missing_st = re.search(r"no file named \S+\.safetensors", str(e)) is not None
    hint = " (only safetensors weights load by default; pass --allow_pickle_weights to allow .bin)" if missing_st else ""
    return ConfigError(f"{what}: {first_line(e)}{hint}")


def _load_vae(cfg: TrainConfig) -> nn.Module:
    """The teacher's VAE, or `--pretrained_vae_model_name_or_path` (e.g. an fp16-safe SDXL VAE)."""
    from diffusers import AutoencoderKL

    if cfg.pretrained_vae_model_name_or_path:
        return from_pretrained_checked(AutoencoderKL, cfg.pretrained_vae_model_name_or_path, None, cfg, revision=None)
    return from_pretrained_checked(AutoencoderKL, cfg.pretrained_teacher_model, "vae", cfg)


# The scheduler-config fields that define the noise schedule and what the network predicts.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr")


def _init_defaults(cls: Any) -> dict[str, Any]:
    """The keyword defaults of a diffusers class's `__init__` (what `from_config` uses for fields a config leaves out)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def schedule_fields(config: Any) -> dict[str, Any]:
    """The schedule-defining fields of a scheduler config, those its file leaves out filled in from the defaults of its own
    class (`_class_name`), to pass as explicit keyword arguments whenever another scheduler class is built from it.
    diffusers' `from_config` drops every field the file left out (`_use_default_values`) and the new class uses its own
    defaults instead: TCDScheduler's betas (scaled_linear 0.00085..0.012) are not DDIM's, PNDM's or Euler's (linear
    0.0001..0.02), so a student would sample on another noise schedule than the one it was trained on."""
    import diffusers

    out = {k: config[k] for k in SCHEDULE_KEYS if k in config}
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if isinstance(cls, type):
        defaults = _init_defaults(cls)
        out.update({k: defaults[k] for k in SCHEDULE_KEYS if k not in out and k in defaults})
    return out


def sampler_overrides(schedule_config: Any, sampler: str) -> dict[str, Any]:
    """The schedule fields of a trained schedule's config (SCHEDULE_KEYS but trained_betas) that differ from the defaults of
    the diffusers class `sampler`: what `sampler.from_config(pipe.scheduler.config, ...)` in a user's code must pass
    explicitly, since from_config replaces fields the teacher's file left to its own class's defaults with `sampler`'s."""
    import diffusers

    defaults = _init_defaults(getattr(diffusers, sampler))
    return {k: schedule_config[k] for k in SCHEDULE_KEYS
            if k != "trained_betas" and k in schedule_config and k in defaults and schedule_config[k] != defaults[k]}


def teacher_scheduler_config(cfg: TrainConfig) -> dict[str, Any]:
    """The teacher's scheduler_config.json as saved (its `_class_name` names the class whose defaults fill the rest)."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(cfg.pretrained_teacher_model, subfolder="scheduler", revision=cfg.teacher_revision,
                                          cache_dir=cfg.cache_dir))


def ddpm_schedule(config: Any) -> Any:
    """A scheduler config (any DDPM-type class: PNDM, DDIM, Euler, DPM-Solver...) as a DDPMScheduler, with the schedule
    fields it leaves out taken from its own class's defaults, not DDPMScheduler's (`schedule_fields`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config, **schedule_fields(config))


def check_scheduler_defaults(raw: dict[str, Any], where: str) -> None:
    """Refuse a scheduler config (`where`) naming a class diffusers cannot build for lack of a package (its placeholder:
    LMSDiscreteScheduler without scipy) when the file leaves beta fields to that class's defaults: they are unknown here,
    and DDPMScheduler's would fill them in, another schedule than the teacher's."""
    import diffusers

    backends = getattr(getattr(diffusers, str(raw.get("_class_name")), None), "_backends", None)
    missing = [k for k in ("beta_start", "beta_end", "beta_schedule") if k not in raw]
    if backends and missing and raw.get("trained_betas") is None:
        need = [b for b in backends if b != "torch"] or backends
        raise ConfigError(f"the teacher's scheduler class {raw['_class_name']} needs {', '.join(need)} (not installed) for the "
                          f"defaults of {', '.join(missing)}, which {where} leaves out: pip install {' '.join(need)}, or write "
                          "them into the file.")


def scheduler_stand_in(base: str) -> Any:
    """`ddpm_schedule` of the pipeline `base`'s scheduler config where diffusers cannot build the class it names
    (LMSDiscreteScheduler without scipy: from_pretrained raised its ImportError as a traceback), else None. Only the
    schedule is used after loading: generate samples with TCDScheduler over it and eval reads it, as training does."""
    import diffusers

    try:
        raw = dict(diffusers.DDPMScheduler.load_config(base, subfolder="scheduler"))
    except Exception:  # noqa: BLE001 - reported by the pipeline load that follows
        return None
    if not hasattr(getattr(diffusers, str(raw.get("_class_name")), None), "_backends"):
        return None
    check_scheduler_defaults(raw, f"{base}/scheduler/scheduler_config.json")
    return ddpm_schedule(raw)


def load_noise_scheduler(cfg: TrainConfig) -> Any:
    """The teacher's noise schedule as a DDPMScheduler (`ddpm_schedule` of its scheduler config)."""
    return ddpm_schedule(teacher_scheduler_config(cfg))


def _freeze(*modules: nn.Module) -> None:
    """Frozen, eval-mode teacher parts."""
    for m in modules:
        m.requires_grad_(False)
        m.eval()


class SDFamily:
    """SD 1.x / 2.x: one CLIP text encoder; the unconditional prompt is the encoding of "" (at --clip_skip's layer too:
    see SDXLFamily's note)."""

    name = "sd"

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, vae: nn.Module, unet: nn.Module, noise_scheduler: Any,
                 clip_skip: int | None = None):
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.noise_scheduler = noise_scheduler
        self.clip_skip = clip_skip
        self.scheduler_config = dict(noise_scheduler.config)
        self._uncond: Cond | None = None
        _freeze(text_encoder, vae, unet)

    @classmethod
    def load(cls, cfg: TrainConfig, tokenizers: dict[str, Any] | None = None) -> "SDFamily":
        """Load tokenizer (unless in `tokenizers`), text encoder, VAE, UNet and noise schedule of the teacher (hub id or local folder)."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        src = cfg.pretrained_teacher_model
        return cls(
            tokenizer=load_tokenizer(cfg, "tokenizer", tokenizers),
            text_encoder=from_pretrained_checked(CLIPTextModel, src, "text_encoder", cfg),
            vae=_load_vae(cfg),
            unet=from_pretrained_checked(UNet2DConditionModel, src, "unet", cfg),
            noise_scheduler=load_noise_scheduler(cfg),
            clip_skip=cfg.clip_skip,
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Frozen encoders to the device in the weight dtype."""
        self.vae.to(device, dtype=dtype)
        self.text_encoder.to(device, dtype=dtype)

    @torch.no_grad()
    def _encode_text(self, captions: list[str], device: torch.device) -> Tensor:
        """The pipeline's prompt states (`sd_prompt_states`) under the run's --clip_skip."""
        return sd_prompt_states(self.tokenizer, self.text_encoder, captions, device, self.clip_skip)

    def encode(self, batch: dict[str, Any], device: torch.device) -> Cond:
        """Conditioning for a data batch."""
        return {"encoder_hidden_states": self._encode_text(list(batch["captions"]), device)}

    def uncond(self, batch: dict[str, Any], device: torch.device) -> Cond:
        """The empty prompt's encoding, computed once and expanded to the batch."""
        n = len(batch["captions"])
        if self._uncond is None or self._uncond["encoder_hidden_states"].device != device:
            self._uncond = {"encoder_hidden_states": self._encode_text([""], device)}
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._uncond.items()}

    def pipeline(self, unet: nn.Module, scheduler: Any) -> Any:
        """A diffusers pipeline over the teacher's parts with `unet` and `scheduler`."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def save_lora_weights(self, path: Path, unet_lora_layers: dict[str, Tensor], metadata: dict | None) -> None:
        """Diffusers-format LoRA file at `path` (`unet.`-prefixed keys) that `load_lora_weights` takes as is."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            str(path.parent), unet_lora_layers=unet_lora_layers, weight_name=path.name, safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )


def unet_family(unet_config: Any) -> str:
    """'sdxl' for a UNet with SDXL's text_time added conditioning (pooled prompt + size/crop ids), else 'sd'."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"


def unet_sample_hw(unet_config: Any) -> tuple[int, int]:
    """The UNet's latent (height, width): its `sample_size`, an int or [height, width] (diffusers takes either)."""
    size = unet_config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# Flag defaults of the SDXL entry scripts, as in diffusers' SDXL LCM scripts: 1024 px, w from 3, and the LAION-style
# size / watermark filters (here a sample missing those json fields passes; see data._check_filters).
SDXL_FLAG_DEFAULTS: dict[str, Any] = {"resolution": 1024, "w_min": 3.0, "min_image_size": 700, "max_pwatermark": 0.5,
                                      "vae_encode_batch_size": 8}


def flag_defaults(family: str) -> dict[str, Any]:
    """The flag defaults a family's entry scripts set over TrainConfig's own (SDXL_FLAG_DEFAULTS; none for SD)."""
    return dict(SDXL_FLAG_DEFAULTS) if family == "sdxl" else {}


def script_defaults(family: str) -> dict[str, Any]:
    """Every flag's default in a family's entry scripts: TrainConfig's, with `flag_defaults(family)` over them."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)} | flag_defaults(family)


def teacher_index(cfg: TrainConfig) -> dict[str, Any] | None:
    """The teacher pipeline's model_index.json (its components and pipeline flags), or None where it cannot be read
    (then the load that follows reports the problem, or the defaults apply)."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(cfg.pretrained_teacher_model, revision=cfg.teacher_revision, cache_dir=cfg.cache_dir))
    except Exception:  # noqa: BLE001 - missing, unreadable or not a pipeline folder
        return None


# The prompt encoders each family's pipeline needs (an SDXL refiner ships only the second pair).
PROMPT_COMPONENTS: dict[str, tuple[str, ...]] = {"sd": ("tokenizer", "text_encoder"),
                                                 "sdxl": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}


def absent_components(index: dict[str, Any], names: Sequence[str]) -> list[str]:
    """The `names` a pipeline's model_index.json does not hold: no entry, or [null, null] (saved without that component)."""
    return [c for c in names if not isinstance(index.get(c), (list, tuple)) or None in index[c][:2]]


def sdxl_force_zeros(cfg: TrainConfig) -> bool:
    """The teacher pipeline's `force_zeros_for_empty_prompt` (model_index.json; diffusers' default True when absent)."""
    return bool((teacher_index(cfg) or {}).get("force_zeros_for_empty_prompt", True))


class SDXLFamily:
    """SDXL: two CLIP text encoders, pooled `text_embeds`, micro-conditioning `time_ids`, and the unconditional prompt of
    the teacher pipeline (zeros under its `force_zeros_for_empty_prompt`, as SDXL base)."""

    name = "sdxl"

    # clip_skip (--clip_skip): the prompt states N layers further back, as the pipelines' `clip_skip`. The encoding of ""
    # (the unconditional prompt, where it is not zeros) takes it too, as the prompt dropout the teacher was trained with
    # gave it; diffusers' pipelines leave their negative prompt at the default layer (a known asymmetry of their CFG).
    def __init__(self, tokenizers: tuple[Any, Any], text_encoders: tuple[nn.Module, nn.Module], vae: nn.Module, unet: nn.Module,
                 noise_scheduler: Any, resolution: int = 1024, fix_crop_and_size: bool = False,
                 force_zeros_for_empty_prompt: bool = True, clip_skip: int | None = None):
        self.tokenizer, self.tokenizer_2 = tokenizers
        self.text_encoder, self.text_encoder_2 = text_encoders
        self.vae, self.unet = vae, unet
        self.noise_scheduler = noise_scheduler
        self.scheduler_config = dict(noise_scheduler.config)
        self.resolution, self.fix_crop_and_size = resolution, fix_crop_and_size
        self.force_zeros_for_empty_prompt, self.clip_skip = force_zeros_for_empty_prompt, clip_skip
        self._uncond: tuple[Tensor, Tensor] | None = None
        _freeze(*text_encoders, vae, unet)

    @classmethod
    def load(cls, cfg: TrainConfig, tokenizers: dict[str, Any] | None = None) -> "SDXLFamily":
        """Load both tokenizers (unless in `tokenizers`) and text encoders, VAE, UNet and noise schedule of an SDXL teacher."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        src = cfg.pretrained_teacher_model
        return cls(
            tokenizers=(load_tokenizer(cfg, "tokenizer", tokenizers), load_tokenizer(cfg, "tokenizer_2", tokenizers)),
            text_encoders=(from_pretrained_checked(CLIPTextModel, src, "text_encoder", cfg),
                           from_pretrained_checked(CLIPTextModelWithProjection, src, "text_encoder_2", cfg)),
            vae=_load_vae(cfg),
            unet=from_pretrained_checked(UNet2DConditionModel, src, "unet", cfg),
            # Any scheduler config (SDXL ships EulerDiscreteScheduler's) gives the same DDPM betas / prediction_type.
            noise_scheduler=load_noise_scheduler(cfg),
            resolution=cfg.resolution,
            fix_crop_and_size=cfg.use_fix_crop_and_size,
            force_zeros_for_empty_prompt=sdxl_force_zeros(cfg),
            clip_skip=cfg.clip_skip,
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Text encoders in the weight dtype; the VAE too, except under fp16 a VAE whose config sets `force_upcast` (SDXL's
        own, which overflows in fp16) stays fp32, as the SDXL pipeline upcasts it to decode. The fp16-fix VAE sets it false
        and runs in fp16; diffusers' SDXL scripts cast any --pretrained_vae_model_name_or_path to fp16, which for a passed
        copy of SDXL's own VAE (stabilityai/sdxl-vae) made NaN latents."""
        upcast = dtype == torch.float16 and bool(self.vae.config.get("force_upcast", True))
        self.vae.to(device, dtype=torch.float32 if upcast else dtype)
        self.text_encoder.to(device, dtype=dtype)
        self.text_encoder_2.to(device, dtype=dtype)

    @torch.no_grad()
    def _encode_text(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Both encoders' penultimate hidden states (--clip_skip N: N layers before those), concatenated, and the second's
        pooled projection (the pipeline's encode_prompt)."""
        states = []
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = enc(tokenize(tok, captions).to(device), output_hidden_states=True)
            states.append(out.hidden_states[-(2 + (self.clip_skip or 0))])
        return torch.cat(states, dim=-1), out.text_embeds

    def time_ids(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        """Micro-conditioning per sample: (original h, w, crop top, left, target h, w), as the pipeline's add_time_ids."""
        n = len(batch["captions"])
        target = torch.tensor([[self.resolution, self.resolution]], dtype=torch.float32).expand(n, 2)
        if self.fix_crop_and_size or "original_sizes" not in batch:
            original, crop = target, torch.zeros(n, 2)
        else:
            original, crop = batch["original_sizes"].float(), batch["crop_top_lefts"].float()
        return torch.cat([original, crop, target], dim=1).to(device)

    def encode(self, batch: dict[str, Any], device: torch.device) -> Cond:
        """Conditioning for a data batch: `encoder_hidden_states`, pooled `text_embeds` and `time_ids`."""
        hidden, pooled = self._encode_text(list(batch["captions"]), device)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": self.time_ids(batch, device)}

    def uncond(self, batch: dict[str, Any], device: torch.device) -> Cond:
        """The teacher pipeline's unconditional prompt with the batch's own time ids: zero prompt and pooled embeddings
        under `force_zeros_for_empty_prompt` (SDXL base; the LCM-SDXL scripts), else the encoding of "" (what its
        pipeline's CFG then uses as the negative prompt)."""
        n = len(batch["captions"])
        if self.force_zeros_for_empty_prompt:
            width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
            hidden = torch.zeros(1, self.tokenizer.model_max_length, width, device=device)
            pooled = torch.zeros(1, self.text_encoder_2.config.projection_dim, device=device)
        else:
            if self._uncond is None or self._uncond[0].device != device:
                self._uncond = self._encode_text([""], device)  # computed once
            hidden, pooled = self._uncond
        return {"encoder_hidden_states": hidden.expand(n, -1, -1), "text_embeds": pooled.expand(n, -1),
                "time_ids": self.time_ids(batch, device)}

    def pipeline(self, unet: nn.Module, scheduler: Any) -> Any:
        """A StableDiffusionXLPipeline over the teacher's parts with `unet` and `scheduler` (the teacher's empty-prompt rule)."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False,
        )

    def save_lora_weights(self, path: Path, unet_lora_layers: dict[str, Tensor], metadata: dict | None) -> None:
        """Diffusers-format SDXL LoRA file at `path` (`unet.`-prefixed keys) for `StableDiffusionXLPipeline.load_lora_weights`."""
        from diffusers import StableDiffusionXLPipeline

        StableDiffusionXLPipeline.save_lora_weights(
            str(path.parent), unet_lora_layers=unet_lora_layers, weight_name=path.name, safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )


FAMILIES: dict[str, type] = {"sd": SDFamily, "sdxl": SDXLFamily}
# What the trainer, the cache and validation take: either adapter (the same attributes: name, vae, unet,
# noise_scheduler, scheduler_config; the same methods: to, encode, uncond, pipeline, save_lora_weights).
ModelFamily = SDFamily | SDXLFamily


def load_family(cfg: TrainConfig, tokenizers: dict[str, Any] | None = None) -> ModelFamily:
    """Load the teacher through the adapter for its family (SD 1.x/2.x by default, or SDXL); `tokenizers`: those
    `teacher_checks.check_teacher_config` already read, by subfolder (the rest load here)."""
    from safetensors import SafetensorError

    try:
        return FAMILIES[cfg.model_family].load(cfg, tokenizers)
    except SafetensorError as e:  # transformers lets it through: a cut-short text encoder file was a traceback
        folders = [f for f in (cfg.pretrained_teacher_model, cfg.pretrained_vae_model_name_or_path) if f]
        raise ConfigError(unreadable_weights(folders, e)) from None


def unreadable_weights(folders: Sequence[str], error: Exception) -> str:
    """The one-line error for a SafetensorError while loading the model folders `folders`: names the first .safetensors file
    in them whose header cannot be read (else the first folder)."""
    from safetensors import safe_open

    bad = folders[0]
    for f in (f for d in folders if Path(d).is_dir() for f in sorted(Path(d).rglob("*.safetensors"))):
        try:
            with safe_open(str(f), framework="pt"):
                continue
        except Exception:  # noqa: BLE001 - SafetensorError, OSError
            bad = str(f)
            break
    return f"{bad} cannot be read ({first_line(error)}): a weight file cut short or damaged; copy or download it again"
