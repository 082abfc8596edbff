"""Adapters and settings for the diffusers models: the UNet -> Denoiser adapter, gradient checkpointing, attention,
channels_last / torch.compile, and VAE latents."""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .config import TrainConfig
from .tcd import Cond, guidance_embedding

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # flag value -> dtype (also accelerate's names)


class UNetDenoiser:
    """Adapter: a diffusers UNet as a `Denoiser` (inputs cast to its dtype; `w` fed as `timestep_cond`).

    `native=True` runs the UNet outside any enclosing autocast, in its own dtype: for a frozen teacher whose weights
    are already bf16/fp16, autocast only adds a cast check per op and upcasts every GroupNorm to fp32 (a round trip
    through fp32 activations), which is how diffusers' half-precision pipelines run anyway.
    """

    def __init__(self, unet: nn.Module, w_embedding_dim: int | None = None, dtype: torch.dtype | None = None, native: bool = False):
        self.unet = unet
        self.w_embedding_dim = w_embedding_dim
        self.dtype = dtype
        self.native = native

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond, w: Tensor | None = None) -> Tensor:
        dtype = self.dtype or x_t.dtype
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype)}
        if "text_embeds" in cond:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        if w is not None and self.w_embedding_dim:
            kwargs["timestep_cond"] = guidance_embedding(w, self.w_embedding_dim).to(device=x_t.device, dtype=dtype)
        with torch.autocast(x_t.device.type, enabled=False) if self.native else contextlib.nullcontext():
            return self.unet(x_t.to(dtype), t, **kwargs, return_dict=False)[0]


def _saved_ops() -> list[Any]:
    """The compute-bound aten ops whose outputs selective checkpointing keeps: convolutions, matmuls, attention."""
    aten = torch.ops.aten
    names = ("convolution", "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu")
    return [getattr(aten, n).default for n in names if hasattr(aten, n)]


def _checkpoint(module: nn.Module, *args: Any, saved_ops: list[Any] | None = None) -> Any:
    """diffusers' per-block checkpoint call (non-reentrant). The backward's recompute runs the block with the tensors
    this forward saw: under a call-time swap (the student's weight-dtype copies, `torch.func.functional_call`) the
    block's parameters are the copies now, but the module's own fp32 weights again by the time the backward runs,
    which would re-cast every weight and, under selective checkpointing, dispatch other ops than the forward did.
    `saved_ops`: selective checkpointing's kept ops (listed once, outside any compiled region), or None for 'full'."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from .unet_views import FunctionalUNet

    seen = dict(module.named_parameters())
    fn: Any = FunctionalUNet(module, seen) if any(not isinstance(p, nn.Parameter) for p in seen.values()) else module.__call__
    if saved_ops is None:
        return checkpoint(fn, *args, use_reentrant=False)
    kw = {"context_fn": functools.partial(create_selective_checkpoint_contexts, saved_ops)}
    if torch.compiler.is_compiling():  # a traced region: its casts are graph ops, no autocast cache
        return checkpoint(fn, *args, use_reentrant=False, **kw)
    # Selective checkpointing replays the forward's ops one for one in the recompute. Autocast caches its casts of fp32
    # leaf weights for the whole region: weights an earlier forward in it already cast (the LoRA student's layer-choice
    # pass, a LoRA target under autocast) were not cast again here but are in the recompute, whose cache is empty, and
    # the backward failed. The block runs without that cache; the recompute restores the setting.
    cache = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        return checkpoint(fn, *args, use_reentrant=False, **kw)
    finally:
        torch.set_autocast_cache_enabled(cache)


def enable_gradient_checkpointing(unet: nn.Module, policy: str = "full") -> None:
    """Checkpoint each of the UNet's blocks (diffusers' hook). 'full' recomputes a block's whole forward in the
    backward. 'selective' keeps the conv, matmul and attention outputs and recomputes only the memory-bound ops
    between them (norms, activations, residual adds, casts): less memory saved than 'full', but the expensive ops
    are not run twice."""
    unet.enable_gradient_checkpointing(functools.partial(_checkpoint, saved_ops=_saved_ops() if policy == "selective" else None))


_XFORMERS_WARNED: set[str] = set()


def enable_memory_efficient_attention(unet: nn.Module) -> bool:
    """xformers where it can run; otherwise warn once and keep PyTorch's SDPA (never crash)."""
    try:
        import xformers  # noqa: F401

        if not torch.cuda.is_available():
            raise RuntimeError("xformers needs a CUDA device")
        unet.enable_xformers_memory_efficient_attention()
        return True
    except Exception as e:  # noqa: BLE001 - ImportError, CUDA and build mismatches all mean "not here"
        if str(e) not in _XFORMERS_WARNED:  # once per reason, not once per UNet (student, teacher, target)
            _XFORMERS_WARNED.add(str(e))
            logger.warning("xformers is unavailable (%s); using PyTorch scaled_dot_product_attention instead.", e)
        return False


def keep_channels_last(optimizer: torch.optim.Optimizer, channels_last: bool) -> torch.optim.Optimizer:
    """Under --channels_last, hand each 4-D parameter its own channels_last storage back after every step of an
    optimizer that makes parameters contiguous as it steps them (bitsandbytes' 8-bit AdamW: `p.data =
    p.data.contiguous()`). Else the student's conv weights leave --channels_last after the first step, a resumed run
    (its weights load back channels_last) computes in another layout than the uninterrupted one, and a view taken of a
    weight before the step (the fp32 merged LoRA target's adapter factors) goes stale."""
    if not channels_last:
        return optimizer
    held: dict[nn.Parameter, torch.Tensor] = {}

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        held.update((p, p.data) for g in opt.param_groups for p in g["params"] if p.dim() == 4)

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, data in held.items():
            if p.data_ptr() != data.data_ptr():  # copied back in place: views of `data` stay live
                data.copy_(p.data)
                p.data = data
        held.clear()

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


def speed_up_unets(unets: Iterable[nn.Module], cfg: TrainConfig) -> None:
    """--channels_last / --compile_unet on each of the (distinct) UNets; `Module.compile` keeps state-dict keys unchanged."""
    for m in unets:
        if cfg.channels_last:
            m.to(memory_format=torch.channels_last)
        if cfg.compile_unet:
            # Static shapes: the loss keeps every batch fixed (static_shapes), so each UNet compiles once per call
            # site (student B with grad, teacher 2B, target B) and never recompiles with symbolic sizes.
            if cfg.compile_scope == "unet":
                m.compile(mode=cfg.compile_mode, dynamic=False)
            else:
                compile_blocks(m, cfg.compile_mode)


def eager_unets(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """Run compiled UNets eagerly in this block (validation sampling, the bench's FLOP and op counts): their eval mode
    and batch sizes are new guards, so they would compile again for a few calls."""
    return torch.compiler.set_stance("force_eager") if cfg.compile_unet else contextlib.nullcontext()


REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def compile_blocks(unet: nn.Module, mode: str) -> None:
    """Regional compilation (diffusers' `compile_repeated_blocks`) over the transformer and ResNet blocks."""
    import torch._dynamo

    # All blocks of a class share one code object, so each (block shape, call site) is one more entry in its dynamo
    # cache: SD 1.5's student alone compiled 15 ResNet graphs (CPU), and there are 3 call sites, past the default limit of 8 (after which
    # dynamo would silently run the remaining blocks eagerly).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    unet._repeated_blocks = list(REGIONAL_BLOCKS)  # diffusers lists only BasicTransformerBlock for this UNet
    unet.compile_repeated_blocks(mode=mode, dynamic=False)


def latent_normalization(vae_config: Any, family: str) -> tuple[Tensor, Tensor] | None:
    """Per-channel `(latents_mean, latents_std)` [1, C, 1, 1] where the family's pipeline decodes with them:
    StableDiffusionXLPipeline decodes `latents * latents_std / scaling_factor + latents_mean` when the VAE config sets
    both, so its latents must be encoded as `(z - latents_mean) * scaling_factor / latents_std`; SD pipelines ignore
    them (None)."""
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if family != "sdxl" or mean is None or std is None:
        return None
    return (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))


def scale_latents(z: Tensor, vae_config: Any, norm: tuple[Tensor, Tensor] | None = None, std_only: bool = False) -> Tensor:
    """VAE latents -> the diffusion model's space: `z * scaling_factor`, or `(z - mean) * scaling_factor / std` under `norm`
    (`std_only`: a posterior standard deviation, which the mean does not shift)."""
    z = z.float() * vae_config.scaling_factor
    if norm is None:
        return z
    mean, std = (t.to(z.device) for t in norm)
    return (z if std_only else z - mean * vae_config.scaling_factor) / std


@torch.no_grad()
def encode_latents(vae: nn.Module, pixels: Tensor, batch_size: int, norm: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """`x0 = vae.encode(image).latent_dist.sample() * scaling_factor`, in chunks of `batch_size` images (normalised per
    channel under `norm`, `latent_normalization`)."""
    dtype = next(vae.parameters()).dtype
    out = []
    for chunk in pixels.split(max(1, batch_size)):
        out.append(vae.encode(chunk.to(dtype)).latent_dist.sample())
    return scale_latents(torch.cat(out), vae.config, norm)
