"""Flags that shape the training strategy's UNets: channels-last, LoRA saving, merging and export, the teacher's,
target's and student's dtypes (in-process, seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import BASE

from tcdistill.config import ConfigError, TrainConfig


def _lora_strategy(tmp_path: Path, weight_dtype: torch.dtype = torch.float32, **cfg):
    from conftest import small_unet

    from tcdistill.families import SDFamily
    from tcdistill.strategy import LoraStrategy

    family = SDFamily.__new__(SDFamily)  # only .unet and .save_lora_weights are used
    family.unet = small_unet()
    return LoraStrategy(TrainConfig(**BASE, variant="lora", lora_rank=2, output_dir=str(tmp_path), **cfg), family, weight_dtype)


def test_channels_last_converts_each_unet() -> None:
    """--channels_last: each UNet the trainer hands over (student, target, teacher) gets channels_last weights."""
    from conftest import small_unet

    from tcdistill.models import speed_up_unets

    unets = [small_unet(), small_unet()]
    speed_up_unets(unets, TrainConfig(**BASE, channels_last=True))
    for w in (u.conv_in.weight for u in unets):
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_lora_saves_under_channels_last(tmp_path: Path) -> None:
    """--channels_last made the conv adapters' weights non-contiguous: the final LoRA save failed (safetensors)."""
    import safetensors.torch

    strategy = _lora_strategy(tmp_path)
    strategy.student.to(memory_format=torch.channels_last)  # what speed_up_unets does
    assert any(not p.is_contiguous() for p in strategy.trainable_parameters())
    (path,) = strategy.save_outputs(str(tmp_path))
    saved = safetensors.torch.load_file(path)
    assert saved and all(torch.equal(saved[f"unet.{k}"], v) for k, v in strategy.lora_state_dict().items())


def test_no_lora_merged_target_runs_the_target_through_the_adapter_branch(tmp_path: Path) -> None:
    """--no_lora_merged_target runs the target as the adapters-on UNet (the reference's form), e.g. to rule the merged
    weights out; the default runs the merged-weights view."""
    from tcdistill.unet_views import MergedAdapters

    merged = _lora_strategy(tmp_path / "m")
    assert isinstance(merged.denoisers(merged.student)[1], MergedAdapters)
    plain = _lora_strategy(tmp_path / "p", lora_merged_target=False)
    assert not isinstance(plain.denoisers(plain.student)[1], MergedAdapters)


def test_lora_checkpoint_with_foreign_keys_is_refused(tmp_path: Path) -> None:
    """A resumed LoRA whose keys name no adapter here (another rank/targets) must not load silently as partly fresh."""
    strategy = _lora_strategy(tmp_path)
    tensors = strategy.lora_state_dict()
    strategy.load_state_tensors({"lora": tensors})  # its own keys load
    with pytest.raises(RuntimeError, match="unexpected keys"):
        strategy.load_state_tensors({"lora": {**tensors, "down_blocks.9.attentions.0.to_q.lora_A.weight": torch.zeros(2, 4)}})


@pytest.mark.parametrize("teacher_dtype,dtype,native", [("fp32", torch.float32, False), ("weight", torch.bfloat16, True)])
def test_separate_teacher_follows_teacher_dtype(tmp_path: Path, teacher_dtype: str, dtype: torch.dtype, native: bool) -> None:
    """--teacher_dtype fp32 (the reference's teacher): fp32 weights under autocast; 'weight': bf16 outside it."""
    strategy = _lora_strategy(tmp_path, torch.bfloat16, lora_separate_teacher=True, teacher_dtype=teacher_dtype)
    assert {p.dtype for p in strategy.separate_teacher.parameters()} == {dtype}
    teacher = strategy.denoisers(strategy.student)[2]
    assert (teacher.unet, teacher.dtype, teacher.native) == (strategy.separate_teacher, dtype, native)
    assert strategy.teacher_unet is strategy.separate_teacher  # what the trainer sets up (channels_last, compile, xformers)


@pytest.mark.parametrize("target_dtype", ["weight", "fp32"])
def test_full_target_runs_the_weight_dtype_shadow(target_dtype: str) -> None:
    """--target_dtype weight: the target forward reads the bf16 copy of the EMA weights, outside autocast (the copy is
    what after_optimizer_step refreshes); fp32: the EMA UNet itself under autocast."""
    from conftest import small_unet

    from tcdistill.strategy import FullStrategy

    family = type("F", (), {"unet": small_unet()})()
    strategy = FullStrategy(TrainConfig(**BASE, unet_time_cond_proj_dim=8, target_dtype=target_dtype), family, torch.bfloat16)
    target = strategy.denoisers(strategy.student)[1]
    want = ((strategy.target_shadow, torch.bfloat16, True) if target_dtype == "weight" else (strategy.target, None, False))
    assert want[0] is not None and (target.unet, target.dtype, target.native) == want
    for frozen in (want[0], strategy.teacher_unet):  # the EMA weights and the teacher are never trained
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("dtype,flags,copies", [(torch.bfloat16, {}, True), (torch.float32, {}, False),
                                                 (torch.bfloat16, dict(compile_unet=True), False),
                                                 (torch.bfloat16, dict(student_weight_copy=False), False)])
def test_student_weight_copies_only_eager_under_mixed_precision(dtype: torch.dtype, flags: dict, copies: bool) -> None:
    """--student_weight_copy runs the eager, unwrapped student from weight-dtype copies; a compiled UNet, fp32, or a
    wrapper (DDP keeps its per-weight hooks) runs the module itself."""
    from conftest import small_unet

    from tcdistill.strategy import FullStrategy
    from tcdistill.unet_views import WeightCopies

    family = type("F", (), {"unet": small_unet()})()
    strategy = FullStrategy(TrainConfig(**BASE, unet_time_cond_proj_dim=8, **flags), family, dtype)
    net = strategy.denoisers(strategy.student)[0].unet
    assert isinstance(net, WeightCopies) if copies else net is strategy.student
    wrapper = torch.nn.Sequential(strategy.student)  # stands in for a DDP wrapper
    assert strategy.denoisers(wrapper)[0].unet is wrapper


def test_lora_export_kohya_saves_the_kohya_file_too(tmp_path: Path) -> None:
    """--export_kohya: the final save writes the kohya-format file next to the diffusers one."""
    from tcdistill.export import KOHYA_WEIGHT_NAME

    paths = _lora_strategy(tmp_path, export_kohya=True).save_outputs(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["pytorch_lora_weights.safetensors", KOHYA_WEIGHT_NAME]
    assert all(os.path.isfile(p) for p in paths)


def test_lora_target_modules_matching_nothing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--lora_target_modules 'no_such_module'"):
        _lora_strategy(tmp_path, lora_target_modules="no_such_module")


@pytest.mark.parametrize("targets, named, kind", [("to_q,to_out", "to_out", "ModuleList"), ("to_q,norm1", "norm1", "GroupNorm")])
def test_lora_target_module_of_a_kind_lora_cannot_adapt_is_one_whole_line(tmp_path: Path, targets: str, named: str, kind: str) -> None:
    """QA: `--lora_target_modules to_q,to_out` (a ModuleList: the layer is to_out.0) stopped with "Target module ModuleList(",
    the first line of peft's multi-line message, which names neither the flag's culprit nor what is wrong with it."""
    with pytest.raises(ConfigError) as exc:
        _lora_strategy(tmp_path, lora_target_modules=targets)
    msg = str(exc.value)
    assert "\n" not in msg and f"'{named}'" in msg and kind in msg and "Linear" in msg, msg


def test_8bit_adam_keeps_channels_last_weights_and_views_of_them() -> None:
    """QA: bitsandbytes' 8-bit AdamW makes each parameter contiguous as it steps it (`p.data = p.data.contiguous()`), so
    under --channels_last the student's conv weights left channels_last after step 1 (a resumed run, its weights loaded
    back channels_last, then drifted from the uninterrupted run) and a view taken before the step (the fp32 merged LoRA
    target's adapter factor) went stale. The optimizer now hands each weight its own channels_last storage back."""
    pytest.importorskip("bitsandbytes")
    from types import SimpleNamespace

    from tcdistill.trainer import Trainer

    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    params = [torch.nn.Parameter(w.clone().to(memory_format=torch.channels_last)), torch.nn.Parameter(w.clone())]
    view = params[0].detach()
    opts = [Trainer._make_optimizer(SimpleNamespace(cfg=TrainConfig(**BASE, use_8bit_adam=True, channels_last=cl), device=torch.device("cpu")),
                                    [p], 1e-2) for p, cl in zip(params, (True, False))]
    for s in range(2):
        g = torch.randn(w.shape, generator=torch.Generator().manual_seed(s + 1))
        for p, opt in zip(params, opts):
            p.grad = g.clone().contiguous(memory_format=torch.channels_last if p is params[0] else torch.contiguous_format)
            opt.step()
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(params[0].detach(), params[1].detach()) and not torch.equal(params[1].detach(), w)
    assert torch.equal(view, params[0].detach())
