"""What differs between full-model and LoRA distillation: what trains, what the target is, what is saved."""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import atomic_dir, atomic_file
from .config import ConfigError, TrainConfig, first_line
from .export import LORA_WEIGHT_NAME
from .models import UNetDenoiser
from .tcd import Denoiser, ema_update
from .unet_views import AdaptersOff, DtypeCopies, MergedAdapters, MergedStudent, WeightCopies, WithLayerAttr, tuner_layers

if TYPE_CHECKING:
    from .families import ModelFamily


# The layer types peft's LoRA adapts. For another type its error is the module's repr over many lines, whose first line
# ("Target module ModuleList(") says nothing of what is wrong.
_LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.MultiheadAttention)


def _unadaptable_target(unet: nn.Module, targets: list[str]) -> str | None:
    """One line on the first of `targets` that matches (as peft matches a list: the whole module name, or its last dotted
    parts) a module LoRA cannot adapt, with the layers inside it worth naming instead; None when there is none."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # a layer peft adapted before it gave up is no culprit

    for name, module in unet.named_modules():
        hit = next((t for t in targets if name == t or name.endswith(f".{t}")), None)
        if hit is None or isinstance(module, (*_LORA_LAYERS, BaseTunerLayer)):
            continue
        inner = next((sub for sub, m in module.named_modules() if sub and isinstance(m, _LORA_LAYERS)), None)
        hint = f"; name the layers inside it instead, such as {hit}.{inner}" if inner else ""
        return (f"'{hit}' names {type(module).__name__} modules (such as {name}), which LoRA cannot adapt: it adapts "
                f"Linear, Conv and Embedding layers{hint}")
    return None


class _StudentCopies:
    """What both strategies share: the student's trainable parameters, its forward through weight-dtype copies of its
    trainable weights, and `_copies`, every weight-dtype copy the strategy holds (student, target), refreshed together
    when weights change."""

    cfg: TrainConfig
    student: nn.Module
    weight_dtype: torch.dtype
    _student_copies: WeightCopies | None = None
    _copies: list[DtypeCopies]
    _trainable: list[nn.Parameter] | None = None

    def _student_net(self, student_module: nn.Module) -> Any:
        """`--student_weight_copy`: eager, one process (a DDP wrapper keeps its per-weight gradient hooks, so the
        all-reduce keeps overlapping the backward), under mixed precision; else the module itself."""
        cfg = self.cfg
        if not (cfg.student_weight_copy and self.weight_dtype != torch.float32 and not cfg.compile_unet and student_module is self.student):
            return student_module
        if self._student_copies is None:
            self._student_copies = WeightCopies(self.student, self.weight_dtype)
            self._copies.append(self._student_copies.copies)
        return self._student_copies

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's trainable parameters, listed once (walking the modules every step is host time on a GPU)."""
        if self._trainable is None:
            self._trainable = [p for p in self.student.parameters() if p.requires_grad]
        return self._trainable

    def _refresh_copies(self) -> None:
        """After the fp32 weights change (an optimizer step, a load)."""
        for c in self._copies:
            c.refresh()


class FullStrategy(_StudentCopies):
    """Full student (teacher config + `time_cond_proj_dim`, zero-init w projection); target = EMA of the student."""

    name = "full"
    w_cond_student = True

    def __init__(self, cfg: TrainConfig, family: ModelFamily, weight_dtype: torch.dtype):
        from diffusers import UNet2DConditionModel

        self.cfg, self.family = cfg, family
        teacher_unet = family.unet
        self.w_dim = cfg.unet_time_cond_proj_dim
        src = teacher_unet
        if cfg.revision and cfg.revision != cfg.teacher_revision:
            # --revision: the student starts from another revision of the teacher's UNet.
            from .families import from_pretrained_checked, load_error  # safetensors only unless --allow_pickle_weights

            try:
                src = from_pretrained_checked(UNet2DConditionModel, cfg.pretrained_teacher_model, "unet", cfg, revision=cfg.revision)
            except (OSError, ValueError) as e:
                raise load_error(f"--revision {cfg.revision!r}: cannot load the student UNet from {cfg.pretrained_teacher_model!r}", e) from None
        student = UNet2DConditionModel.from_config(dict(teacher_unet.config), time_cond_proj_dim=self.w_dim)
        missing, unexpected = student.load_state_dict(src.state_dict(), strict=False)
        assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
        # Zero-init the new w input so the student starts exactly at the teacher (reference defect 14).
        nn.init.zeros_(student.time_embedding.cond_proj.weight)
        self.student = student.float().train()
        self.target = copy.deepcopy(self.student).requires_grad_(False).eval()
        # --target_dtype weight: the target runs from a weight-dtype copy of the fp32 EMA weights, outside autocast.
        # Under autocast every target forward re-casts each fp32 weight (one copy kernel per weight, ~700 for SD 1.5:
        # autocast caches only casts of leaves that require grad); the copy is refreshed once per optimizer step.
        self.target_shadow = (copy.deepcopy(self.target).to(weight_dtype)
                              if cfg.target_dtype == "weight" and weight_dtype != torch.float32 else None)
        self._copies = ([] if self.target_shadow is None
                        else [DtypeCopies(list(self.target.parameters()), list(self.target_shadow.parameters()))])
        self._ema_pairs: tuple[list[nn.Parameter], list[nn.Parameter]] | None = None
        self.teacher_dtype = teacher_dtype(cfg, weight_dtype)
        self.teacher_unet = teacher_unet.to(dtype=self.teacher_dtype).requires_grad_(False).eval()
        self.weight_dtype = weight_dtype

    @property
    def target_unet(self) -> nn.Module:
        """The module the target forward runs: the weight-dtype copy of the EMA weights, or the EMA UNet itself."""
        return self.target if self.target_shadow is None else self.target_shadow

    def to(self, device: torch.device) -> None:
        for m in (self.student, self.target, self.target_shadow, self.teacher_unet):
            if m is not None:
                m.to(device)

    def denoisers(self, student_module: nn.Module) -> tuple[Denoiser, Denoiser, Denoiser]:
        """`student_module` is the (possibly DDP-wrapped) student; target and teacher run unwrapped, without grad."""
        return (
            UNetDenoiser(self._student_net(student_module), self.w_dim),
            (UNetDenoiser(self.target, self.w_dim) if self.target_shadow is None
             else UNetDenoiser(self.target_shadow, self.w_dim, self.weight_dtype, native=True)),
            teacher_denoiser(self.teacher_unet, self.cfg, self.teacher_dtype),
        )

    def after_optimizer_step(self) -> None:
        if self._ema_pairs is None:  # listed once: the Parameter objects outlive .to() and load_state_dict
            self._ema_pairs = (list(self.target.parameters()), list(self.student.parameters()))
        ema_update(*self._ema_pairs, self.cfg.ema_decay)
        self._refresh_copies()

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"student": self.student.state_dict(), "target": self.target.state_dict()}

    def load_state_tensors(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        self.student.load_state_dict(tensors["student"])
        self.target.load_state_dict(tensors["target"])
        self._refresh_copies()

    def validation_unets(self) -> list[tuple[str, nn.Module, float]]:
        """(tag, unet, guidance_scale): online and EMA students get separate tags (reference defect 8)."""
        gs = self.cfg.validation_guidance_scale
        return [("online", self.student, gs), ("ema", self.target, gs)]

    def save_outputs(self, output_dir: str) -> list[str]:
        """`output_dir/unet` (online) and `output_dir/unet_target` (EMA, the deliverable); each folder appears whole or
        not at all (a full disk leaves no half-written UNet)."""
        paths = [os.path.join(output_dir, "unet"), os.path.join(output_dir, "unet_target")]
        for unet, path in zip((self.student, self.target), paths):
            with atomic_dir(path) as tmp:
                unet.save_pretrained(tmp, safe_serialization=True)
        return paths


class LoraStrategy(_StudentCopies):
    """LoRA on the teacher's own UNet: teacher = adapters off, target = student under no_grad (one UNet in memory)."""

    name = "lora"
    w_cond_student = False

    def __init__(self, cfg: TrainConfig, family: ModelFamily, weight_dtype: torch.dtype):
        from peft import LoraConfig

        self.cfg, self.family = cfg, family
        self.weight_dtype = weight_dtype
        self.teacher_dtype = teacher_dtype(cfg, weight_dtype)
        # --lora_separate_teacher: the reference's second frozen UNet (defect 11), copied before the adapters go in.
        self.separate_teacher = (copy.deepcopy(family.unet).to(dtype=self.teacher_dtype).requires_grad_(False).eval()
                                 if cfg.lora_separate_teacher else None)
        unet = family.unet.to(dtype=weight_dtype).requires_grad_(False)
        try:
            unet.add_adapter(
                LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_modules, init_lora_weights="gaussian")
            )
        except ValueError as e:  # peft: no listed name matches a UNet module, or one matches a module LoRA cannot adapt
            problem = _unadaptable_target(unet, cfg.lora_modules) or first_line(e)
            raise ConfigError(f"--lora_target_modules {cfg.lora_target_modules!r}: {problem}") from None
        # Trainable adapter weights stay fp32 (master weights); the frozen base runs in the weight dtype.
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.student = unet.train()
        self.target_unet = None  # the target is the student's own weights (merged, or under no_grad)
        self.teacher_unet = self.separate_teacher if self.separate_teacher is not None else unet
        self._teacher_view: Denoiser | None = None
        self._target_view: Denoiser | None = None
        self._merged_student: MergedStudent | None = None
        self._student_layers: list[nn.Module] = []  # adapter layers whose input cast is skipped (set with the views)
        self._copies = []

    def to(self, device: torch.device) -> None:
        self.student.to(device)
        if self.separate_teacher is not None:
            self.separate_teacher.to(device)

    def denoisers(self, student_module: nn.Module) -> tuple[Denoiser, Denoiser, Denoiser]:
        unet = self.student
        if self._teacher_view is None:  # built once: the views cache the adapter layers
            self._teacher_view = (teacher_denoiser(self.separate_teacher, self.cfg, self.teacher_dtype) if self.separate_teacher is not None
                                  else AdaptersOff(UNetDenoiser(unet, None, self.weight_dtype, native=True), unet))
            native = self.cfg.target_dtype == "weight"  # the merged weights are all in the weight dtype
            self._target_view = (MergedAdapters(unet, self.weight_dtype, native) if self.cfg.lora_merged_target and MergedAdapters.applies(unet)
                                 else UNetDenoiser(unet))
            if isinstance(self._target_view, MergedAdapters):  # its factors' weight-dtype copies follow the adapters
                self._copies.append(self._target_view.factors)
            # Under autocast peft's cast of each adapter input to fp32 is undone by autocast's cast back: skip both.
            # Not under selective checkpointing (the config allows that policy only with checkpointing on): the flip
            # is undone when the call returns, so the backward's recompute would cast where the forward did not.
            cfg = self.cfg
            skip_cast = cfg.lora_skip_input_cast and self.weight_dtype != torch.float32 and cfg.gradient_checkpointing_policy != "selective"
            self._student_layers = tuner_layers(unet) if skip_cast else []
        net = self._student_net(student_module)
        if self.cfg.lora_merged_student:  # built once per net: it keeps the per-layer choice it made at its first call
            if self._merged_student is None or self._merged_student.net is not net:
                self._merged_student = MergedStudent(net, unet)
            net = self._merged_student
        student = UNetDenoiser(net)
        if self._student_layers:
            return WithLayerAttr(student, self._student_layers, "cast_input_dtype_enabled", False), self._target_view, self._teacher_view
        return student, self._target_view, self._teacher_view

    def after_optimizer_step(self) -> None:
        self._refresh_copies()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.student)

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"lora": self.lora_state_dict()}

    def load_state_tensors(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        from peft.utils import set_peft_model_state_dict

        res = set_peft_model_state_dict(self.student, tensors["lora"])
        if getattr(res, "unexpected_keys", None):
            raise RuntimeError(f"LoRA checkpoint has unexpected keys: {res.unexpected_keys[:5]}")
        self._refresh_copies()

    def validation_unets(self) -> list[tuple[str, nn.Module, float]]:
        return [("lora", self.student, 0.0)]

    def save_outputs(self, output_dir: str) -> list[str]:
        """`output_dir/pytorch_lora_weights.safetensors` in diffusers' format (no PEFT `base_model.model.` prefix)."""
        # Keys stay in PEFT's lora_A/lora_B form: convert_state_dict_to_diffusers renames only the attention keys
        # (to `.lora.down`), and load_lora_weights, seeing lora_A elsewhere, then silently drops every attention LoRA.
        # contiguous: under --channels_last the conv adapters' weights are strided views, which safetensors refuses
        layers = {k: v.contiguous() for k, v in self.lora_state_dict().items()}
        paths = [os.path.join(output_dir, LORA_WEIGHT_NAME)]
        with atomic_file(paths[0]) as tmp:  # the file appears whole or not at all
            self.family.save_lora_weights(tmp, layers, self.student.peft_config["default"].to_dict())
        from .export import KOHYA_WEIGHT_NAME, export_kohya, folder_exports

        # --export_kohya's file, and the exports an earlier run (or `tcdistill export`) left beside the LoRA just replaced:
        # kept, they would be of the earlier LoRA.
        kohya = dict.fromkeys([KOHYA_WEIGHT_NAME] * self.cfg.export_kohya + folder_exports(paths[0]))
        paths += [export_kohya(paths[0], os.path.join(output_dir, name), unet_config=dict(self.student.config),
                                run=self.cfg.to_dict()) for name in kohya]
        return paths


def teacher_dtype(cfg: TrainConfig, weight_dtype: torch.dtype) -> torch.dtype:
    """The frozen teacher's dtype: the weight dtype, or fp32 under autocast for --teacher_dtype fp32 (reference-like)."""
    return torch.float32 if cfg.teacher_dtype == "fp32" else weight_dtype


def teacher_denoiser(unet: nn.Module, cfg: TrainConfig, dtype: torch.dtype) -> UNetDenoiser:
    """The frozen teacher as a Denoiser: in the weight dtype it runs outside autocast; fp32 (reference-like) under it."""
    return UNetDenoiser(unet, None, dtype, native=cfg.teacher_dtype == "weight")


def make_strategy(cfg: TrainConfig, family: ModelFamily, weight_dtype: torch.dtype) -> FullStrategy | LoraStrategy:
    """The strategy for `cfg.variant` over the family's teacher UNet."""
    if cfg.variant == "lora":
        return LoraStrategy(cfg, family, weight_dtype)
    return FullStrategy(cfg, family, weight_dtype)
