"""The merged LoRA student (`--lora_merged_student`): in the layers where it costs fewer multiply-adds, the student runs
its base op with `W + scaling B A` formed in the graph. It gives the adapted UNet's output and gradients, the cost
model matches what torch's FLOP counter counts, and it trains under bf16, weight copies and checkpointing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from conftest import randomize_lora_b

from tcdistill.config import TrainConfig
from tcdistill.unet_views import MergedStudent, WithLayerAttr, _merged_forward, lora_layer_macs

DEFAULT_MODULES = TrainConfig.lora_modules.fget(SimpleNamespace(lora_target_modules=None))  # type: ignore[attr-defined]


def _lora_unet(rank: int = 64, alpha: int | None = None, **lora: object) -> nn.Module:
    from peft import LoraConfig

    from tcdistill.tiny import build_tiny_sd_pipeline

    torch.manual_seed(0)
    unet = build_tiny_sd_pipeline(None).unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=DEFAULT_MODULES, init_lora_weights="gaussian", **lora))
    randomize_lora_b(unet, scale=0.05)  # non-zero adapters: the merged and branch forms really add a delta
    return unet


def _forward_backward(denoiser, unet: nn.Module, x, t, cond):  # -> (output, gradients of the trainable weights)
    params = [p for p in unet.parameters() if p.requires_grad]
    out = denoiser(x, t, cond)
    return out.detach(), torch.autograd.grad(out.square().mean(), params)


def test_merged_student_gives_the_adapted_unets_output_and_gradients() -> None:
    """fp64: output and every A/B gradient equal the adapter branch's to ~1e-12; fp32: as close to fp64 as the branch
    is. Layers where merging costs more (the time-embedding projections: one row per sample) keep the branch; with the
    adapters off (the teacher view) the merged layers run the base weights alone; the base weights are never written."""
    from tcdistill.models import UNetDenoiser
    from tcdistill.unet_views import AdaptersOff

    unet = _lora_unet()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 16, 16, generator=g), torch.tensor([10, 500, 900])
    cond = {"encoder_hidden_states": torch.randn(3, 8, unet.config.cross_attention_dim, generator=g)}
    base = {n: p.clone() for n, p in unet.named_parameters() if "base_layer" in n}
    merged = MergedStudent(unet, unet)
    out32, grads32 = _forward_backward(UNetDenoiser(merged), unet, x, t, cond)
    branch32, _ = _forward_backward(UNetDenoiser(unet), unet, x, t, cond)
    chosen = {id(m) for m in merged.merged_layers}
    assert 0 < len(chosen) < len(merged.candidates)
    kept = [n for n, m in unet.named_modules() if m in merged.candidates and id(m) not in chosen]
    assert any("time_emb_proj" in n for n in kept)
    # The chosen layers keep the merged forward; with the adapters off (the teacher view) it is peft's base forward.
    assert all(m.in_graph_merge == (id(m) in chosen) for m in merged.candidates)
    plain = _lora_unet()
    with torch.no_grad():
        teacher = AdaptersOff(UNetDenoiser(unet), unet)(x, t, cond)
        assert torch.equal(teacher, AdaptersOff(UNetDenoiser(plain), plain)(x, t, cond))
        assert ((teacher - branch32).norm() / branch32.norm()).item() > 1e-2  # the adapters really change the output

    unet.double()
    x64, cond64 = x.double(), {k: v.double() for k, v in cond.items()}
    merged64 = MergedStudent(unet, unet)
    out64, grads64 = _forward_backward(UNetDenoiser(merged64), unet, x64, t, cond64)
    branch64, bgrads64 = _forward_backward(UNetDenoiser(unet), unet, x64, t, cond64)
    assert {id(m) for m in merged64.merged_layers} == chosen
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert rel(out64, branch64) < 1e-10
    assert all(b.norm() > 0 and rel(a, b) < 1e-9 for a, b in zip(grads64, bgrads64, strict=True))
    assert rel(out32, branch64) < 3 * rel(branch32, branch64) + 1e-6
    assert max(rel(a, b) for a, b in zip(grads32, bgrads64)) < 1e-4
    assert all(torch.equal(p.float(), base[n]) for n, p in unet.named_parameters() if "base_layer" in n)


def test_merged_views_apply_the_lora_scaling() -> None:
    """--lora_alpha other than --lora_rank (scaling alpha / r = 4 here): the merged student and the merged target add
    `scaling B A`, the adapter branch's delta, not `B A`."""
    from tcdistill.models import UNetDenoiser
    from tcdistill.unet_views import MergedAdapters

    unet = _lora_unet(rank=32, alpha=128).double()
    assert {s for m in unet.modules() if hasattr(m, "scaling") for s in m.scaling.values()} == {4.0}
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64), torch.tensor([10, 500])
    cond = {"encoder_hidden_states": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)}
    branch, _ = _forward_backward(UNetDenoiser(unet), unet, x, t, cond)
    merged = MergedStudent(unet, unet)
    student, _ = _forward_backward(UNetDenoiser(merged), unet, x, t, cond)
    assert merged.merged_layers
    view = MergedAdapters(unet)
    with torch.no_grad():
        target = view(x, t, cond)
    assert view.call.params == {}  # the merged weights live only during the call
    rel = lambda a: ((a - branch).norm() / branch.norm()).item()
    assert rel(student) < 1e-10 and rel(target) < 1e-10, (rel(student), rel(target))


def test_dropout_or_dora_layers_are_never_merged() -> None:
    """A train-mode dropout or DoRA is not a weight delta: no layer is a candidate, and the view is the plain call."""
    for lora in ({"lora_dropout": 0.1}, {"use_dora": True}):
        unet = _lora_unet(rank=8, **lora)
        assert MergedStudent(unet, unet).candidates == []


@pytest.mark.parametrize("conv", [{}, {"dilation": 2}, {"groups": 2}])
def test_only_plain_convs_merge(conv: dict) -> None:
    """peft's A and B convs reproduce neither dilation nor groups: there `W + scaling B A` is not the branch."""
    from peft import LoraConfig, inject_adapter_in_model

    from tcdistill.unet_views import _in_graph_mergeable

    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, **conv))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0"]), net)
    assert _in_graph_mergeable(net[0]) == (not conv)


def test_chosen_layers_run_peft_forward_without_grad_or_with_adapters_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice weighs forward + backward: without grad (target, validation) and with the adapters off (the teacher,
    in any grad mode) a chosen layer runs peft's own forward; adapters off it must never add the adapters."""
    import tcdistill.unet_views as views
    from tcdistill.models import UNetDenoiser
    from tcdistill.unet_views import AdaptersOff

    unet = _lora_unet()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])
    cond = {"encoder_hidden_states": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)}
    student = UNetDenoiser(MergedStudent(unet, unet))
    student(x, t, cond)  # makes the choice
    with torch.no_grad():
        base = AdaptersOff(UNetDenoiser(unet), unet)(x, t, cond)

    def merged_weight(*args: object) -> None:
        raise AssertionError("merged in graph")

    monkeypatch.setattr(views, "merged_weight", merged_weight)
    with pytest.raises(AssertionError, match="merged in graph"):
        student(x, t, cond)  # the patch reaches the chosen layers
    with torch.no_grad():
        UNetDenoiser(unet)(x, t, cond)
    assert torch.equal(AdaptersOff(UNetDenoiser(unet), unet)(x, t, cond).detach(), base)


@pytest.mark.parametrize("kind,out_f,in_f,rank,batch,input_grad", [
    ("conv", 32, 32, 64, 2, True), ("conv", 64, 32, 4, 2, True), ("conv", 24, 40, 16, 3, False),
    ("linear", 48, 32, 64, 3, True), ("linear", 64, 128, 8, 2, True), ("linear", 32, 16, 64, 1, False),
])
def test_cost_model_counts_what_torch_counts(kind: str, out_f: int, in_f: int, rank: int, batch: int, input_grad: bool) -> None:
    """`lora_layer_macs` equals torch's FlopCounterMode (2 FLOPs per multiply-add) for one adapted layer's forward +
    backward, both forms, with and without an input gradient: the rule compares what really runs."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch.utils.flop_counter import FlopCounterMode

    layer = nn.Conv2d(in_f, out_f, 3, padding=1) if kind == "conv" else nn.Linear(in_f, out_f)
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"]), nn.ModuleDict({"layer": layer}))
    m = model["layer"]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    x = torch.randn(batch, in_f, 6, 5) if kind == "conv" else torch.randn(batch, 7, in_f)
    x.requires_grad_(input_grad)
    counted = []
    m.in_graph_merge = True
    for call in (WithLayerAttr(m, [m], "forward", _merged_forward.__get__(m)), m):
        with FlopCounterMode(display=False) as fc:
            call(x).square().sum().backward()
        counted.append(fc.get_total_flops())
    rows = m(x).numel() // out_f
    assert tuple(counted) == tuple(2 * v for v in lora_layer_macs(out_f, layer.weight[0].numel(), rank, rows, input_grad))


def test_cost_model_choices_on_sd15_shapes() -> None:
    """On SD 1.5 at 512 px, batch 12, rank 64: the 320-channel self-attention projections merge; the 320-channel 3x3
    convs, the cross-attention key/value (77 tokens, no input gradient) and the 1280-wide layers keep the branch."""
    n1 = 12 * 64 * 64
    merge = lambda *a: lora_layer_macs(*a)[0] < lora_layer_macs(*a)[1]
    assert merge(320, 320, 64, n1, True)  # to_q / to_out.0 at 64x64
    assert not merge(320, 320 * 9, 64, n1, True)  # conv1 / conv2 at 64x64
    assert not merge(320, 768, 64, 12 * 77, False)  # to_k / to_v on the text embedding
    assert not merge(1280, 1280, 64, 12 * 8 * 8, True)  # the 8x8 level's projections
    assert not merge(320, 1280, 64, 12, False)  # time_emb_proj: one row per sample


BF16 = torch.bfloat16


@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_bf16_trainer_student_matches_the_branch(checkpointing: str, tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """Under bf16 (weight-dtype copies of A and B, peft's input casts skipped) and under gradient checkpointing, the
    strategy's merged student gives the adapter branch's output and fp32 gradients to bf16 rounding, and a step trains."""
    from tcdistill.models import UNetDenoiser
    from tcdistill.trainer import Trainer

    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path), train_shards_path_or_url=tiny_shards,
                      resolution=32, train_batch_size=2, max_train_steps=2, report_to="none", seed=0, mixed_precision="bf16",
                      variant="lora", gradient_checkpointing=checkpointing != "none",
                      gradient_checkpointing_policy="full" if checkpointing == "none" else checkpointing)
    tr = Trainer(cfg)
    unet = tr.strategy.student
    randomize_lora_b(unet, scale=0.05)
    tr.strategy._refresh_copies()
    view, _, _ = tr.strategy.denoisers(tr.student)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([99, 699])
    cond = {"encoder_hidden_states": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)}
    with torch.autocast("cpu", dtype=BF16):
        out, grads = _forward_backward(view, unet, x, t, cond)
        ref, ref_grads = _forward_backward(UNetDenoiser(unet), unet, x, t, cond)
    assert tr.strategy._merged_student is not None and tr.strategy._merged_student.merged_layers
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel(out, ref) < 2e-2
    assert all(a.dtype == torch.float32 for a in grads) and max(rel(a, b) for a, b in zip(grads, ref_grads)) < 5e-2
    loss, _, ok = tr.optimizer_step(iter(tr.data_loader()))
    assert ok and loss == loss


def test_choice_draws_no_random_numbers_and_is_skipped_without_candidates() -> None:
    """The first call's extra recording forward leaves the run's random streams as they were (a UNet dropout draws
    the same masks as the adapter-branch run: resumed runs replay them), and without candidates (LoRA dropout) there is
    no extra forward at all (it drew a dropout mask: the run diverged from --no_lora_merged_student and from its own
    resume)."""
    from tcdistill.models import UNetDenoiser

    unet = _lora_unet().double()
    unet.down_blocks[0].resnets[0].dropout.p = 0.5  # a UNet dropout: the forward draws from the global stream
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64), torch.tensor([10, 500])
    cond = {"encoder_hidden_states": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)}
    merged = MergedStudent(unet, unet)
    torch.manual_seed(5)
    out = UNetDenoiser(merged)(x, t, cond)
    after = torch.randn(4)
    assert merged.merged_layers
    torch.manual_seed(5)
    ref = UNetDenoiser(unet)(x, t, cond).detach()
    assert torch.equal(torch.randn(4), after)
    assert ((out.detach() - ref).norm() / ref.norm()).item() < 1e-10

    unet = _lora_unet(rank=8, lora_dropout=0.1)
    calls = []
    unet.register_forward_hook(lambda *a: calls.append(1))
    merged = MergedStudent(unet, unet)
    torch.manual_seed(5)
    UNetDenoiser(merged)(x.float(), t, {k: v.float() for k, v in cond.items()})
    assert merged.merged_layers == [] and len(calls) == 1


@pytest.mark.slow
def test_compiled_teacher_is_not_recompiled_by_the_choice() -> None:
    """A compiled UNet guards on its modules' own `forward`: the merged forwards go in when the view is built (before
    the step's teacher and target run), so their graphs, compiled before the student's first call, still hold after
    it (setting them at the choice recompiled the teacher and the target at the second step). The adapters-on target
    (--no_lora_merged_target, no_grad) never reads the choice either (it did: recompiled at the second step)."""
    import torch._dynamo

    from tcdistill.models import UNetDenoiser
    from tcdistill.unet_views import AdaptersOff

    captured: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        captured.append(1)
        return gm.forward

    torch._dynamo.reset()
    try:
        unet = _lora_unet()
        unet.compile(backend=counting, dynamic=False)
        g = torch.Generator().manual_seed(1)
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])
        cond = {"encoder_hidden_states": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)}
        teacher = AdaptersOff(UNetDenoiser(unet), unet)
        target = UNetDenoiser(unet)  # --no_lora_merged_target: the adapters-on UNet under no_grad
        student = UNetDenoiser(MergedStudent(unet, unet))  # built first, as the strategy's denoisers() does
        for step in range(2):
            with torch.no_grad():  # the loss runs the teacher and the target before the student
                teacher(x, t, cond)
                target(x, t, cond)
            student(x, t, cond).square().mean().backward()
            if step == 0:
                first = len(captured)
        assert first >= 2 and len(captured) == first, f"recompiled at the second step: {first} -> {len(captured)} graphs"
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_merged_target_follows_the_adapters_under_channels_last(dtype: torch.dtype) -> None:
    """--channels_last: a 3x3 conv adapter's A is not contiguous, so the merged target's flattened A was a copy made
    when the view was built; after an optimizer step (in place) the target still merged the first step's A."""
    from tcdistill.unet_views import MergedAdapters

    unet = _lora_unet(rank=4)
    unet.to(dtype).to(memory_format=torch.channels_last)  # what speed_up_unets does
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters, as the LoRA strategy keeps them
    assert any(not p.is_contiguous() for n, p in unet.named_parameters() if "lora_A" in n)
    target = MergedAdapters(unet, dtype, native=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])
    cond = {"encoder_hidden_states": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)}
    with torch.no_grad():
        target(x, t, cond)
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g), alpha=0.05)  # in place, as the optimizer steps
        target.factors.refresh()  # what the strategy does after each optimizer step
        assert torch.equal(target(x, t, cond), MergedAdapters(unet, dtype, native=True)(x, t, cond))
