"""Prompt encoding as the Stable Diffusion pipelines do it: their tokenization (textual-inversion tokens expanded) and
StableDiffusionPipeline's prompt states, with and without clip skip, for training, validation, generate and eval alike."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _tokens(tokenizer: Any, captions: list[str]) -> Any:
    """The tokenizer's output (ids and padding mask) padded (and truncated) to its own max length, no hard-coded 77: how SD
    pipelines tokenize. As they do, a multi-vector textual-inversion token the tokenizer holds (`<tok>` with added
    `<tok>_1`, ...; a fine-tune saved after `load_textual_inversion`) is first expanded to all its vectors."""
    added = tokenizer.added_tokens_encoder
    if any(f"{t}_1" in added for t in added):  # else the expansion changes nothing (and its untruncated pass warns)
        from diffusers.loaders import TextualInversionLoaderMixin

        captions = TextualInversionLoaderMixin().maybe_convert_prompt(list(captions), tokenizer)
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")


def tokenize(tokenizer: Any, captions: list[str]) -> Tensor:
    """Token ids as SD pipelines tokenize (`_tokens`)."""
    return _tokens(tokenizer, captions).input_ids


def sd_prompt_states(tokenizer: Any, text_encoder: nn.Module, captions: list[str], device: torch.device,
                     clip_skip: int | None = None) -> Tensor:
    """StableDiffusionPipeline.encode_prompt's prompt states: the last hidden state of `tokenize`'s ids, with the padding
    mask passed only where the text encoder's config sets `use_attention_mask`, as that pipeline does (the pad positions'
    states differ with it: the teacher must be conditioned as it samples); with `clip_skip` N, the hidden state N layers
    before the last through the encoder's final layer norm, as that pipeline's `clip_skip`."""
    enc = _tokens(tokenizer, captions)
    mask = enc.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    if clip_skip is None:
        return text_encoder(enc.input_ids.to(device), attention_mask=mask)[0]
    out = text_encoder(enc.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model`: its final_layer_norm is its own); before, nested.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out.hidden_states[-(clip_skip + 1)])


@torch.no_grad()
def sd_cond_uncond(tokenizer: Any, text_encoder: nn.Module, captions: list[str], device: torch.device,
                   clip_skip: int | None = None) -> tuple[Tensor, Tensor]:
    """The prompt states of `captions` and, one per caption, those of "" (the unconditional prompt, at the same layer as
    training's), both `sd_prompt_states`."""
    cond = sd_prompt_states(tokenizer, text_encoder, captions, device, clip_skip)
    return cond, sd_prompt_states(tokenizer, text_encoder, [""], device, clip_skip).expand_as(cond)


def pipeline_prompts(pipe: Any, prompts: str | list[str], clip_skip: int | None) -> dict[str, Any]:
    """The prompt arguments of a pipeline call that encodes `prompts` under `clip_skip`: the prompts alone without it; SDXL's
    pipeline with its `clip_skip` (and, where its empty prompt is not zeros, the negative: "" at that layer too); for SD's,
    the states themselves (`sd_prompt_states`; the negative: those of "", as training's unconditional prompt:
    `sd_cond_uncond`), since StableDiffusionPipeline's own clip_skip reads `text_encoder.text_model`, which
    transformers >= 5.6's CLIPTextModel lacks (an AttributeError; diffusers issue 14124)."""
    if clip_skip is None:
        return {"prompt": prompts}
    if "text_encoder_2" in pipe.components:
        if pipe.config.force_zeros_for_empty_prompt:  # its CFG negative: zeros, as training's unconditional prompt
            return {"prompt": prompts, "clip_skip": clip_skip}
        # Otherwise the pipeline encodes the negative "" at its default layer whatever its clip_skip; training's
        # unconditional prompt (SDXLFamily.uncond) is "" at the run's: pass that.
        n = 1 if isinstance(prompts, str) else len(prompts)
        with torch.no_grad():
            neg, _, neg_pooled, _ = pipe.encode_prompt([""], device=pipe._execution_device, do_classifier_free_guidance=False,
                                                       clip_skip=clip_skip)
        return {"prompt": prompts, "clip_skip": clip_skip, "negative_prompt_embeds": neg.expand(n, -1, -1),
                "negative_pooled_prompt_embeds": neg_pooled.expand(n, -1)}
    captions = [prompts] if isinstance(prompts, str) else list(prompts)
    cond, neg = sd_cond_uncond(pipe.tokenizer, pipe.text_encoder, captions, pipe._execution_device, clip_skip)
    return {"prompt_embeds": cond, "negative_prompt_embeds": neg}
