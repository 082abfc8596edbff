"""Shared fixtures for the end-to-end tests: a tiny offline teacher, tiny shards, the seed README's commands, and
helpers that run the entry scripts as subprocesses and read what they wrote (checkpoints, tensorboard events)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import runpy
import shutil
import stat
import subprocess
import sys
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pytest
import torch

if TYPE_CHECKING:
    from tcdistill.data import DataConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"full": ROOT / "train_tcd_distill_sd_wds.py", "lora": ROOT / "train_tcd_distill_lora_sd_wds.py"}
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
PROMPT = "a red circle on a blue background"
# TrainConfig flags that pass its checks without a teacher or shards being read (test_flags.py, test_strategy_flags.py).
BASE = dict(pretrained_teacher_model="t", train_shards_path_or_url="s.tar", max_train_steps=1)

# The seed README's flags, verbatim (the `export`ed variables and the shard url are substituted by `seed_flags`).
SEED_README_FLAGS = {
    "full": """--pretrained_teacher_model=$MODEL_NAME --output_dir=$OUTPUT_DIR --mixed_precision=fp16 --resolution=512
        --learning_rate=4e-6 --loss_type=l2 --ema_decay=0.95 --adam_weight_decay=0.01 --max_train_steps=100000
        --max_train_samples=4000000 --dataloader_num_workers=8 --train_shards_path_or_url=$SHARDS --validation_steps=200
        --checkpointing_steps=200 --checkpoints_total_limit=10 --train_batch_size=12 --gradient_checkpointing
        --enable_xformers_memory_efficient_attention --gradient_accumulation_steps=1 --use_8bit_adam
        --resume_from_checkpoint=latest --report_to=tensorboard --seed=453645634""",
    "lora": """--pretrained_teacher_model=$MODEL_NAME --output_dir=$OUTPUT_DIR --mixed_precision=fp16 --resolution=512
        --lora_rank=64 --learning_rate=4.5e-6 --loss_type=l2 --adam_weight_decay=0.01 --max_train_steps=10000
        --max_train_samples=4000000 --dataloader_num_workers=8 --train_shards_path_or_url=$SHARDS --validation_steps=200
        --checkpointing_steps=200 --checkpoints_total_limit=10 --train_batch_size=12 --gradient_checkpointing
        --enable_xformers_memory_efficient_attention --gradient_accumulation_steps=1 --use_8bit_adam
        --resume_from_checkpoint=latest --report_to=tensorboard --seed=453645634""",
}
# What a 2-core CPU needs instead (fp16 needs a GPU; everything else is size): the only departures from the README.
CPU_OVERRIDES: dict[str, Any] = {"mixed_precision": "no", "resolution": 32, "train_batch_size": 2, "max_train_steps": 3,
                                 "validation_steps": 3, "checkpointing_steps": 2, "dataloader_num_workers": 0}
LORA_CPU_OVERRIDES: dict[str, Any] = {"lora_rank": 4}
# Validation at 4 prompts x 3 step counts costs seconds; runs that do not test validation sample one prompt at 2 steps.
QUICK_VALIDATION: dict[str, Any] = {"validation_prompts": "a red circle on a blue background", "validation_inference_steps": "2"}


def small_unet() -> Any:
    """A UNet2DConditionModel of a few thousand weights with cross-attention in one down and one up block (seeded)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4,
    ).train()


def seed_flags(variant: str, *, teacher: Path | str, shards: str, output_dir: Path | str, **overrides: Any) -> list[str]:
    """The README command's flags for `variant` with paths substituted, CPU overrides, then `overrides`.

    An override value of None drops the flag, True makes it a bare switch; new names are appended.
    """
    text = SEED_README_FLAGS[variant].replace("$MODEL_NAME", str(teacher)).replace("$OUTPUT_DIR", str(output_dir))
    text = text.replace("$SHARDS", shards)
    flags: dict[str, Any] = {}
    for tok in text.split():
        name, eq, value = tok[2:].partition("=")
        flags[name] = value if eq else True
    flags.update(CPU_OVERRIDES)
    if variant == "lora":
        flags.update(LORA_CPU_OVERRIDES)
    flags.update(overrides)
    return [f"--{k}" if v is True else f"--{k}={v}" for k, v in flags.items() if v is not None]


@pytest.fixture(scope="session")
def run_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Subprocess environment: offline, a private HF home (no user accelerate config), one intra-op thread."""
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp_path_factory.mktemp("hf_home")), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core box spinning OpenMP threads cost
    # 5x the CPU time (measured: 84 s vs 15 s user for one 3-step run at load average 7).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run_train(variant: str, flags: list[str], env: dict[str, str], *, launcher: list[str] | None = None,
              extra_env: dict[str, str] | None = None, script: str | Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run an entry script (`python SCRIPT` unless `launcher`, e.g. accelerate launch) and return it, output merged."""
    cmd = [*(launcher or [sys.executable]), str(script or SCRIPTS[variant]), *flags]
    return subprocess.run(cmd, cwd=ROOT, env={**env, **(extra_env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


@contextlib.contextmanager
def lock_holder(output_dir: Path, env: dict[str, str], role: str = "training run") -> Iterator[subprocess.Popen]:
    """Another process holding `output_dir`'s run lock (as a concurrent training run, or a `role`, would) for the block;
    killed after."""
    hold = ("import sys, time; from tcdistill.preflight import lock_output_dir; lock_output_dir(sys.argv[1], sys.argv[2]); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(output_dir), role], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def check_ok(proc: subprocess.CompletedProcess) -> str:
    """Assert a run exited 0 without a traceback; return its output."""
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    assert proc.returncode == 0, f"exit {proc.returncode}: {' '.join(proc.args)}\n{tail}"
    assert "Traceback" not in proc.stdout, tail
    return proc.stdout


def event_files(logdir: Path) -> set[Path]:
    """All tensorboard event files under `logdir`."""
    return set(Path(logdir).rglob("events.out.tfevents.*"))


def read_scalars(files: set[Path] | list[Path]) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] over the given event files (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for f in sorted(files):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] += [(e.step, e.value) for e in acc.Scalars(tag)]
    return dict(out)


def assert_plain_modes(*paths: Path) -> None:
    """Outputs have the modes a plain open() gives under this umask (safetensors 0.8 wrote 0600: unreadable to a
    ComfyUI/A1111 service run as another user)."""
    mask = os.umask(0o022)
    os.umask(mask)
    for p in paths:
        for f in [p, *p.rglob("*")] if p.is_dir() else [p]:
            want = (0o777 if f.is_dir() else 0o666) & ~mask
            assert stat.S_IMODE(f.stat().st_mode) == want, (f, oct(f.stat().st_mode), oct(want))


def complete_checkpoints(output_dir: Path) -> dict[int, Path]:
    """step -> checkpoint dir, for `checkpoint-<step>` dirs holding their COMPLETE marker."""
    out = {}
    for p in Path(output_dir).glob("checkpoint-*"):
        if p.is_dir() and (p / "COMPLETE").is_file():
            out[int(p.name.split("-")[1])] = p
    return out


def save_small_checkpoint(io: Any, step: int) -> Path:
    """Save a small checkpoint through a `CheckpointIO` whose contents are derived from ``step``."""
    return io.save(step, tensors={"model": {"w": torch.full((4, 4), float(step))}},
                   states={"counters": {"step": step}}, meta={"step": step})


def saved_tiny_pipeline(tmp_path_factory: pytest.TempPathFactory, name: str, sdxl: bool = False, **kw: Any) -> Path:
    """A randomly initialised tiny SD (or SDXL) pipeline saved as a diffusers folder under a new temp dir `name`."""
    from tcdistill.tiny import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp(name)
    (build_tiny_sdxl_pipeline if sdxl else build_tiny_sd_pipeline)(path, **kw)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny SD pipeline (VAE factor 2, 32 px images), read-only: copy it to change it."""
    return saved_tiny_pipeline(tmp_path_factory, "tiny_teacher")


@pytest.fixture(scope="session")
def config_only_teacher(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher without weight files: a run that tries to load a model from it fails loudly."""
    path = tmp_path_factory.mktemp("config_only") / "teacher"
    shutil.copytree(tiny_teacher, path, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return path


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Brace pattern of two 8-sample webdataset shards of 32 px captioned shapes."""
    from tcdistill.tiny import shard_pattern, write_tiny_shards

    path = tmp_path_factory.mktemp("tiny_shards")
    write_tiny_shards(path, n_shards=2, per_shard=8, image_size=32, seed=0)
    return shard_pattern(path, 2)


@pytest.fixture(scope="session")
def full_seed_run(tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The README's full-model command through `accelerate launch --cpu --num_processes 1`, 2 loader workers, 3 steps."""
    out = tmp_path_factory.mktemp("full_seed") / "out"
    flags = seed_flags("full", teacher=tiny_teacher, shards=tiny_shards, output_dir=out, dataloader_num_workers=2)
    proc = run_train("full", flags, run_env, launcher=[ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                                                       "--mixed_precision", "no", "--dynamo_backend", "no"])
    return {"out": out, "flags": flags, "proc": proc, "log": check_ok(proc)}


@pytest.fixture(scope="session")
def lora_seed_run(tiny_teacher: Path, tiny_shards: str, run_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The README's LoRA command through `python <script>`, in-process loading, 3 steps."""
    out = tmp_path_factory.mktemp("lora_seed") / "out"
    flags = seed_flags("lora", teacher=tiny_teacher, shards=tiny_shards, output_dir=out)
    proc = run_train("lora", flags, run_env)
    return {"out": out, "flags": flags, "proc": proc, "log": check_ok(proc)}


@pytest.fixture(scope="session")
def sdxl_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny SDXL pipeline, read-only."""
    return saved_tiny_pipeline(tmp_path_factory, "tiny_sdxl", sdxl=True)


@pytest.fixture(scope="session")
def vpred_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD teacher with SD 2.x's v-prediction, read-only."""
    return saved_tiny_pipeline(tmp_path_factory, "tiny_vpred", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def sample_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD teacher predicting x0 (prediction_type "sample"), read-only."""
    return saved_tiny_pipeline(tmp_path_factory, "tiny_sample", prediction_type="sample")


@pytest.fixture(scope="session")
def zero_snr_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny v-prediction teacher on a zero-terminal-SNR schedule (rescale_betas_zero_snr, trailing spacing, as
    zero-SNR SD 2.x fine-tunes ship): alpha_999 = 0, so x_999 is pure noise. Read-only."""
    path = saved_tiny_pipeline(tmp_path_factory, "tiny_zero_snr", prediction_type="v_prediction")
    conf = path / "scheduler" / "scheduler_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one intra-op thread; two threads on a busy 2-core machine stall each other. Modules
    that train or sample in-process use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_accelerator_state() -> Iterator[None]:
    """For a test that builds its own Accelerator: accelerate's process-wide state must not leak into or out of it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run_script(script: str, flags: list[str]) -> None:
    """Run an entry script in this process, as `python SCRIPT FLAGS` would (saves the interpreter start and imports)."""
    argv = sys.argv
    sys.argv = [script, *map(str, flags)]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = argv


def train_flags(teacher: Path, shards: str, out: Path, steps: int, *extra: str) -> list[str]:
    """A tiny CPU run: 32 px, batch 2, a checkpoint every step, one validation grid at step 2."""
    return [f"--pretrained_teacher_model={teacher}", f"--output_dir={out}", f"--train_shards_path_or_url={shards}",
            "--resolution=32", "--train_batch_size=2", "--report_to=none", "--seed=1", "--mixed_precision=no",
            f"--max_train_steps={steps}", "--checkpointing_steps=1", "--validation_steps=2",
            "--validation_inference_steps=2", f"--validation_prompts={PROMPT}", *extra]


def train_and_resume(script: str, teacher: Path, shards: str, out: Path, caplog: pytest.LogCaptureFixture, *extra: str) -> None:
    """Train 2 steps, then resume from the latest checkpoint to step 3; assert the second run really resumed."""
    run_script(script, train_flags(teacher, shards, out, 2, *extra))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tcdistill"):
        run_script(script, train_flags(teacher, shards, out, 3, "--resume_from_checkpoint=latest", *extra))
    assert f"Resumed from {out / 'checkpoint-2'} at step 2" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert all((out / f"checkpoint-{i}" / "COMPLETE").is_file() for i in (1, 2, 3))


def sample(pipe: Any, **kw: Any) -> np.ndarray:
    """One seeded 2-step TCD sample at 32 px as an array."""
    from diffusers import TCDScheduler

    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    kw.setdefault("guidance_scale", 0.0)
    out = pipe(PROMPT, num_inference_steps=2, eta=0.3, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    return out


def randomize_lora_b(unet: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Give every LoRA up-projection (peft's `lora_B`, zero at init) random weights, so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def make_lora(teacher: Path, out: Path, rank: int = 4, alpha: int = 8, mixed_keys: bool = False, extra: tuple = ()) -> Path:
    """A LoRA (rank 4, alpha 8: scale 2) with random (non-zero) up weights, saved the way LoraStrategy.save_outputs saves one (`extra`: more targets)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tcdistill.config import TrainConfig

    modules = TrainConfig(pretrained_teacher_model="t", train_shards_path_or_url="s", max_train_steps=1).lora_modules + list(extra)
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    with torch.random.fork_rng(devices=[]):  # the same adapter on every call, caller's RNG untouched
        torch.manual_seed(0)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, init_lora_weights="gaussian"))
    randomize_lora_b(unet)
    layers = get_peft_model_state_dict(unet)
    if mixed_keys:  # the older layout: attention projections renamed to `.lora.down/.lora.up`
        layers = convert_state_dict_to_diffusers(layers)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return out


def hub_teacher_revisions(teacher: Path, hub: Path) -> dict[str, Path]:
    """The teacher as the hub repo `tiny/teacher` in the cache `hub`: revisions main and v1 (another UNet), by snapshot."""
    from safetensors.torch import load_file, save_file

    repo = hub / "models--tiny--teacher"
    snapshots = {ref: repo / "snapshots" / (c * 40) for ref, c in (("main", "a"), ("v1", "b"))}
    (repo / "refs").mkdir(parents=True)
    for ref, folder in snapshots.items():
        shutil.copytree(teacher, folder)
        (repo / "refs" / ref).write_text(folder.name)
    weights = snapshots["v1"] / "unet" / "diffusion_pytorch_model.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in load_file(weights).items()}, weights)
    return snapshots


def full_output(teacher: Path, out: Path) -> Path:
    """A full-model training output layout: `unet_target` (teacher + zero w projection) and tcdistill_config.json."""
    from diffusers import UNet2DConditionModel

    teacher_unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    student = UNet2DConditionModel.from_config(dict(teacher_unet.config), time_cond_proj_dim=256)
    student.load_state_dict(teacher_unet.state_dict(), strict=False)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    student.save_pretrained(out / "unet_target")
    (out / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": str(teacher), "num_ddim_timesteps": 50}))
    return out


# The webdataset loader at test size (test_data.py, test_shard_streams.py).
R = 16


def cfg_for(urls, **kw) -> DataConfig:
    """A small, seeded config for tests."""
    from tcdistill.data import DataConfig

    kw.setdefault("resolution", R)
    kw.setdefault("train_batch_size", 4)
    kw.setdefault("seed", 0)
    kw.setdefault("failure_patience", 50)
    return DataConfig(train_shards_path_or_url=urls, **kw)


def batches(cfg: DataConfig, n: int) -> list[dict]:
    """The first n batches of a fresh loader."""
    from tcdistill.data import build_train_dataloader

    return list(islice(iter(build_train_dataloader(cfg)), n))


def total_skipped(bs: list[dict]) -> Counter:
    """Sum of the per-batch skipped counts."""
    out: Counter = Counter()
    for b in bs:
        out.update(b["skipped"])
    return out


# `tcdistill cache` at test size (test_cache.py, test_cache_refusals.py).
CACHE_RES = 32


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One 4-sample shard of 40x48 images (so the loader resizes and crops)."""
    from tcdistill.tiny import shard_pattern, write_tiny_shards

    path = tmp_path_factory.mktemp("cache_src")
    write_tiny_shards(path, n_shards=1, per_shard=4, image_size=(40, 48), seed=3)
    return shard_pattern(path, 1)


def make_cache(teacher: Path, shards: str, out: Path, *extra: str) -> str:
    """Run `tcdistill cache` at CACHE_RES into `out`; the path of its first shard."""
    from tcdistill.cache import main as cache_main

    cache_main(["--pretrained_teacher_model", str(teacher), "--train_shards_path_or_url", shards, "--output_dir", str(out),
                "--resolution", str(CACHE_RES), "--center_crop", "--batch_size", "3", *extra])
    return str(out / "00000.tar")


@pytest.fixture(scope="module")
def fp32_cache(tiny_teacher: Path, one_shard: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_cache(tiny_teacher, one_shard, tmp_path_factory.mktemp("cache32"), "--storage_dtype", "fp32")


def cache_trainer(teacher: Path, shards: str, out: Path, **kw: Any) -> Any:
    """A Trainer at CACHE_RES for `shards` (pixels, or cached latents with train_latents_path_or_url)."""
    from tcdistill.config import TrainConfig
    from tcdistill.trainer import Trainer

    cfg = dict(pretrained_teacher_model=str(teacher), output_dir=str(out), train_shards_path_or_url=shards, resolution=CACHE_RES,
               train_batch_size=4, max_train_steps=10, report_to="none", seed=0, mixed_precision="no", center_crop=True)
    return Trainer(TrainConfig(**{**cfg, **kw}))
