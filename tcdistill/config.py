"""Training configuration: one dataclass, a docstring (help) per field, the reference scripts' flag names and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .argparsing import OneLineParser


class ConfigError(ValueError):
    """An invalid flag or flag combination, reported as one line before any model is loaded."""


SEED_SCRIPTS = {("full", "sd"): "train_tcd_distill_sd_wds.py", ("lora", "sd"): "train_tcd_distill_lora_sd_wds.py",
                ("full", "sdxl"): "train_tcd_distill_sdxl_wds.py", ("lora", "sdxl"): "train_tcd_distill_lora_sdxl_wds.py"}
RUN_CONFIG = "tcdistill_config.json"  # the run's flags, written beside its outputs (generate/eval/export read them)
# The run record's step of the final weights: null from the run's start until its final save. A run stopped before it
# (SIGTERM, an error) left a record of its own flags beside an earlier run's weights, or none: generate/eval/export refuse it.
FINAL_STEP = "final_step"


def first_line(e: BaseException) -> str:
    """The first non-blank line of an exception's message (the type's name if it has none), for one-line errors."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def one_line(e: BaseException, limit: int | None = None) -> str:
    """`Type: message` with all whitespace runs folded to one space (at most `limit` characters), for one-line errors
    whose whole message matters (an OSError's path, a hub error's status)."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:limit]


# The seeds each consumer takes: numpy's legacy generator, which accelerate's set_seed seeds (with random and torch)
# from --seed, takes [0, 2**32 - 1]; torch generators take [-2**63, 2**64 - 1] (a negative seed is mapped to 2**64 + seed).
NUMPY_SEEDS = (0, 2**32 - 1)
TORCH_SEEDS = (-2**63, 2**64 - 1)
# Flags a resumed run is expected to keep (TrainConfig.changed_since); the rest (length, logging, checkpointing, speed
# options, loader workers) may change on a resume. Optimizer settings come from the checkpoint itself.
RUN_DEFINING = ("pretrained_teacher_model", "pretrained_vae_model_name_or_path", "teacher_revision", "revision", "clip_skip",
                "train_shards_path_or_url", "train_latents_path_or_url", "resolution", "interpolation_type", "center_crop",
                "random_flip", "use_fix_crop_and_size", "min_image_size", "max_pwatermark", "train_batch_size",
                "gradient_accumulation_steps", "proportion_empty_prompts", "seed", "w_min", "w_max", "num_ddim_timesteps",
                "loss_type", "huber_c", "timestep_scaling_factor", "distill_mode", "ema_decay", "lora_alpha", "lora_dropout",
                "lora_target_modules", "mixed_precision", "max_grad_norm")


def check_seed(flag: str, seed: int, bounds: tuple[int, int], count: int = 1, uses: str = "") -> None:
    """Refuse, as one ConfigError line, a seed whose `count` consecutive seeds (seed .. seed + count - 1, `uses` says why
    several) leave `bounds`: numpy and torch fail on them deep inside seeding with a cryptic message."""
    low, high = bounds
    if not low <= seed <= high - (count - 1):
        raise ConfigError(f"{flag} must be in [{low}, {high - (count - 1)}]{' ' + uses if uses else ''}, got {seed}.")


def resolution_refusal(resolution: int) -> str | None:
    """The one-line refusal of a --resolution whose R x R image is over PIL's decompression-bomb limit, else None: the
    loader skips every shard image above it as too large, so each training image would be upscaled from a smaller one
    (--resolution 100000 ran 1000 MemoryErrors in the loader after the teacher loaded, then stopped: "no usable sample")."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS  # None: the user's own code lifted the guard
    if limit is None or resolution ** 2 <= limit:
        return None
    return (f"--resolution {resolution} is above {math.isqrt(limit)}: a {resolution} x {resolution} image is over PIL's "
            f"decompression-bomb limit ({limit} pixels), above which the loader skips shard images, so every training image "
            "would be upscaled; train at the teacher's size (SD 512, SDXL 1024).")


def _need(cond: bool, msg: str) -> None:
    """TrainConfig's checks: refuse with the one-line `msg` unless `cond`."""
    if not cond:
        raise ConfigError(msg)


def check_clip_skip_floor(clip_skip: int | None, zero_is_none: bool = False) -> None:
    """The one lower bound of --clip_skip N (layers skipped before the last), for training, `tcdistill cache`, generate and
    eval alike (the upper bound needs the text encoder's config: `teacher_checks.check_clip_skip`); `zero_is_none`:
    generate/eval, where 0 asks for the text encoder's last layer on a run trained with clip skip."""
    low = 0 if zero_is_none else 1
    _need(clip_skip is None or clip_skip >= low, f"--clip_skip must be >= {low} (layers skipped before the last"
          f"{'; 0: none, the last layer' if zero_is_none else ''}), got {clip_skip}.")


DEFAULT_VALIDATION_PROMPTS = [
    "a photo of a red fox sitting in the snow",
    "a watercolor painting of a lighthouse at sunset",
    "a close-up portrait of an old man with a beard",
    "a bowl of fruit on a wooden table, studio lighting",
]


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


# Flags that name a local file or folder (a hub id never starts with `~`).
_PATH_FLAGS = ("pretrained_teacher_model", "pretrained_vae_model_name_or_path", "output_dir", "cache_dir", "logging_dir",
               "resume_from_checkpoint")
_MODEL_FLAGS = ("pretrained_teacher_model", "pretrained_vae_model_name_or_path")  # a local folder or a hub id
_SHARD_FLAGS = ("train_shards_path_or_url", "train_latents_path_or_url")


def check_not_single_file(value: str | None, flag: str) -> None:
    """Refuse a model flag naming a file: a model (or VAE) is a diffusers folder or hub id, and a single original-format
    checkpoint (A1111 / CivitAI) failed deep in a config read ("... is not a valid JSON file"). `tcdistill convert` makes
    the folder."""
    if value and os.path.isfile(value):
        raise ConfigError(f"{flag} {value} is a single checkpoint file, not a diffusers folder: convert it once with "
                          f"`tcdistill convert {shlex.quote(value)} --output_dir DIR --config BASE_MODEL` and pass DIR.")


def local_model_path(value: Any) -> Any:
    """`value` made absolute when it is a local folder given relative to the working directory, else `value` itself."""
    return os.path.abspath(value) if isinstance(value, str) and not os.path.isabs(value) and os.path.isdir(value) else value


@dataclass
class TrainConfig:
    """Every flag of the reference TCD/LCM scripts (same names and defaults) plus tcdistill's own."""

    # --- model
    pretrained_teacher_model: str | None = _f(None, "Teacher pipeline: hub id or local diffusers folder (required).")
    pretrained_vae_model_name_or_path: str | None = _f(None, "A different VAE (e.g. an fp16-safe one).")
    teacher_revision: str | None = _f(None, "Revision of the teacher on the hub.")
    revision: str | None = _f(None, "Revision of the student weights (the teacher's UNet) on the hub.")
    variant: str = _f("full", "What to train: the full UNet ('full') or a LoRA ('lora'). Set by the entry script.", choices=["full", "lora"])
    model_family: str = _f("sd", "Teacher family: 'sd' (SD 1.x/2.x) or 'sdxl'. Set by the entry script.", choices=["sd", "sdxl"])
    clip_skip: int | None = _f(None, "Condition on the text encoder's hidden state this many layers before the last, as diffusers' `pipe(..., clip_skip=N)` (SD: hidden_states[-(N + 1)] through the final layer norm; SDXL: hidden_states[-(N + 2)] of both encoders, pooled unchanged), for teachers sampled with clip skip (A1111's and kohya's \"Clip skip\" K, as NovelAI-descended anime models' 2, is K - 1 here on SD, K - 2 on SDXL). Teacher, student, empty prompts and validation all use it; recorded in tcdistill_config.json, which `tcdistill generate`/`eval` follow. From 1 to the text encoder's layers - 1; unset: the pipelines' default layer.")
    # --- run
    output_dir: str = _f("lcm-xl-distilled", "Where outputs and checkpoints go (the reference scripts' default name).")
    cache_dir: str | None = _f(None, "Download cache for hub models.")
    seed: int | None = _f(None, "Seed for reproducible training.")
    logging_dir: str = _f("logs", "Tracker log directory, relative to output_dir.")
    report_to: str = _f("tensorboard", "Trackers: tensorboard, wandb, comet_ml, all, or none.")
    tracker_project_name: str = _f("text2image-fine-tune", "Project name given to the trackers (logs go to output_dir/logging_dir/<this>).")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints (oldest pruned after a save completes).")
    resume_from_checkpoint: str | None = _f(None, "'latest' or a checkpoint path to resume from.")
    push_to_hub: bool = _f(False, "Upload the final output to the hub.")
    hub_token: str | None = _f(None, "Hub token for --push_to_hub.")
    hub_model_id: str | None = _f(None, "Hub repository for --push_to_hub.")
    local_rank: int = _f(-1, "Set by the launcher (kept for compatibility).")
    # --- data
    train_shards_path_or_url: str | None = _f(None, "Webdataset shards: brace pattern, '::'-separated list, local paths or pipe: urls.")
    train_latents_path_or_url: str | None = _f(None, "Cached shards from `tcdistill cache` (VAE latents + prompt embeddings): the step runs no VAE encoder or text encoder; wins over --train_shards_path_or_url.")
    resolution: int = _f(512, "Training image resolution (square).")
    interpolation_type: str = _f("bilinear", "Resize interpolation (the reference's choices; nearest_exact is PIL's nearest).",
                                 choices=["bilinear", "bicubic", "box", "nearest", "nearest_exact", "hamming", "lanczos"])
    center_crop: bool = _f(False, "Center crop after resize (default: random crop).")
    random_flip: bool = _f(False, "Random horizontal flip.")
    dataloader_num_workers: int = _f(0, "Data loader worker processes (0 = load in the main process).")
    train_batch_size: int = _f(16, "Batch size per device.")
    max_train_samples: int | None = _f(None, "Samples per epoch (with --num_train_epochs, sets the run length when --max_train_steps is unset).")
    proportion_empty_prompts: float = _f(0.0, "Fraction of captions replaced by the empty prompt.")
    data_failure_patience: int = _f(1000, "Consecutive unusable samples/shards (per worker) before the run stops with a data error.")
    data_timeout: float = _f(60.0, "Seconds a pipe: shard (curl, ...) may send no data before it is given up (its command killed) and counted as a `stalled` failure, like a bad shard (0 = wait forever).")
    min_image_size: int = _f(0, "Skip images whose original width or height is below this (json original_width/height, else the decoded size; SDXL scripts: 700).")
    max_pwatermark: float = _f(1.0, "Skip samples whose json pwatermark exceeds this (a missing field passes; SDXL scripts: 0.5; 1.0 = off).")
    use_fix_crop_and_size: bool = _f(False, "SDXL: micro-condition on original size (resolution, resolution) and crop (0, 0) instead of each sample's own.")
    max_nonfinite_steps: int = _f(10, "Consecutive non-finite losses/gradients (each step skipped) before the run stops.")
    allow_pickle_weights: bool = _f(False, "Allow loading .bin/.ckpt (pickle) weights; by default only safetensors load.")
    # --- schedule / optimizer
    num_train_epochs: int = _f(100, "Epochs of --max_train_samples samples (used only without --max_train_steps).")
    max_train_steps: int | None = _f(None, "Total optimizer steps.")
    learning_rate: float = _f(1e-4, "Learning rate (before --scale_lr).")
    scale_lr: bool = _f(False, "Multiply the LR by accumulation steps x batch size x processes.")
    lr_scheduler: str = _f("constant", "LR schedule (diffusers' get_scheduler names).",
                           choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    lr_warmup_steps: int = _f(500, "LR warmup steps.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    use_8bit_adam: bool = _f(False, "bitsandbytes' 8-bit AdamW.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    # --- distillation
    w_min: float = _f(5.0, "Min guidance w in the LCM form x0_w = x0_c + w (x0_c - x0_u), i.e. CFG scale w + 1.")
    w_max: float = _f(15.0, "Max guidance w (LCM form; CFG scale w + 1).")
    num_ddim_timesteps: int = _f(50, "N of the skipping-step DDIM grid (must equal TCDScheduler's original_inference_steps).")
    loss_type: str = _f("l2", "Distance: l2 (MSE) or huber (pseudo-Huber).", choices=["l2", "huber"])
    huber_c: float = _f(0.001, "Pseudo-Huber c.")
    vae_encode_batch_size: int = _f(32, "Images per VAE encode call (bounds memory).")
    timestep_scaling_factor: float = _f(10.0, "LCM boundary-scaling factor (c_skip/c_out); used by --distill_mode lcm only. TCD applies none: its TCF meets the boundary condition by construction (the reference TCD scripts still apply LCM's; at 10 they move c_skip by < 1e-5 for t >= 19).")
    distill_mode: str = _f("tcd", "tcd, or lcm (s = 0 with LCM boundary scalings) for comparisons.", choices=["tcd", "lcm"])
    unet_time_cond_proj_dim: int = _f(256, "Full model: width of the guidance embedding fed through time_cond_proj_dim.", only="full")
    ema_decay: float = _f(0.95, "Full model: EMA decay of the target network.", only="full")
    lora_rank: int = _f(64, "LoRA rank.", only="lora")
    lora_alpha: int = _f(64, "LoRA alpha.", only="lora")
    lora_dropout: float = _f(0.0, "LoRA dropout.", only="lora")
    lora_target_modules: str | None = _f(None, "Comma-separated module names for LoRA (default: attention, resnet, up/down-sampler and time-embedding layers).", only="lora")
    export_kohya: bool = _f(False, "LoRA: also write pytorch_lora_weights_kohya.safetensors (kohya keys for ComfyUI / A1111).", only="lora")
    # --- precision / speed
    mixed_precision: str | None = _f(None, "no, fp16 or bf16 (default: accelerate's config).", choices=["no", "fp16", "bf16"])
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    cast_teacher_unet: bool = _f(False, "Cast the frozen teacher to the --mixed_precision dtype. Already the default here (--teacher_dtype weight); it conflicts with --teacher_dtype fp32.")
    enable_xformers_memory_efficient_attention: bool = _f(False, "xformers attention where it can run; else PyTorch SDPA with a warning.")
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing in the student UNet.")
    gradient_checkpointing_policy: str = _f("full", "With --gradient_checkpointing: 'full' recomputes each block in the backward (least memory); 'selective' keeps the conv, matmul and attention outputs and recomputes only the norms, activations and adds between them (on the SD 1.5 architecture on CPU it saved 0.4x of what 'full' saves, for 1/6 of its extra time). On a GPU use it with --compile_unet: eager, its per-op Python policy made an H100's student forward 3.3x slower.", choices=["full", "selective"])
    batched_teacher: bool = _f(True, "Run the teacher's cond and uncond passes as one batched forward.", negatable=True)
    skip_identity_target: bool = _f(True, "Skip the target forward for samples with s == t_n (the target is x_prev).", negatable=True)
    teacher_dtype: str = _f("weight", "Frozen teacher UNet dtype: 'weight' (the --mixed_precision dtype, run outside autocast) or 'fp32' (the reference: fp32 weights under autocast).", choices=["weight", "fp32"])
    lora_separate_teacher: bool = _f(False, "LoRA: hold a separate frozen teacher UNet copy as the reference does (defect 11); only to measure its cost.", only="lora")
    target_dtype: str = _f("weight", "Target forward dtype under mixed precision: 'weight' (full: a weight-dtype copy of the EMA target, refreshed after each EMA update, +1 UNet in the weight dtype (when memory matters more, pass fp32); LoRA: the merged-weights target; both run outside autocast, like the teacher) or 'fp32' (the EMA/adapter weights under autocast, as the reference).", choices=["weight", "fp32"])
    lora_skip_input_cast: bool = _f(True, "LoRA under mixed precision: skip peft's cast of each adapter's input to the fp32 adapter dtype (autocast casts it back; same result, two fewer copies per layer).", negatable=True, only="lora")
    student_weight_copy: bool = _f(True, "Eager, one process, mixed precision: the student's trainable conv/linear weights run from weight-dtype copies refreshed after each optimizer step, and their gradients come back to the fp32 weights in one multi-tensor copy per top-level UNet block, instead of autocast casting each weight every forward and each gradient every backward (same numbers; costs a weight-dtype copy of the trainable weights held across steps: when memory matters more, e.g. with --gradient_checkpointing, pass --no_student_weight_copy).", negatable=True)
    lora_merged_student: bool = _f(True, "LoRA: in each adapted layer where it costs fewer multiply-adds forward + backward (rank large next to the layer's width), run the student's layer as its base op with `W + scaling B A` formed in the graph instead of the adapter branch (same function and gradients; chosen per layer at the first step).", negatable=True, only="lora")
    lora_merged_target: bool = _f(True, "LoRA: run the target as the base UNet with the adapters merged into its weights for the call (one op per layer, not the adapter branch).", negatable=True, only="lora")
    fused_adam: bool = _f(True, "Fused AdamW kernel on CUDA and CPU (off: the default foreach AdamW, as the reference).", negatable=True)
    compile_unet: bool = _f(False, "torch.compile the UNets (student, target, teacher) in place, static shapes (the target then runs every row).")
    compile_mode: str = _f("default", "torch.compile mode for --compile_unet ('reduce-overhead' adds CUDA graphs on GPU).",
                           choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    compile_scope: str = _f("unet", "What --compile_unet compiles: 'unet', each UNet whole (one graph per call site: the fastest steps, the longest compile); 'blocks', each transformer and ResNet block (regional compilation): blocks of one shape share a compiled graph, so the compile is shorter, and the code between blocks stays eager.", choices=["unet", "blocks"])
    channels_last: bool = _f(False, "Put the UNets in channels_last memory format.")
    # --- validation
    validation_steps: int = _f(200, "Run validation every N optimizer steps (0 = never).")
    validation_prompts: str | None = _f(None, "'|'-separated validation prompts (default: four built-in prompts).")
    validation_gamma: float = _f(0.3, "TCD gamma (scheduler eta) for validation sampling.")
    validation_inference_steps: str = _f("2,4,8", "Comma-separated step counts for validation.")
    validation_guidance_scale: float = _f(8.0, "Full model: guidance scale embedded at validation (w = scale - 1).", only="full")
    validation_seed: int = _f(0, "Seed of the validation noise.")

    def __post_init__(self) -> None:
        # `--resume_from_checkpoint=$RESUME` with RESUME unset: no resume, as the reference's truthiness test and the other
        # empty optional flags here (it was the path '.': "cannot resume from '.'").
        if self.resume_from_checkpoint == "":
            self.resume_from_checkpoint = None
        # A shell leaves `~` unexpanded after `--flag=` (the README's form): expand it here, as the shard urls are, instead
        # of writing to (or loading from) a folder literally named `~` under the working directory.
        for name in _PATH_FLAGS:
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        # A local model folder given relative to the working directory is recorded absolute: tcdistill_config.json and
        # the model card name it as the base that generate, eval, export and the card's code load, from any directory.
        for name in _MODEL_FLAGS:
            setattr(self, name, local_model_path(getattr(self, name)))
        # --cache_dir too, made or not: generate, eval and export read the run's hub teacher and VAE from it, and a relative
        # one was another (empty) folder under their working directory (offline: "does not appear to have a file named...").
        if self.cache_dir:
            self.cache_dir = os.path.abspath(self.cache_dir)
        self.validate()

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Cross-field checks; raise ConfigError with a one-line message (the first failing check, in this order)."""
        self._check_choices_and_inputs()
        self._check_training()
        self._check_combinations()
        self._check_ranges()
        self._check_outputs_and_validation()

    def _check_choices_and_inputs(self) -> None:
        """Flag choices, --seed, the teacher and the data, resolution and batch flags."""
        for f in dataclasses.fields(self):  # the parser checks choices; configs built in code are checked here
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            _need(not choices or value in choices or (value is None and f.default is None), f"--{f.name} must be one of {', '.join(map(str, choices or []))}; got {value!r}.")
        if self.seed is not None:
            check_seed("--seed", self.seed, NUMPY_SEEDS)
        _need(bool(self.pretrained_teacher_model), "--pretrained_teacher_model is required (a hub id or a local diffusers pipeline folder).")
        for name in _MODEL_FLAGS:
            check_not_single_file(getattr(self, name), f"--{name}")
        _need(bool(self.train_shards_path_or_url or self.train_latents_path_or_url),
              "--train_shards_path_or_url is required (webdataset shards: a path, brace pattern or pipe: url), or --train_latents_path_or_url.")
        _need(self.resolution > 0, f"--resolution must be positive, got {self.resolution}.")
        _need(not (refusal := resolution_refusal(self.resolution)), str(refusal))
        check_clip_skip_floor(self.clip_skip)
        _need(self.train_batch_size >= 1, f"--train_batch_size must be >= 1, got {self.train_batch_size}.")
        _need(self.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1.")
        _need(self.dataloader_num_workers >= 0, "--dataloader_num_workers must be >= 0.")

    def _check_training(self) -> None:
        """The guidance range, optimizer, EMA, DDIM grid, checkpointing and run-length flags, --lora_rank."""
        # inf passed the order check and made every loss non-finite: 10 skipped steps, then "lower --learning_rate"
        _need(math.isfinite(self.w_min) and math.isfinite(self.w_max), f"--w_min/--w_max must be finite, got {self.w_min}, {self.w_max}.")
        _need(self.w_min <= self.w_max, f"--w_min ({self.w_min}) must be <= --w_max ({self.w_max}).")
        _need(self.w_min >= 0, f"--w_min must be >= 0 (LCM form: w = CFG scale - 1), got {self.w_min}.")
        # inf passed `> 0` and ran 10 non-finite steps, then said "lower --learning_rate"
        _need(0 < self.learning_rate < math.inf, f"--learning_rate must be finite and > 0, got {self.learning_rate}.")
        _need(0.0 <= self.ema_decay <= 1.0, f"--ema_decay must be in [0, 1], got {self.ema_decay}.")
        _need(0.0 <= self.proportion_empty_prompts <= 1.0, "--proportion_empty_prompts must be in [0, 1].")
        _need(0.0 <= self.validation_gamma <= 1.0, "--validation_gamma must be in [0, 1].")
        _need(self.num_ddim_timesteps >= 1, "--num_ddim_timesteps must be >= 1.")
        _need(self.checkpointing_steps >= 1, "--checkpointing_steps must be >= 1.")
        _need(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1, "--checkpoints_total_limit must be >= 1.")
        _need(self.max_train_steps is None or self.max_train_steps >= 1, "--max_train_steps must be >= 1.")
        _need(self.max_train_samples is None or self.max_train_samples >= 1, "--max_train_samples must be >= 1.")
        _need(self.max_train_steps is not None or self.max_train_samples is not None,
              "Set --max_train_steps (or --max_train_samples with --num_train_epochs): the shard stream is endless.")
        _need(self.lora_rank >= 1, "--lora_rank must be >= 1.")

    def _check_combinations(self) -> None:
        """Flags that need or contradict another flag; the loss's --huber_c and --timestep_scaling_factor."""
        _need(not (self.variant == "lora" and self.teacher_dtype == "fp32" and not self.lora_separate_teacher),
              "--teacher_dtype fp32 with LoRA needs --lora_separate_teacher (the adapters-off teacher shares the student's weight-dtype base).")
        _need(self.gradient_checkpointing or self.gradient_checkpointing_policy == "full",
              "--gradient_checkpointing_policy selective needs --gradient_checkpointing.")
        # SD UNets take no size/crop micro-conditioning, so the flag would change nothing (the reference SD scripts lack it).
        _need(self.model_family == "sdxl" or not self.use_fix_crop_and_size,
              "--use_fix_crop_and_size applies only to SDXL teachers (--model_family sdxl); an SD teacher would ignore it.")
        _need(self.compile_unet or self.compile_scope == "unet", "--compile_scope blocks needs --compile_unet.")
        _need(self.compile_unet or self.compile_mode == "default", f"--compile_mode {self.compile_mode} needs --compile_unet.")
        # inf made every pseudo-Huber loss inf - inf = nan (10 skipped steps), and LCM's boundary scalings nan at t = 0
        _need(0 < self.huber_c < math.inf, f"--huber_c must be finite and > 0, got {self.huber_c}.")
        _need(0 < self.timestep_scaling_factor < math.inf, f"--timestep_scaling_factor must be finite and > 0, got {self.timestep_scaling_factor}.")
        _need(self.variant != "lora" or not self.revision or self.revision == self.teacher_revision,
              "--revision picks the full student's starting UNet; a LoRA adapts the teacher's own UNet, chosen with --teacher_revision.")
        _need(not (self.cast_teacher_unet and self.teacher_dtype == "fp32"),
              "--cast_teacher_unet casts the teacher to the weight dtype; it contradicts --teacher_dtype fp32 (pass one of them).")

    def _check_ranges(self) -> None:
        """The data, step-guard, VAE-batch, w-embedding, LoRA, optimizer and tracker ranges."""
        _need(self.data_failure_patience >= 1, "--data_failure_patience must be >= 1.")
        _need(self.data_timeout >= 0, f"--data_timeout must be >= 0 (0 = wait forever), got {self.data_timeout}.")
        _need(self.min_image_size >= 0, f"--min_image_size must be >= 0, got {self.min_image_size}.")
        _need(0.0 <= self.max_pwatermark <= 1.0, f"--max_pwatermark must be in [0, 1], got {self.max_pwatermark}.")
        _need(self.max_nonfinite_steps >= 1, "--max_nonfinite_steps must be >= 1.")
        _need(self.validation_steps >= 0, "--validation_steps must be >= 0.")
        _need(self.vae_encode_batch_size >= 1, "--vae_encode_batch_size must be >= 1.")
        # The sinusoidal w embedding divides by (dim // 2 - 1): below 4 it is a division by zero (diffusers: inf).
        _need(self.unet_time_cond_proj_dim >= 4, f"--unet_time_cond_proj_dim must be >= 4, got {self.unet_time_cond_proj_dim}.")
        _need(self.lora_alpha > 0, "--lora_alpha must be > 0.")
        _need(0.0 <= self.lora_dropout < 1.0, "--lora_dropout must be in [0, 1).")
        _need(self.max_grad_norm > 0, "--max_grad_norm must be > 0.")
        _need(self.lr_warmup_steps >= 0, "--lr_warmup_steps must be >= 0.")
        _need(self.num_train_epochs >= 1, "--num_train_epochs must be >= 1.")
        # an inf epsilon zeroed every Adam update (only weight decay moved the weights); torch refused a negative or nan
        # weight decay only when it built the optimizer, with a traceback after the weights had loaded
        _need(0 < self.adam_epsilon < math.inf and 0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
              "--adam_beta1/2 must be in [0, 1) and --adam_epsilon finite and > 0.")
        _need(0 <= self.adam_weight_decay < math.inf, f"--adam_weight_decay must be finite and >= 0, got {self.adam_weight_decay}.")
        _need(math.isfinite(self.validation_guidance_scale), f"--validation_guidance_scale must be finite, got {self.validation_guidance_scale}.")
        _need(self.report_to in ("tensorboard", "wandb", "comet_ml", "all", "none"), f"--report_to: unknown tracker {self.report_to!r}.")

    def _check_outputs_and_validation(self) -> None:
        """--push_to_hub's repo name, --lora_target_modules, and the validation steps and seeds."""
        _need(not self.push_to_hub or bool(self.hub_repo_name),
              f"--push_to_hub needs --hub_model_id: the output folder {self.output_dir!r} has no name to call the repo.")
        _need(self.lora_target_modules is None or bool(self.lora_modules), "--lora_target_modules lists no module names.")
        _need(self.validation_steps == 0 or bool(self.inference_steps),
              "--validation_inference_steps lists no step counts (or pass --validation_steps 0 for no validation).")
        for n in self.inference_steps:
            _need(1 <= n <= self.num_ddim_timesteps, f"--validation_inference_steps: {n} not in [1, {self.num_ddim_timesteps}].")
        if self.validation_steps:
            n = len(self.validation_prompt_list)
            check_seed("--validation_seed", self.validation_seed, TORCH_SEEDS, count=n,
                       uses=f"for {n} validation prompts (prompt i samples with --validation_seed + i)")

    @property
    def hub_repo_name(self) -> str:
        """--hub_model_id, else the output folder's name, as the reference (absolute, so `.` names the folder; `/` is "")."""
        return self.hub_model_id or os.path.basename(os.path.abspath(self.output_dir))

    @property
    def inference_steps(self) -> list[int]:
        try:
            return [int(x) for x in self.validation_inference_steps.split(",") if x.strip()]
        except ValueError as e:
            raise ConfigError(f"--validation_inference_steps must be comma-separated integers: {e}") from None

    @property
    def validation_prompt_list(self) -> list[str]:
        """--validation_prompts split at '|', or the built-in prompts."""
        return [p for p in (self.validation_prompts or "").split("|") if p.strip()] or list(DEFAULT_VALIDATION_PROMPTS)

    @property
    def lora_modules(self) -> list[str]:
        if self.lora_target_modules:
            return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]

    def changed_since(self, saved: dict[str, Any]) -> list[str]:
        """`--flag now (checkpoint: then)` for each RUN_DEFINING flag that differs from `saved`, a checkpoint's config."""
        from .preflight import resolved_shards

        now = self.to_dict()

        def same(k: str) -> bool:
            if k in _MODEL_FLAGS:  # a checkpoint from before model folders were recorded absolute: the same folder
                return local_model_path(saved[k]) == now[k]
            if k in _SHARD_FLAGS and saved[k] != now[k]:  # the same shard files, spelt relative once and absolute once
                return saved[k] is not None and now[k] is not None and resolved_shards(saved[k]) == resolved_shards(now[k])
            return saved[k] == now[k]

        return [f"--{k} {now[k]} (checkpoint: {saved[k]})" for k in RUN_DEFINING if k in saved and not same(k)]

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        """All fields; `redact` blanks secrets (--hub_token) for files and trackers that may be published."""
        d = dataclasses.asdict(self)
        if redact and d.get("hub_token"):
            d["hub_token"] = "<redacted>"
        return d


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def field_type(f: dataclasses.Field) -> Callable[[str], Any]:
    """How a flag's text becomes the field's value: a bool (1/0, true/false, yes/no, on/off), an int, a float or a str."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return _parse_bool if kind == "bool" else int if kind.startswith("int") else float if kind.startswith("float") else str


def build_parser(cls: type = TrainConfig, prog: str | None = None, defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per dataclass field (bools are store_true; negatable ones get --no_flag)."""
    p = OneLineParser(prog=prog, description=cls.__doc__)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = defaults.get(f.name, f.default)
        # argparse %-formats help text: a literal % (in the help or a default such as a shard url) is written %%
        help_ = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        if f.metadata.get("only") not in (None, defaults.get("variant", f.metadata.get("only"))):
            help_ = argparse.SUPPRESS  # the other variant's flag: still parsed, so that parse_config can refuse it by name
        typ = field_type(f)
        if typ is _parse_bool:
            p.add_argument(f"--{f.name}", nargs="?", const=True, default=default, type=_parse_bool, help=help_)
            if f.metadata.get("negatable"):
                p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                               help=argparse.SUPPRESS if help_ == argparse.SUPPRESS else f"Turn off --{f.name}.")
            continue
        p.add_argument(f"--{f.name}", type=typ, default=default, choices=f.metadata.get("choices"), help=help_)
    return p


def parse_config(argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None, prog: str | None = None) -> TrainConfig:
    """Parse command-line flags into a validated TrainConfig; bad values exit with a one-line error."""
    parser = build_parser(prog=prog, defaults=defaults)
    ns = parser.parse_args(argv)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        ns.local_rank = env_rank
    try:
        cfg = TrainConfig(**vars(ns))
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    # A flag of the other variant (--lora_rank to a full-model script, --ema_decay to a LoRA one) changes nothing:
    # refuse it, as the reference scripts do (their parsers lack the other variant's flags), instead of ignoring it.
    only = {f.name: f.metadata.get("only") for f in dataclasses.fields(TrainConfig)}
    wrong = sorted(n for n in _given_flags(parser, argv) if only.get(n) not in (None, cfg.variant))
    if wrong:
        other = "LoRA" if cfg.variant == "full" else "full-model"
        this = "the full model" if cfg.variant == "full" else "a LoRA"
        parser.exit(2, f"{parser.prog}: error: {', '.join('--' + n for n in wrong)} appl{'y' if len(wrong) > 1 else 'ies'} "
                       f"only to {other} training; this run trains {this} and would ignore {'them' if len(wrong) > 1 else 'it'}.\n")
    return cfg


def _given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests of the flags given on the command line (abbreviations included), not those left at their defaults:
    argparse fills in a default only where the namespace has no value yet."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions})
    parser.parse_args(argv, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not unset}
