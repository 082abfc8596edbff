"""Call-time views of shared UNets: the same weights run another way for one call (adapters off, LoRA merged into
the weights, parameters swapped for weight-dtype copies), so no second UNet is loaded and no weight is written."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models import UNetDenoiser
from .tcd import Denoiser


def tuner_layers(unet: nn.Module) -> list[nn.Module]:
    """The peft adapter layers of a UNet."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


_UNSET = object()


class WithLayerAttr:
    """Calls `inner` with `attr = value` on each of `layers` for the call; the old values come back after, even on error."""

    def __init__(self, inner: Any, layers: list[nn.Module], attr: str, value: Any):
        self.inner, self.layers, self.attr, self.value = inner, layers, attr, value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        old = [m.__dict__.get(self.attr, _UNSET) for m in self.layers]
        for m in self.layers:
            setattr(m, self.attr, self.value)
        try:
            return self.inner(*args, **kwargs)
        finally:
            for m, v in zip(self.layers, old):
                if v is _UNSET:
                    delattr(m, self.attr)
                else:
                    setattr(m, self.attr, v)


class AdaptersOff(WithLayerAttr):
    """The teacher view of a LoRA'd UNet: the same module with its adapters disabled for the call."""

    def __init__(self, inner: Denoiser, unet: nn.Module):
        # unet.disable_adapters()/enable_adapters() walk every module and flip requires_grad on every adapter
        # (measured 17 ms per call pair on the tiny UNet); the teacher runs under no_grad, so flipping the
        # layers' own switch is enough (0.6 ms). Fall back to the public calls if peft renames it.
        super().__init__(inner, tuner_layers(unet), "_disable_adapters", True)
        self.unet = unet
        self.fast = bool(self.layers) and all(hasattr(m, "_disable_adapters") for m in self.layers)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.fast:
            return super().__call__(*args, **kwargs)
        self.unet.disable_adapters()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


class FunctionalUNet:
    """Calls a module with some parameters replaced for the call (`torch.func.functional_call`); none are written."""

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor] | None = None):
        self.module = module
        self.params: dict[str, torch.Tensor] = params or {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.module, self.params, args, kwargs, strict=False)


class DtypeCopies:
    """`dst[i]`: a copy of `src[i]` in another dtype, all refreshed by one multi-tensor copy (the cast included;
    one launch on CUDA) when the owner says the sources changed (after an optimizer step, a load)."""

    def __init__(self, src: list[torch.Tensor], dst: list[torch.Tensor]):
        assert len(src) == len(dst)
        self.src, self.dst = src, dst

    @torch.no_grad()
    def refresh(self) -> None:
        if self.dst:
            torch._foreach_copy_(self.dst, self.src)


class MergedAdapters:
    """The LoRA target view: the base UNet run with `W + scaling B A` in place of each adapted weight, adapters off.

    The same function as the adapted UNet (to float rounding), but each adapted layer runs one base op instead of
    base + down + up + scale + add: on the tiny UNet (rank 64 on 32-64 channels) the target forward went from 69 to
    51 ms per step, the merge included (measured).
    The merged weights live only during the call (the base weights, which are also the teacher, are never written).
    Under mixed precision the fp32 factors A, B are cast to the base weight's dtype once per optimizer step
    (`factors.refresh()`, which the strategy calls after each step and each load), not twice per layer at every merge.
    """

    def __init__(self, unet: nn.Module, dtype: torch.dtype | None = None, native: bool = False):
        self.call = FunctionalUNet(unet)
        # native: every weight the call sees (base and merged) is in the weight dtype, so it runs outside autocast
        self.view = AdaptersOff(UNetDenoiser(self.call, None, dtype, native=native), unet)  # type: ignore[arg-type]
        names = {id(m): n for n, m in unet.named_modules()}
        # (weight name, layer, [(adapter, B, A) in the weight's dtype, or (adapter, None, None): peft's delta])
        self.layers: list[tuple[str, nn.Module, list[tuple[str, Any, Any]]]] = []
        src: list[torch.Tensor] = []
        dst: list[torch.Tensor] = []
        for m in self.view.layers:
            w = m.get_base_layer().weight
            terms: list[tuple[str, Any, Any]] = []
            for a in m.active_adapters:
                A, B = m.lora_A[a].weight, m.lora_B[a].weight
                if getattr(m, "fan_in_fan_out", False) or B.shape[2:].numel() != 1 or A.flatten(1).shape[1] != w.flatten(1).shape[1]:
                    terms.append((a, None, None))  # layouts this fast path does not know
                    continue
                low = []
                for t in (B, A):
                    low.append(t.detach() if t.dtype == w.dtype else t.detach().to(w.dtype))
                    if low[-1].dtype != t.dtype:
                        src.append(t)
                        dst.append(low[-1])
                terms.append((a, low[0].flatten(1), low[1].flatten(1)))  # views: refreshed in place
            self.layers.append((f"{names[id(m)]}.base_layer.weight", m, terms))
        self.factors = DtypeCopies(src, dst)

    @staticmethod
    def applies(unet: nn.Module) -> bool:
        """Plain LoRA only: DoRA, LoRA biases and dropout (the train-mode target applies it) are not a weight delta."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in unet.modules() if hasattr(m, "base_layer")]
        return bool(layers) and all(
            isinstance(m, LoraLayer) and isinstance(getattr(m.get_base_layer(), "weight", None), torch.Tensor)
            and not any(m.use_dora.get(a, False) or getattr(m, "lora_bias", {}).get(a, False) for a in m.active_adapters)
            and all(isinstance(m.lora_dropout[a], nn.Identity) for a in m.active_adapters)
            for m in layers)

    @torch.no_grad()
    def _merged(self) -> dict[str, torch.Tensor]:
        """`W + scaling B A` per adapted weight: one addmm per layer (peft's `get_delta_weight` runs a k x k conv
        delta as a conv over the channels, ~2x slower on the tiny UNet), rounded once to the weight's dtype."""
        out = {}
        for name, m, terms in self.layers:
            w = m.get_base_layer().weight
            merged = w.flatten(1)
            for a, B, A in terms:
                merged = (merged + m.get_delta_weight(a).to(w.dtype).flatten(1) if B is None
                          else torch.addmm(merged, B, A, alpha=m.scaling[a]))
            out[name] = merged.view_as(w)
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.call.params = self._merged()
        try:
            return self.view(*args, **kwargs)
        finally:
            self.call.params = {}


class _CastBack(torch.autograd.Function):
    """Stand-ins for fp32 weights: forward hands out their weight-dtype copies (views, no kernel); backward returns
    the copies' gradients to the fp32 weights with one multi-tensor copy (the casts included)."""

    @staticmethod
    def forward(ctx: Any, copies: list[torch.Tensor], *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.weights = weights
        return tuple(c.view_as(c) for c in copies)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        out = [torch.empty_like(w) for w in ctx.weights]  # each weight's own layout, so AccumulateGrad takes it as is
        torch._foreach_copy_(out, list(grads))
        return (None, *out)


class WeightCopies:
    """A module run with its trainable conv/linear weights swapped, for the call, for weight-dtype copies through
    which autograd still reaches the fp32 weights (mixed precision with fp32 master weights, without autocast's casts).

    Under autocast each fp32 weight is cast at every forward (one kernel per weight) and its gradient cast back in the
    backward (one more per weight). Here the copies are refreshed once per optimizer step (`copies.refresh()`, one
    multi-tensor copy, called by the owner) and the gradients come back with one. The numbers are autocast's: conv and
    linear ops run in the autocast dtype anyway, autocast leaves an input already in that dtype as it is, and the norms
    keep their fp32 weights.
    Use it only under autocast (conv/linear inputs are cast there).
    The gradients come back with one copy per top-level block (`down_blocks.0`, `mid_block`, ...). Autograd runs the
    cast-backs at the end of the backward either way (their nodes are the graph's oldest), but one copy for the whole
    UNet allocates every fp32 gradient while every weight-dtype one is still held; per block, each block's
    weight-dtype gradients are freed as its fp32 ones are made. That moment is the step's peak when activations are
    small (checkpointing, small batches): SD 1.5 with half the channels (220 M parameters), bf16, 256 px, batch 1,
    CPU, peak above the held memory 1292 -> 959 MiB with full checkpointing, 1311 -> 956 selective, 1318 -> 1015
    without; the same gradients.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.call = FunctionalUNet(module)
        self.names: list[str] = []
        self.weights: list[torch.Tensor] = []
        for prefix, m in module.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                for n, p in m.named_parameters(recurse=False):
                    if p.requires_grad and p.dtype != dtype:
                        self.names.append(f"{prefix}.{n}" if prefix else n)
                        self.weights.append(p)
        self.copies = DtypeCopies(self.weights, [p.detach().to(dtype) for p in self.weights])
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            parts = name.split(".")
            groups.setdefault(".".join(parts[:2] if parts[0].endswith("blocks") else parts[:1]), []).append(i)
        self.groups = [([self.names[i] for i in idx], [self.copies.dst[i] for i in idx], [self.weights[i] for i in idx])
                       for idx in groups.values()]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.weights:
            return self.call.module(*args, **kwargs)
        self.call.params = {n: c for names, dst, src in self.groups for n, c in zip(names, _CastBack.apply(dst, *src))}
        try:
            return self.call(*args, **kwargs)
        finally:
            self.call.params = {}
