"""Mixed precision without per-forward casts: the student runs weight-dtype copies of its trainable weights, the full
target a weight-dtype copy of the EMA weights, the merged LoRA target casts its factors once per step, and the LoRA
student skips peft's input casts. Each copy follows its source after every optimizer step and every load; the
student's views give autocast's numbers bitwise, with fewer ops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_b

from tcdistill.config import TrainConfig
from tcdistill.unet_views import WithLayerAttr

BF16 = torch.bfloat16


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # these trainers run under bf16


def _trainer(variant: str, teacher: Path, shards: str, out: Path, **kw: object):  # -> Trainer
    from tcdistill.trainer import Trainer

    # The merged LoRA student (tested in test_lora_merge.py) wraps the student view and, where it merges, rounds
    # differently; these tests inspect the cast-saving views and hold them to autocast's numbers bitwise, so without it.
    kw.setdefault("lora_merged_student", False)

    cfg = TrainConfig(pretrained_teacher_model=str(teacher), output_dir=str(out), train_shards_path_or_url=shards, resolution=32,
                      train_batch_size=2, max_train_steps=4, report_to="none", seed=0, mixed_precision="bf16", variant=variant,
                      learning_rate=1e-3, lora_rank=4, **kw)
    return Trainer(cfg)


def _inputs(unet: torch.nn.Module, n: int = 2) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    cond = {"encoder_hidden_states": torch.randn(n, 8, unet.config.cross_attention_dim, generator=g)}
    return torch.randn(n, 4, 16, 16, generator=g), torch.tensor([99, 699])[:n], cond, torch.tensor([3.0, 9.0])[:n]


def test_full_target_is_a_weight_dtype_copy_of_the_ema(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """bf16: the target forward runs a bf16 copy of the fp32 EMA weights (outside autocast), equal to their cast after
    each step and each load, and computing what the autocast EMA forward computes to bf16 rounding."""
    from tcdistill.models import UNetDenoiser

    tr = _trainer("full", tiny_teacher, tiny_shards, tmp_path / "a")
    strat = tr.strategy
    shadow = strat.target_shadow
    assert shadow is not None and strat.target_unet is shadow
    assert {p.dtype for p in shadow.parameters()} == {BF16} and {p.dtype for p in strat.target.parameters()} == {torch.float32}

    def in_step() -> bool:
        return all(torch.equal(s, t.to(BF16)) for s, t in zip(shadow.parameters(), strat.target.parameters(), strict=True))

    before = [p.clone() for p in shadow.parameters()]
    tr.optimizer_step(iter(tr.data_loader()))
    assert in_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, shadow.parameters()))  # the EMA moved, so did the copy

    tensors = strat.state_tensors()
    tensors["target"] = {k: v + 0.01 for k, v in tensors["target"].items()}
    strat.load_state_tensors(tensors)
    assert in_step()

    x, t, cond, w = _inputs(shadow)
    _, target, _ = strat.denoisers(tr.student)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        native = target(x, t, cond, w)
        autocast = UNetDenoiser(strat.target, strat.w_dim)(x, t, cond, w)
        student = UNetDenoiser(strat.student, strat.w_dim)(x, t, cond, w)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert native.dtype == BF16
    assert rel(native, autocast) < 2e-2 < rel(student, autocast)  # same function; the +0.01 target really differs

    fp32 = _trainer("full", tiny_teacher, tiny_shards, tmp_path / "b", target_dtype="fp32").strategy
    assert fp32.target_shadow is None and fp32.target_unet is fp32.target


def test_merged_lora_target_casts_its_factors_once_per_step(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """bf16 LoRA: the merged target's bf16 copies of the fp32 factors follow the adapters after each step and each
    load, so it computes exactly what a freshly built merged target computes."""
    from tcdistill.unet_views import MergedAdapters

    tr = _trainer("lora", tiny_teacher, tiny_shards, tmp_path)
    strat = tr.strategy
    _, target, _ = strat.denoisers(tr.student)
    assert isinstance(target, MergedAdapters) and target.factors.dst
    assert {t.dtype for t in target.factors.dst} == {BF16} and {t.dtype for t in target.factors.src} == {torch.float32}

    def fresh() -> bool:
        return all(torch.equal(d, s.to(BF16)) for s, d in zip(target.factors.src, target.factors.dst, strict=True))

    before = [d.clone() for d in target.factors.dst]
    tr.optimizer_step(iter(tr.data_loader()))
    assert fresh() and any(not torch.equal(a, b) for a, b in zip(before, target.factors.dst))

    tensors = strat.state_tensors()
    tensors["lora"] = {k: v * 1.5 for k, v in tensors["lora"].items()}
    strat.load_state_tensors(tensors)
    assert fresh()
    x, t, cond, _ = _inputs(strat.student)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        assert torch.equal(target(x, t, cond), MergedAdapters(strat.student, BF16, native=True)(x, t, cond))


def _student_view_vs_autocast(tr):  # -> (the strategy's student denoiser, its casts, autocast's casts)
    """One forward + backward under bf16 autocast through the strategy's student view and through the plain UNet:
    asserts bitwise the same output and fp32 gradients; returns the view and both runs' dispatched casts."""
    from tcdistill.models import UNetDenoiser
    from tcdistill.timing import OpCounter

    strat, unet = tr.strategy, tr.strategy.student
    view, _, _ = strat.denoisers(tr.student)
    x, t, cond, w = _inputs(unet)
    results = []
    for student in (view, UNetDenoiser(tr.student, getattr(strat, "w_dim", None))):
        unet.zero_grad(set_to_none=True)
        with OpCounter() as ops, torch.autocast("cpu", dtype=BF16):
            out = student(x, t, cond, w)
            out.float().square().mean().backward()
        grads = [p.grad.clone() for p in unet.parameters() if p.requires_grad]
        results.append((out, grads, ops.by_op["_to_copy"]))
    (out_view, g_view, casts_view), (out_ref, g_ref, casts_ref) = results
    assert torch.equal(out_view, out_ref)
    assert all(g.dtype == torch.float32 for g in g_view) and all(torch.equal(a, b) for a, b in zip(g_view, g_ref, strict=True))
    return view, casts_view, casts_ref


@pytest.mark.parametrize("variant,weight_copy", [("full", True), ("lora", True), ("lora", False)])
def test_student_view_gives_autocast_numbers_with_fewer_casts(variant: str, weight_copy: bool, tiny_teacher: Path, tiny_shards: str,
                                                              tmp_path: Path) -> None:
    """Under bf16 autocast the student's weight-dtype weight copies (and, for LoRA, the skipped peft input casts) give
    bitwise autocast's output and fp32 gradients with fewer dispatched casts; the copies follow the weights after each
    step and each load, and the layers' own cast setting is back after the call."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tcdistill.unet_views import WeightCopies

    tr = _trainer(variant, tiny_teacher, tiny_shards, tmp_path, student_weight_copy=weight_copy)
    strat, unet = tr.strategy, tr.strategy.student
    randomize_lora_b(unet, scale=0.05)
    view, casts_view, casts_ref = _student_view_vs_autocast(tr)
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)
    copies = strat._student_copies
    if not weight_copy:  # the LoRA input casts alone: one fewer per adapted layer at least
        assert copies is None and casts_view < casts_ref - len(layers)
        return
    assert isinstance(copies, WeightCopies) and getattr(view, "inner", view).unet is copies
    assert casts_view < casts_ref - len(copies.weights)  # a forward cast and a backward cast per swapped weight, gone

    def fresh() -> bool:
        return all(torch.equal(c, p.to(BF16)) for p, c in zip(copies.weights, copies.copies.dst, strict=True))

    before = [c.clone() for c in copies.copies.dst]
    tr.optimizer_step(iter(tr.data_loader()))
    assert fresh() and any(not torch.equal(a, b) for a, b in zip(before, copies.copies.dst))
    tensors = strat.state_tensors()
    key = "student" if variant == "full" else "lora"
    tensors[key] = {k: v * 1.5 for k, v in tensors[key].items()}
    strat.load_state_tensors(tensors)
    assert fresh()
    assert strat._student_net(torch.nn.Identity()).__class__ is torch.nn.Identity  # a DDP-wrapped student: no copies


@pytest.mark.parametrize("variant,policy,weight_copy", [("full", "full", True), ("full", "selective", True), ("lora", "selective", True),
                                                      ("lora", "selective", False)])
def test_student_views_under_gradient_checkpointing(variant: str, policy: str, weight_copy: bool, tiny_teacher: Path, tiny_shards: str,
                                                    tmp_path: Path) -> None:
    """--gradient_checkpointing: the backward's recompute runs each block from the weight-dtype copies the forward saw
    (not the fp32 weights, back in place by then): bitwise autocast's numbers, and no weight is cast in the forward
    or in the recompute. Selective checkpointing needs the recompute to dispatch the forward's ops; peft's input-cast
    skip, a flip undone when the call returns, is off under it."""
    tr = _trainer(variant, tiny_teacher, tiny_shards, tmp_path, gradient_checkpointing=True, gradient_checkpointing_policy=policy,
                  student_weight_copy=weight_copy)
    with torch.no_grad():
        for name, p in tr.strategy.student.named_parameters():
            if "conv_out" in name or "lora_B" in name:
                p.normal_(0, 0.05)  # non-zero gradients everywhere
    view, casts_view, casts_ref = _student_view_vs_autocast(tr)
    assert not isinstance(view, WithLayerAttr)
    copies = tr.strategy._student_copies
    if weight_copy:  # autocast casts each weight in the forward and its gradient in the backward; a recompute from
        assert casts_view <= casts_ref - 2 * len(copies.weights)  # the fp32 weights would cast most weights again
    else:
        assert copies is None and casts_view == casts_ref


def test_reference_like_switches_keep_the_casts(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """`--target_dtype fp32 --no_lora_skip_input_cast --no_student_weight_copy`: the student and the target under
    autocast, peft's casts kept (what the benchmark's reference-like mode measures)."""
    from tcdistill.models import UNetDenoiser

    tr = _trainer("lora", tiny_teacher, tiny_shards, tmp_path, target_dtype="fp32", lora_skip_input_cast=False,
                  student_weight_copy=False)
    student, target, _ = tr.strategy.denoisers(tr.student)
    assert isinstance(student, UNetDenoiser) and student.unet is tr.student and not target.view.inner.native
    from tcdistill.config import ConfigError

    with pytest.raises(ConfigError, match="--target_dtype must be one of weight, fp32"):
        TrainConfig(pretrained_teacher_model="x", train_shards_path_or_url="x", max_train_steps=1, target_dtype="bf16")


def test_student_copies_return_gradients_per_top_level_block() -> None:
    """The weight-dtype gradients go back to the fp32 weights with one multi-tensor copy per top-level block, not one
    for the whole UNet (which allocates every fp32 gradient while every weight-dtype one is still held: the step's
    peak under checkpointing); the gradients are bitwise those of the single copy."""
    from conftest import small_unet

    from tcdistill.timing import OpCounter
    from tcdistill.unet_views import WeightCopies

    unet = small_unet()
    copies = WeightCopies(unet, BF16)
    assert sorted(n for g in copies.groups for n in g[0]) == sorted(copies.names)  # each weight in one group
    heads = ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1", "conv_out"]
    group_heads = [[h for h in heads if all(n.startswith(h + ".") for n in g[0])] for g in copies.groups]
    assert sorted(sum(group_heads, [])) == sorted(heads) and all(len(h) == 1 for h in group_heads)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)

    def grads() -> tuple[list[torch.Tensor], int]:
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            out = copies(x, t, c).sample
        with OpCounter() as ops:
            out.float().square().mean().backward()
        return [p.grad.clone() for p in copies.weights], ops.by_op["_foreach_copy_"]

    grouped, n_copies = grads()
    assert n_copies == len(copies.groups)
    copies.groups = [(copies.names, copies.copies.dst, copies.weights)]  # the single cast-back
    single, n_single = grads()
    assert n_single == 1
    assert all(g.dtype == torch.float32 and torch.equal(g, h) for g, h in zip(grouped, single, strict=True))


def test_frozen_vae_and_teacher_run_in_bf16_not_fp16(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """Reference defect 7: under bf16 its teacher ran under fp16 autocast and its VAE was cast to fp16. Here, in a
    training step, both run their bf16 weights on bf16 inputs, outside autocast."""
    tr = _trainer("full", tiny_teacher, tiny_shards, tmp_path)
    seen: dict[str, set] = {"vae": set(), "teacher": set()}

    def record(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            seen[name].add((args[0].dtype, next(module.parameters()).dtype, autocast))
        return hook

    tr.family.vae.encoder.register_forward_pre_hook(record("vae"))
    tr.strategy.teacher_unet.register_forward_pre_hook(record("teacher"))
    tr.optimizer_step(iter(tr.data_loader()))
    assert seen == {"vae": {(BF16, BF16, None)}, "teacher": {(BF16, BF16, None)}}
