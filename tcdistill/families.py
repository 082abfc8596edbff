"""Model-family adapters: how a teacher family loads, encodes prompts, builds its pipeline and saves a LoRA.

The training loop sees only this interface, so SD 1.x/2.x and SDXL share one loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .tcd import Cond


def _from_pretrained(cls: Any, src: str, subfolder: str | None, cfg: TrainConfig, **kw: Any) -> Any:
    """`cls.from_pretrained` with the run's revision/cache; model weights from safetensors only unless opted in."""
    if hasattr(cls, "save_pretrained") and not cls.__name__.endswith(("Tokenizer", "Scheduler")) and not cfg.allow_pickle_weights:
        kw.setdefault("use_safetensors", True)
    kw.setdefault("revision", cfg.teacher_revision)
    return cls.from_pretrained(src, subfolder=subfolder, cache_dir=cfg.cache_dir, **kw)


class SDFamily:
    """SD 1.x / 2.x: one CLIP text encoder; the unconditional prompt is the encoding of ""."""

    name = "sd"

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, vae: nn.Module, unet: nn.Module, noise_scheduler: Any):
        self.tokenizer, self.text_encoder, self.vae, self.unet = tokenizer, text_encoder, vae, unet
        self.noise_scheduler = noise_scheduler
        self.scheduler_config = dict(noise_scheduler.config)
        self._uncond: Cond | None = None
        for m in (text_encoder, vae, unet):
            m.requires_grad_(False)
            m.eval()

    @classmethod
    def load(cls, cfg: TrainConfig) -> "SDFamily":
        """Load tokenizer, text encoder, VAE, UNet and noise schedule of the teacher (hub id or local folder)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        src = cfg.pretrained_teacher_model
        vae = (_from_pretrained(AutoencoderKL, cfg.pretrained_vae_model_name_or_path, None, cfg, revision=None)
               if cfg.pretrained_vae_model_name_or_path else _from_pretrained(AutoencoderKL, src, "vae", cfg))
        return cls(
            tokenizer=_from_pretrained(AutoTokenizer, src, "tokenizer", cfg, use_fast=False),
            text_encoder=_from_pretrained(CLIPTextModel, src, "text_encoder", cfg),
            vae=vae,
            unet=_from_pretrained(UNet2DConditionModel, src, "unet", cfg),
            noise_scheduler=_from_pretrained(DDPMScheduler, src, "scheduler", cfg),
        )

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Frozen encoders to the device in the weight dtype."""
        self.vae.to(device, dtype=dtype)
        self.text_encoder.to(device, dtype=dtype)

    @torch.no_grad()
    def _encode_text(self, captions: list[str], device: torch.device) -> Tensor:
        """Tokenize to the tokenizer's own max length (no hard-coded 77) and take the last hidden state."""
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        return self.text_encoder(ids)[0]

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

    def save_lora_weights(self, output_dir: str, unet_lora_layers: dict[str, Tensor], metadata: dict | None) -> None:
        """Diffusers-format LoRA file (`unet.`-prefixed keys) that `load_lora_weights` takes as is."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            output_dir, unet_lora_layers=unet_lora_layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
        )


FAMILIES: dict[str, type] = {"sd": SDFamily}


def load_family(cfg: TrainConfig) -> SDFamily:
    """Load the teacher through the adapter for its family (SD 1.x/2.x by default)."""
    return FAMILIES[cfg.model_family].load(cfg)
