"""Gradient checkpointing policies of the student UNet: 'full' recomputes each block, 'selective' keeps the conv,
matmul and attention outputs and recomputes only the ops between them; both give the un-checkpointed gradients.
(Also the flags' help text, which the policy's help, with a % sign, first broke.)"""

from __future__ import annotations

import pytest
import torch
from conftest import small_unet

from tcdistill.config import ConfigError, TrainConfig
from tcdistill.models import enable_gradient_checkpointing
from tcdistill.timing import OpCounter


def _run(policy: str | None) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, int]]:
    """Output, parameter gradients and dispatched ops of one forward + backward under `policy` (None: no checkpointing)."""
    unet = small_unet()
    if policy:
        enable_gradient_checkpointing(unet, policy)
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    with OpCounter() as ops:
        out = unet(x, torch.tensor([10, 900]), cond).sample
        out.pow(2).mean().backward()
    return out.detach(), [p.grad for p in unet.parameters()], dict(ops.by_op)


def test_selective_checkpointing_recomputes_only_the_memory_bound_ops() -> None:
    out0, grads0, ops0 = _run(None)
    full, selective = _run("full"), _run("selective")
    for out, grads, _ in (full, selective):
        assert torch.equal(out, out0)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads0, strict=True))
    # full recomputes every checkpointed block's convolutions and matmuls; selective runs each once, as without
    for op in ("convolution", "addmm", "bmm", "mm"):
        if ops0.get(op):
            assert selective[2].get(op, 0) == ops0[op], op
    assert full[2]["convolution"] > ops0["convolution"]
    # ... and both recompute the norms (their outputs are not kept)
    assert selective[2]["native_group_norm"] > ops0["native_group_norm"]
    assert full[2]["native_group_norm"] == selective[2]["native_group_norm"]


def test_selective_policy_needs_checkpointing_on() -> None:
    base = dict(pretrained_teacher_model="t", train_shards_path_or_url="s", max_train_steps=1)
    TrainConfig(**base, gradient_checkpointing=True, gradient_checkpointing_policy="selective").validate()
    with pytest.raises(ConfigError, match="needs --gradient_checkpointing"):
        TrainConfig(**base, gradient_checkpointing_policy="selective").validate()


def test_help_text_may_contain_percent_signs() -> None:
    """argparse %-formats help: a literal % in a field's help or default (a shard url) must not break --help."""
    from dataclasses import dataclass

    from tcdistill.config import _f, build_parser

    @dataclass
    class Flags:
        url: str = _f("pipe:curl -s https://x/a%20b.tar", "Shards; saves 40 % of the time.")

    text = build_parser(Flags).format_help()
    assert "saves 40 % of the time" in text and "a%20b.tar" in text


@pytest.mark.parametrize("policy", [None, "full", "selective"])
def test_checkpointing_under_autocast_after_an_earlier_forward_of_the_same_weights(policy: str | None) -> None:
    """QA: a LoRA run under bf16 with --gradient_checkpointing_policy selective and --no_student_weight_copy failed its
    first backward ("aten._to_copy.default invocation index 8 encountered during backward but not found in storage").
    Autocast caches its casts of fp32 leaf weights for the whole autocast region: a forward of the same weights earlier in
    the region (the LoRA student's layer-choice pass, or a LoRA target under --target_dtype fp32) left them cast, so the
    checkpointed forward ran fewer casts than its recompute in the backward, where the cache is empty, and selective
    checkpointing replays ops one for one. Gradients equal the un-checkpointed ones under the same autocast."""
    unet = small_unet()
    if policy:
        enable_gradient_checkpointing(unet, policy)
    g = torch.Generator().manual_seed(1)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 8, generator=g)
    grads = []
    for earlier_forward in (False, True):
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if earlier_forward:
                with torch.no_grad():
                    unet(x, t, cond)  # casts (and caches) every weight
            loss = unet(x, t, cond).sample.float().pow(2).mean()
        loss.backward()
        grads.append([p.grad for p in unet.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
