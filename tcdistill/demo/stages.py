"""The demo's stages: world, teacher, classifier, the students (through the seed scripts' trainer) and evaluation."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from . import world as W

if TYPE_CHECKING:
    from . import Budget

Log = Callable[[str], None]
EVAL_SEED_OFFSET = 10_007  # evaluation prompts come from another stream of the world than the training set
PER_SHARD = 512


@dataclass
class World:
    """The training images and captions in memory, the same as shards on disk, and the evaluation prompts."""

    images: np.ndarray
    captions: list[str]
    shards: str  # brace pattern for --train_shards_path_or_url
    eval_prompts: list[str]
    prompts_file: Path


def build_world(path: Path, budget: "Budget", seed: int, log: Log) -> World:
    """Render the training scenes, write them as shards (once per size/seed), and the evaluation prompt file."""
    scenes = W.make_scenes(budget.n_train, seed)
    images = W.images_array(scenes)
    per_shard = min(PER_SHARD, budget.n_train)
    n_shards = -(-budget.n_train // per_shard)
    shard_dir = path / f"shards-n{budget.n_train}-seed{seed}"
    if not (shard_dir / f"{n_shards - 1:05d}.tar").exists():
        W.write_world_shards(shard_dir, scenes, per_shard)
    log(f"world: {budget.n_train} images 32x32 in {n_shards} shards at {shard_dir}")
    eval_prompts = [s.caption for s in W.make_scenes(budget.n_eval, seed + EVAL_SEED_OFFSET)]
    prompts_file = path / "eval_prompts.txt"
    prompts_file.write_text("\n".join(eval_prompts) + "\n")
    return World(images, [s.caption for s in scenes], f"{shard_dir}/{{00000..{n_shards - 1:05d}}}.tar", eval_prompts, prompts_file)


def train_teacher_stage(path: Path, world: World, budget: "Budget", seed: int, log: Log) -> dict[str, Any]:
    """Train the tiny SD teacher on the world and save it as a diffusers pipeline."""
    from .teacher import TeacherSpec, train_teacher

    spec = TeacherSpec(vae_steps=budget.vae_steps, unet_steps=budget.teacher_steps, batch_size=budget.teacher_batch)
    stats = train_teacher(path, world.images, world.captions, spec, seed, log)
    return {"spec": spec.__dict__, **stats}


@torch.no_grad()
def _reconstruct(vae: torch.nn.Module, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """`D(E(x))` with the teacher's VAE (posterior mean), images in [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) for x in pixels.split(batch)])


def train_classifier_stage(path: Path, world: World, teacher_dir: Path, budget: "Budget", seed: int, log: Log) -> dict[str, Any]:
    """Train the attribute classifier on the world's images and their VAE reconstructions; report held-out accuracy."""
    from diffusers import AutoencoderKL

    from .classifier import accuracy, labels_of, save_classifier, to_tensor, train_classifier

    vae = AutoencoderKL.from_pretrained(str(teacher_dir), subfolder="vae").eval()
    labels = labels_of([W.parse_caption(c) for c in world.captions])
    real = to_tensor(world.images)
    # Also the teacher VAE's reconstructions of the same images (same labels): samples can only be as sharp as the
    # decoder, and the classifier must read attributes in its (slightly blurred) rendering too.
    recon = _reconstruct(vae, real)
    pixels = torch.cat([real, recon])
    model = train_classifier(pixels, {k: torch.cat([v, v]) for k, v in labels.items()}, budget.classifier_steps, seed)
    rng = random.Random(seed + 1)
    attrs = [W.parse_caption(p) for p in world.eval_prompts]
    held = to_tensor(W.images_array([W.scene_for(a, rng) for a in attrs]))
    acc = {"real": accuracy(model, held, labels_of(attrs)), "vae": accuracy(model, _reconstruct(vae, held), labels_of(attrs))}
    save_classifier(model, path, {"held_out_accuracy": acc})
    log(f"classifier: held-out accuracy {json.dumps(acc)}")
    return {"held_out_accuracy": acc}


def distill_student(run_dir: Path, variant: str, flags: dict[str, Any], teacher_dir: Path, world: World,
                    budget: "Budget", seed: int, log: Log) -> None:
    """Distill with exactly the seed scripts' code path: `tcdistill.cli.train_main(variant, argv)`."""
    from ..cli import train_main

    argv = [
        f"--pretrained_teacher_model={teacher_dir}", f"--output_dir={run_dir}", f"--train_shards_path_or_url={world.shards}",
        "--resolution=32", f"--train_batch_size={budget.distill_batch}", f"--max_train_steps={budget.distill_steps}",
        f"--checkpointing_steps={budget.distill_steps}", "--checkpoints_total_limit=1", "--validation_steps=0",
        "--report_to=none", "--mixed_precision=no", "--dataloader_num_workers=0", f"--seed={seed}",
    ] + [f"--{k}={v}" for k, v in flags.items()]
    log(f"distilling {run_dir.name}: {variant} " + " ".join(argv[3:]))
    train_main(variant, argv, prog=f"tcdistill demo ({run_dir.name})")


def evaluate_all(teacher_dir: Path, clf_dir: Path, world: World, students: dict[str, dict[str, Any]], budget: "Budget",
                 seed: int, guidance_scale: float, log: Log, original_steps: int = 50) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`tcdistill eval`'s evaluator over the teacher and every student, with the world scorer."""
    from dataclasses import asdict

    from ..evaluate import EvalSettings, Evaluator, load_student, load_teacher, world_scorer

    torch.manual_seed(seed)
    pipe = load_teacher(str(teacher_dir))
    settings = EvalSettings(seed=seed, guidance_scale=guidance_scale, original_steps=original_steps)
    log(f"evaluating on {len(world.eval_prompts)} prompts: teacher {settings.reference_steps}-step guided DDIM reference (CFG {guidance_scale})")
    ev = Evaluator(pipe, world.eval_prompts, settings, {"world": world_scorer(str(clf_dir), world.eval_prompts, seed)})
    rows = ev.teacher_rows()
    for name, s in students.items():
        log(f"evaluating {name}")
        if s["variant"] == "lora":
            unet = load_student(pipe, lora=s["dir"])
        else:
            unet = load_student(pipe, unet=s["dir"])
        rows += ev.student_rows(name, unet, s["sampler"])
    return rows, {**asdict(settings), "prompts_file": str(world.prompts_file), "n_prompts": len(world.eval_prompts)}
