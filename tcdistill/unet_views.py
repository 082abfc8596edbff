"""Call-time views of shared UNets: the same weights run another way for one call (adapters off, LoRA merged into
the weights, parameters swapped for weight-dtype copies), so no second UNet is loaded and no weight is written."""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

from .models import UNetDenoiser
from .tcd import Denoiser

logger = logging.getLogger("tcdistill")


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


def _plain_adapter(m: nn.Module, a: str) -> bool:
    """Adapter `a` of LoRA layer `m` is plain LoRA: no DoRA or other variant, no LoRA bias, no dropout (a train-mode
    forward applies it), so the layer computes `base(x) + scaling B(A(x))`."""
    return (not m.use_dora.get(a, False) and a not in getattr(m, "lora_variant", {})
            and not getattr(m, "lora_bias", {}).get(a, False) and isinstance(m.lora_dropout[a], nn.Identity))


def _delta_is_ba(m: nn.Module, a: str) -> bool:
    """Adapter `a`'s weight delta is `scaling * B.flatten(1) @ A.flatten(1)` in the base weight's own layout."""
    w = m.get_base_layer().weight
    A, B = m.lora_A[a].weight, m.lora_B[a].weight
    return not getattr(m, "fan_in_fan_out", False) and B.shape[2:].numel() == 1 and A.flatten(1).shape[1] == w.flatten(1).shape[1]


def merged_weight(w: torch.Tensor, deltas: list[Any]) -> torch.Tensor:
    """`W + sum of deltas` in W's own layout, on its (out, in x kernel) view. A delta is `(scaling, B, A)`, added as one
    addmm of the flattened factors (in W's dtype), or a tensor of W's shape (peft's delta for other layouts)."""
    merged = w.flatten(1)
    for d in deltas:
        merged = merged + d.flatten(1) if isinstance(d, torch.Tensor) else torch.addmm(merged, d[1].flatten(1), d[2].flatten(1), alpha=d[0])
    return merged.view_as(w)


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
                if not _delta_is_ba(m, a):
                    terms.append((a, None, None))  # layouts this fast path does not know
                    continue
                low = []
                for t in (B, A):
                    low.append(t.detach() if t.dtype == w.dtype else t.detach().to(w.dtype))
                    if low[-1].dtype != t.dtype:
                        src.append(t)
                        dst.append(low[-1])
                # Unflattened: views of the adapter weights (or of their refreshed copies). Under --channels_last a
                # k x k conv's A is not contiguous, so a flattened A would be a copy, stale after the first step.
                terms.append((a, low[0], low[1]))
            self.layers.append((f"{names[id(m)]}.base_layer.weight", m, terms))
        self.factors = DtypeCopies(src, dst)

    @staticmethod
    def applies(unet: nn.Module) -> bool:
        """Plain LoRA only: DoRA, LoRA biases and dropout (the train-mode target applies it) are not a weight delta."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in unet.modules() if hasattr(m, "base_layer")]
        return bool(layers) and all(
            isinstance(m, LoraLayer) and isinstance(getattr(m.get_base_layer(), "weight", None), torch.Tensor)
            and all(_plain_adapter(m, a) for a in m.active_adapters)
            for m in layers)

    @torch.no_grad()
    def _merged(self) -> dict[str, torch.Tensor]:
        """`W + scaling B A` per adapted weight: one addmm per layer (peft's `get_delta_weight` runs a k x k conv
        delta as a conv over the channels, ~2x slower on the tiny UNet), rounded once to the weight's dtype."""
        out = {}
        for name, m, terms in self.layers:
            w = m.get_base_layer().weight
            out[name] = merged_weight(w, [m.get_delta_weight(a).to(w.dtype) if B is None else (m.scaling[a], B, A) for a, B, A in terms])
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
    multi-tensor copy, called by the owner) and the gradients come back with one per top-level block (below). The numbers are autocast's: conv and
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


def lora_layer_macs(out_features: int, in_k: int, rank: int, rows: int, input_grad: bool) -> tuple[int, int]:
    """Multiply-adds of an adapted layer's forward + backward as (merged, branch): with `W' = W + s B A` formed in
    the graph, and with the adapter branch. `in_k`: in_features (x kernel size for a conv); `rows`: output rows
    (batch x tokens, or batch x output pixels); `input_grad`: whether the layer's input needs a gradient. The base
    weight is frozen.

    merged: form W' (O r IK) and its factors' gradients (2 O r IK), forward (N O IK), W' gradient (N O IK), input
    gradient (N O IK, if needed). branch: base forward (N O IK), A and B forward (N r IK + N O r), B's weight and
    input gradients (2 N O r), A's weight gradient (N r IK), and if needed the input gradient through A and the base
    (N r IK + N O IK). Merged wins when the rank is large next to the channels (rank 64 on SD 1.5's 320-channel
    attention projections; on the tiny UNets all but the time-embedding projections, which see one row per sample)
    and loses on wide layers, where W's gradient dominates.
    """
    O, IK, r, N, g = out_features, in_k, rank, rows, int(input_grad)
    merged = 3 * O * r * IK + (2 + g) * N * O * IK
    branch = (1 + g) * N * O * IK + (2 + g) * N * r * IK + 3 * N * O * r
    return merged, branch


def _in_graph_mergeable(m: nn.Module) -> bool:
    """A LoRA layer whose plain adapters can be merged into its base op exactly: a Linear, or an ungrouped, undilated,
    zero-padded Conv2d (what peft's A and B convs reproduce), with every active adapter a plain `B A` delta."""
    base = m.get_base_layer()
    if type(base) is nn.Conv2d:
        if base.groups != 1 or any(d != 1 for d in base.dilation) or base.padding_mode != "zeros":
            return False
    elif type(base) is not nn.Linear:
        return False
    adapters = [a for a in m.active_adapters if a in m.lora_A]
    return bool(adapters) and not m.merged and all(_plain_adapter(m, a) and _delta_is_ba(m, a) for a in adapters)


def _merged_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A plain LoRA layer as its base op with `W + scaling B A` formed in the graph (gradients reach A and B through
    the addmm): one op where the branch runs base, A, B, scale and add. Adapters off (the teacher and target views),
    grad off (the adapters-on target of --no_lora_merged_target, validation: the choice weighs forward + backward),
    peft-merged weights, extra arguments or a layer not chosen (`in_graph_merge` false): peft's own forward.
    The adapters-off and grad-mode tests come first, so a compiled teacher or target graph never reads (or guards on)
    the choice: an adapters-on target compiled at the first step, before the student's first call made the choice,
    was recompiled at the second."""
    if self.disable_adapters or not torch.is_grad_enabled() or self.merged or args or kwargs or not self.in_graph_merge:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    w = base.weight
    merged = merged_weight(w, [(self.scaling[a], self.lora_B[a].weight.to(w.dtype), self.lora_A[a].weight.to(w.dtype))
                               for a in self.active_adapters if a in self.lora_A])
    if isinstance(base, nn.Conv2d):
        return base._conv_forward(x, merged, base.bias)
    return torch.nn.functional.linear(x, merged, base.bias)


class MergedStudent:
    """The LoRA student with `W + scaling B A` formed in the graph in place of the adapter branch, in each layer where
    that costs fewer multiply-adds forward + backward (`lora_layer_macs`): the same function and gradients to float
    rounding. On the tiny preset (rank 64 on 32-64 channels; 71 of 79 layers merge) the student's forward + backward
    went from 140.5 to 89.0 ms (CPU, one thread).

    The choice needs each layer's output rows and whether its input needs a gradient. So the first call first runs
    the bare module once more, eagerly, with the adapter branch everywhere, records them, and drops that forward's
    graph (not through `net`: a DDP wrapper would expect its backward). That forward runs inside a forked RNG, so a
    dropout in it draws nothing from the run's streams (resumed runs replay them); without candidates it is skipped.
    Every candidate gets `_merged_forward` as its own forward when this view is built, before the step's teacher and
    target first run: a compiled UNet guards on a module's `forward`, and setting it later recompiled both at the
    second step. The choice itself is each layer's `in_graph_merge`, read only with the adapters and grad on. The forward stays
    for the run, since a per-call swap would be undone before a gradient-checkpointing recompute runs. `net` is what
    the student call runs (the module, its DDP wrapper, or its weight-dtype copies); the merged layers read A and B
    through the module, so they see whatever that call swapped in.
    """

    def __init__(self, net: Any, unet: nn.Module):
        self.net, self.unet = net, unet
        self.candidates = [m for m in tuner_layers(unet) if _in_graph_mergeable(m)]
        self.merged_layers: list[nn.Module] | None = None
        for m in self.candidates:  # an earlier choice (another net over this UNet) is undone: the branch to record
            m.in_graph_merge = False
            if not isinstance(m.__dict__.get("forward"), types.MethodType) or m.forward.__func__ is not _merged_forward:
                m.forward = types.MethodType(_merged_forward, m)

    def _choose(self, *args: Any, **kwargs: Any) -> None:
        seen: dict[nn.Module, tuple[int, bool]] = {}

        def record(m: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            x = inputs[0] if inputs else None  # (an input passed by keyword: assume it needs a gradient)
            seen.setdefault(m, (output.numel() // m.out_features, not isinstance(x, torch.Tensor) or x.requires_grad))

        self.merged_layers = []
        if self.candidates:  # none (dropout, DoRA, other layer types): no extra forward
            hooks = [m.register_forward_hook(record) for m in self.candidates]
            dev = next(self.unet.parameters()).device
            try:
                with torch.compiler.set_stance("force_eager"), \
                        torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev], device_type=dev.type):
                    self.unet(*args, **kwargs)  # its graph, and the activations it holds, are dropped on return
            finally:
                for h in hooks:
                    h.remove()
        for m in self.candidates:
            if m in seen:
                rank = sum(m.r[a] for a in m.active_adapters if a in m.lora_A)
                merged, branch = lora_layer_macs(m.out_features, m.get_base_layer().weight[0].numel(), rank, *seen[m])
                if merged < branch:
                    m.in_graph_merge = True
                    self.merged_layers.append(m)
        logger.info("LoRA student: %d of %d adapted layers run as one op with W + scaling B A (fewer multiply-adds at this "
                    "rank and batch); the rest run the adapter branch.", len(self.merged_layers), len(tuner_layers(self.unet)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged_layers is None:
            self._choose(*args, **kwargs)
        return self.net(*args, **kwargs)
