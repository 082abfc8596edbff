"""`tcdistill eval`: few-step quality of a distilled student against its teacher, at NFE k in {1, 2, 4, 8, 20}.

Teacher matching: latent RMSE between the student's k-step sample and the teacher's 50-step guided DDIM sample
from the same noise and prompt, next to the teacher's own guided DDIM at k steps. Distribution: with a demo
world classifier (`--classifier`), a Fréchet distance in its features against rendered world images plus prompt
fidelity (its attribute accuracy against the prompt); on real models FID against the teacher's reference (--reference_steps) images
and CLIP score through torchmetrics, when installed and its weights are local.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import atomic_file
from .argparsing import DefaultsHelpFormatter, OneLineParser
from .config import TORCH_SEEDS, check_not_single_file, check_seed, first_line
from .families import unet_family
from .prompts import sd_cond_uncond
from .generate import (CLIP_SKIP_HELP, LORA_HELP, PIPELINE_CLASSES, UNET_HELP, VAE_HELP, base_index, base_pipeline, check_unet_fits,
                       load_vae, read_prompts)
from .models import UNetDenoiser
from .preflight import check_output_dir
from .run_outputs import (check_run_model_here, local_output, resolve_unet_dir, run_cache_dir, run_config, run_guidance,
                          run_sampling, run_teacher, sampling_clip_skip)
from .sampler import sample_lcm, sample_tcd, tcd_timesteps
from .schedule import NoiseSchedule, zero_snr_top
from .teacher_checks import check_clip_skip
from .validation import sampling_hw

logger = logging.getLogger("tcdistill.eval")
Net = Callable[[Tensor, Tensor], Tensor]
DEFAULT_STEPS = (1, 2, 4, 8, 20)


# ------------------------------------------------------------------------- metrics
def latent_rmse(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample root-mean-square distance `sqrt(mean((a - b)^2))` over all latent elements, shape [N]."""
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Fréchet distance of Gaussians fit to two feature sets: `|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`."""
    a = torch.as_tensor(np.asarray(feats_a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(feats_b), dtype=torch.float64)
    mu = (a.mean(0) - b.mean(0)).pow(2).sum()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # C_a C_b is similar to a PSD matrix, so its eigenvalues are real and >= 0 up to rounding: the complex sqrt
    # of tiny negative ones adds (almost) nothing to the real part.
    tr_sqrt = torch.linalg.eigvals(ca @ cb).sqrt().real.sum()
    return float(mu + ca.trace() + cb.trace() - 2.0 * tr_sqrt)


# ------------------------------------------------------------------------- samplers as nets
def guided_net(unet: nn.Module, cond: Tensor, uncond: Tensor, guidance_scale: float) -> Net:
    """Teacher with classifier-free guidance: `out_u + g (out_c - out_u)` (CFG scale g = LCM-form w + 1)."""
    def net(x: Tensor, t: Tensor) -> Tensor:
        if guidance_scale == 1.0:
            return unet(x, t, encoder_hidden_states=cond).sample
        out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])).sample
        out_c, out_u = out.chunk(2)
        return out_u + guidance_scale * (out_c - out_u)
    return net


def student_net(unet: nn.Module, cond: Tensor, guidance_scale: float) -> Net:
    """A distilled student, one pass per step: a w-conditioned UNet gets `w = guidance_scale - 1` as `timestep_cond`."""
    denoiser = UNetDenoiser(unet, unet.config.get("time_cond_proj_dim"))
    w = torch.full((cond.shape[0],), guidance_scale - 1.0, device=cond.device)
    return lambda x, t: denoiser(x, t, {"encoder_hidden_states": cond}, w)


@torch.no_grad()
def sample_ddim(net: Net, x_T: Tensor, schedule: NoiseSchedule, timesteps: Tensor) -> Tensor:
    """Deterministic DDIM on `timesteps` (eta 0): each step jumps to `alpha_prev x0_hat + sigma_prev eps_hat` (TCD at gamma 0)."""
    return sample_tcd(net, x_T, schedule, timesteps, gamma=0.0)


# ------------------------------------------------------------------------- models
def check_sd_teacher(teacher: str, label: str = "--teacher") -> dict:
    """Refuse a teacher that is not an SD 1.x/2.x pipeline, from its model_index.json alone (before any weights load); the index.
    `label` names where the teacher came from (the run's record where no --teacher was given)."""
    index = base_index(teacher)
    name = index.get("_class_name")
    family = PIPELINE_CLASSES.get(name, ("", ""))[1]
    if family != "sd":  # an SD model saved from its img2img pipeline is one
        # Its sampler and metrics take SD's prompt states alone (no pooled prompt or SDXL size/crop ids).
        hint = "; sample an SDXL student with `tcdistill generate` instead" if family == "sdxl" else ""
        raise ValueError(f"{label} {teacher} is a {name}; `tcdistill eval` evaluates SD 1.x/2.x (StableDiffusionPipeline) "
                         f"teachers only{hint}")
    return index


def load_teacher(teacher: str, index: dict | None = None, vae: str | None = None, vae_cache_dir: str | None = None) -> Any:
    """The teacher as a diffusers StableDiffusionPipeline (local folder or hub id), fp32, eval mode (`index`: its
    model_index.json, where `check_sd_teacher` read it already), with the VAE `vae` (the run's, read through its
    `vae_cache_dir`) where given: every row's latents decode through the VAE the student was trained with."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    index = index or check_sd_teacher(teacher)
    kw = {"vae": load_vae(vae, torch.float32, UNet2DConditionModel.load_config(teacher, subfolder="unet")["in_channels"],
                          vae_cache_dir)} if vae else {}
    # fp32 explicitly: transformers 5 loads a text encoder in its stored dtype, so fp16 weights gave a half text encoder
    # next to an fp32 UNet and VAE (a dtype-mismatch traceback at the first prompt).
    pipe = base_pipeline(StableDiffusionPipeline, teacher, torch.float32, index, safety_checker=None, requires_safety_checker=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


def load_student(pipe: Any, unet: str | None = None, lora: str | None = None) -> nn.Module:
    """A full distilled UNet (`--unet`: the folder, or a training output holding unet_target/unet) or the teacher + a fused LoRA."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    if (unet is None) == (lora is None):
        raise ValueError("give exactly one of --unet or --lora")
    if unet is not None:
        student = UNet2DConditionModel.from_pretrained(resolve_unet_dir(unet)).eval().requires_grad_(False)
        if unet_family(student.config) == "sdxl":
            raise ValueError(f"--unet {unet} is an SDXL UNet; the teacher is an SD pipeline")
        check_unet_fits(student.config, pipe.unet.config, getattr(pipe, "name_or_path", None) or "the teacher", "--teacher")
        return student
    # The LoRA goes onto a copy, so the teacher's own UNet stays clean for the reference samples.
    student = copy.deepcopy(pipe.unet)
    view = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=student,
                                   scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    from .export import load_unet_lora

    load_unet_lora(view, lora, getattr(pipe, "name_or_path", None) or "the teacher", "--teacher")
    view.fuse_lora()
    return student.eval().requires_grad_(False)


# ------------------------------------------------------------------------- distribution scorers
class Scorer(Protocol):
    """Distribution / fidelity metrics of decoded images (uint8 [N, H, W, 3]) for the evaluator's prompts."""

    def __call__(self, images: np.ndarray) -> dict[str, float]: ...


@dataclass
class EvalSettings:
    """What to sample: the noise seed, guidance, step counts, gammas, reference length, training grid N, LCM scaling."""

    seed: int = 0
    guidance_scale: float = 3.0
    steps: Sequence[int] = DEFAULT_STEPS
    gammas: Sequence[float] = (0.0, 0.3)
    reference_steps: int = 50
    original_steps: int = 50
    batch_size: int = 128
    timestep_scaling: float = 10.0  # the LCM sampler's boundary scaling: the run's --timestep_scaling_factor
    device: str = "cpu"
    resolution: int | None = None  # the run's --resolution, sampled at `sampling_size`; None: the teacher UNet's sample_size
    clip_skip: int | None = None  # the run's --clip_skip: teacher and student prompt states (the "" too, as in training)


@dataclass
class Evaluator:
    """Fixed prompts and noise; the teacher's 50-step guided DDIM latents are the reference every row is measured to."""

    pipe: Any
    prompts: list[str]
    settings: EvalSettings = field(default_factory=EvalSettings)
    scorers: dict[str, Scorer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s, pipe = self.settings, self.pipe
        self.device = torch.device(s.device)
        pipe.to(self.device)
        # Training's schedule (DDPMScheduler over the teacher's scheduler config, as the families load it): the
        # pipeline's own class may differ at the ends (Euler puts 2**-24 where zero-SNR DDPM and TCDScheduler put 0).
        from .families import ddpm_schedule

        self.schedule = NoiseSchedule.from_scheduler(ddpm_schedule(pipe.scheduler.config)).to(self.device)
        for flag, n in (("--reference_steps", s.reference_steps), ("--original_steps", s.original_steps)):
            top = zero_snr_top(self.schedule, n)
            if top is not None:  # every row is measured against the reference: a NaN there made the whole table NaN
                raise ValueError(f"{flag} {n}: the teacher's schedule has zero SNR at t={top}, the top of that grid, but predicts "
                                 f"epsilon, which cannot give x0 there (NaN samples); choose a value that does not divide "
                                 f"{self.schedule.num_train_timesteps}, so the grid stops short of it")
        self.cond, self.uncond = sd_cond_uncond(pipe.tokenizer, pipe.text_encoder, self.prompts, self.device, s.clip_skip)
        # The student is measured where it trained: the run's size, not the teacher's sample_size when they differ.
        height, width = (side // pipe.vae_scale_factor for side in sampling_hw(s.resolution, pipe))
        # Noise drawn on the CPU: the same x_T whatever device samples from it.
        shape = (len(self.prompts), pipe.unet.config.in_channels, height, width)
        self.x_T = torch.randn(shape, generator=torch.Generator().manual_seed(s.seed)).to(self.device)
        self.reference = self._sample(lambda c, u: guided_net(pipe.unet, c, u, s.guidance_scale), "ddim", s.reference_steps, 0.0,
                                      grid=s.reference_steps)
        self.reference_images = self.decode(self.reference)

    def timesteps(self, k: int, grid: int | None = None) -> Tensor:
        """k timesteps of a skipping grid of `grid` points: the student's training N by default (TCDScheduler's
        original_inference_steps); the teacher's own DDIM rows use the reference's grid, whatever N the student had."""
        return tcd_timesteps(k, self.schedule.num_train_timesteps, grid or self.settings.original_steps)

    @torch.no_grad()
    def _sample(self, make_net: Callable[[Tensor, Tensor], Net], sampler: str, k: int, gamma: float, grid: int | None = None) -> Tensor:
        """Sample every prompt in batches; re-noising (gamma > 0, LCM) draws from a generator fixed by the seed."""
        gen = torch.Generator(self.device).manual_seed(self.settings.seed + 1)
        out = []
        bs = self.settings.batch_size
        for i in range(0, len(self.prompts), bs):
            net = make_net(self.cond[i:i + bs], self.uncond[i:i + bs])
            x_T, ts = self.x_T[i:i + bs], self.timesteps(k, grid)
            if sampler == "ddim":
                out.append(sample_ddim(net, x_T, self.schedule, ts))
            elif sampler == "tcd":
                out.append(sample_tcd(net, x_T, self.schedule, ts, gamma=gamma, generator=gen))
            elif sampler == "lcm":
                out.append(sample_lcm(net, x_T, self.schedule, ts, generator=gen, timestep_scaling=self.settings.timestep_scaling))
            else:
                raise ValueError(f"unknown sampler {sampler!r}")
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> np.ndarray:
        """Latents -> uint8 images [N, H, W, 3] through the teacher's VAE."""
        vae = self.pipe.vae
        imgs = [vae.decode(z / vae.config.scaling_factor).sample for z in latents.split(self.settings.batch_size)]
        x = torch.cat(imgs).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    def row(self, model: str, sampler: str, k: int, gamma: float | None, latents: Tensor) -> dict[str, Any]:
        """One table row: RMSE to the reference (mean and std over prompts) and every scorer's metrics."""
        d = latent_rmse(latents, self.reference)
        r: dict[str, Any] = {"model": model, "sampler": sampler, "steps": k, "gamma": gamma,
                             "rmse": float(d.mean()), "rmse_std": float(d.std()) if d.numel() > 1 else 0.0}
        images = self.decode(latents)
        for name, scorer in self.scorers.items():
            r.update({f"{name}_{k_}": v for k_, v in scorer(images).items()})
        r["_images"] = images  # for sample grids; dropped from JSON
        return r

    def teacher_rows(self) -> list[dict[str, Any]]:
        """The teacher's own guided DDIM at each k, and the 50-step reference itself (RMSE 0 by definition)."""
        s, unet = self.settings, self.pipe.unet
        rows = [self.row("teacher", "ddim", s.reference_steps, None, self.reference)]
        for k in s.steps:
            rows.append(self.row("teacher", "ddim", k, None,
                                 self._sample(lambda c, u: guided_net(unet, c, u, s.guidance_scale), "ddim", k, 0.0, grid=s.reference_steps)))
        return rows

    def student_rows(self, name: str, unet: nn.Module, sampler: str = "tcd") -> list[dict[str, Any]]:
        """A student at each k (and each gamma for TCD), one UNet pass per step, no CFG (w enters as an input if any)."""
        s = self.settings
        unet = unet.to(self.device)
        make = lambda c, u: student_net(unet, c, s.guidance_scale)  # noqa: E731
        gammas: Sequence[float | None] = s.gammas if sampler == "tcd" else [None]
        return [self.row(name, sampler, k, g, self._sample(make, sampler, k, g or 0.0)) for g in gammas for k in s.steps]


def world_scorer(classifier_dir: str, prompts: list[str], seed: int) -> Scorer:
    """Demo world: Fréchet distance of classifier features to rendered world images of the same prompts, and prompt fidelity."""
    import random

    from .demo.classifier import accuracy, labels_of, load_classifier, to_tensor
    from .demo.world import images_array, parse_caption, scene_for

    try:
        model = load_classifier(classifier_dir)
    except Exception as e:  # noqa: BLE001 - OSError, JSON errors, safetensors' SafetensorError (neither), a missing key
        # a cut-short classifier.safetensors was a SafetensorError traceback, a damaged classifier.json a bare parser line
        raise ValueError(f"--classifier {classifier_dir}: cannot load it ({type(e).__name__}: {first_line(e)}); pass the "
                         "classifier/ folder that `tcdistill demo` wrote") from None
    attrs = [parse_caption(p) for p in prompts]
    rng = random.Random(seed)
    real = to_tensor(images_array([scene_for(a, rng) for a in attrs]))
    with torch.no_grad():
        real_feats = model.features(real)
    labels = labels_of(attrs)

    def score(images: np.ndarray) -> dict[str, float]:
        x = to_tensor(images)
        with torch.no_grad():
            feats = model.features(x)
        acc = accuracy(model, x, labels)
        return {"fd": frechet_distance(feats, real_feats), "fidelity": acc["all"],
                **{f"acc_{k}": v for k, v in acc.items() if k != "all"}}
    return score


def torchmetrics_scorers(prompts: list[str], reference_images: np.ndarray, clip_model: str | None, fid: bool) -> dict[str, Scorer]:
    """FID (against the teacher's 50-step images) and CLIP score through torchmetrics, each only if it can run here."""
    scorers: dict[str, Scorer] = {}
    if not (fid or clip_model):
        return scorers
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        print("tcdistill eval: FID/CLIP score need torchmetrics (pip install 'torchmetrics[image,multimodal]'); skipping them.")
        return scorers
    ref = torch.from_numpy(reference_images).permute(0, 3, 1, 2)
    if fid:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            FrechetInceptionDistance(feature=2048)  # loads the Inception weights: fails here when they are not local

            def fid_score(images: np.ndarray) -> dict[str, float]:
                m = FrechetInceptionDistance(feature=2048)
                m.update(ref, real=True)
                m.update(torch.from_numpy(images).permute(0, 3, 1, 2), real=False)
                return {"fid": float(m.compute())}
            scorers["tm"] = fid_score
        except Exception as e:  # noqa: BLE001 - missing weights surface as OSError, URLError, RuntimeError...
            print(f"tcdistill eval: FID unavailable ({type(e).__name__}: {first_line(e)[:120]}); skipping it.")
    if clip_model:
        try:
            from torchmetrics.multimodal.clip_score import CLIPScore

            metric = CLIPScore(model_name_or_path=clip_model)

            def clip_score(images: np.ndarray) -> dict[str, float]:
                metric.reset()
                return {"clip_score": float(metric(torch.from_numpy(images).permute(0, 3, 1, 2), list(prompts)))}
            scorers["clip"] = clip_score
        except Exception as e:  # noqa: BLE001
            print(f"tcdistill eval: CLIP score unavailable ({type(e).__name__}: {first_line(e)[:120]}); skipping it.")
    return scorers


# ------------------------------------------------------------------------- output
METRIC_COLUMNS = ("rmse", "world_fd", "world_fidelity", "tm_fid", "clip_clip_score")


def json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the in-memory images."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one line per (model, sampler, gamma, steps), the metrics present in any row."""
    cols = [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
    head = "| model | sampler | gamma | steps | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (4 + len(cols))]
    for r in rows:
        g = "" if r["gamma"] is None else f"{r['gamma']:g}"
        vals = [f"{r[c]:.4f}" if c in r else "" for c in cols]
        lines.append(f"| {r['model']} | {r['sampler']} | {g} | {r['steps']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tcdistill eval", description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--teacher", help="Teacher: local diffusers folder or hub id (default: the teacher named in the run's "
                   "tcdistill_config.json next to --unet/--lora, at its --teacher_revision, from its --cache_dir where that is "
                   "on this machine).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--unet", help=UNET_HELP)
    g.add_argument("--lora", help=LORA_HELP)
    p.add_argument("--prompts", required=True, help="Text file, one prompt per line.")
    p.add_argument("--sampler", default=None, choices=["tcd", "lcm"],
                   help="Student sampler (default: the run's --distill_mode from its tcdistill_config.json, else tcd).")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS), help="NFE k to evaluate.")
    p.add_argument("--gamma", type=float, nargs="+", default=[0.0, 0.3], help="TCD gamma values (sampler eta).")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="Teacher CFG scale; full students get w = scale - 1 (default: 3, moved into the run's [--w_min, --w_max] range of w).")
    p.add_argument("--vae", help=VAE_HELP)
    p.add_argument("--clip_skip", type=int, default=None, help=CLIP_SKIP_HELP)
    p.add_argument("--reference_steps", type=int, default=50, help="Steps of the teacher's reference guided DDIM.")
    p.add_argument("--original_steps", type=int, default=None,
                   help="N of the training grid (TCDScheduler original_inference_steps; default: the run's --num_ddim_timesteps "
                        "from the tcdistill_config.json next to --unet/--lora, else 50).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the initial noise (and of re-noising).")
    p.add_argument("--batch_size", type=int, default=128, help="Prompts per sampling and VAE-decode batch (bounds memory).")
    p.add_argument("--classifier", help="Demo world classifier dir (from `tcdistill demo`): Fréchet distance and prompt fidelity.")
    p.add_argument("--fid", action="store_true", help="FID against the teacher's reference images (its --reference_steps guided DDIM; torchmetrics, local Inception weights).")
    p.add_argument("--clip_model", help="Local CLIP model for CLIP score (torchmetrics).")
    p.add_argument("--output", help="Write the rows as JSON here.")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    """`tcdistill eval [--teacher T] (--unet U | --lora L) --prompts FILE [...]`: print the table, optionally write JSON."""
    args = build_parser().parse_args(argv)
    try:  # the hub repo a pushed output went to, as for `tcdistill generate`
        args.unet, args.lora = local_output(args.unet), local_output(args.lora)
        # A run is sampled as it was trained (as `tcdistill generate` does): its grid, its mode, its LCM scaling, its w range.
        saved = run_config(args.unet or args.lora, args.lora is not None)
    except (FileNotFoundError, ValueError) as e:  # a damaged run record, an output a live training run holds
        sys.exit(f"tcdistill eval: error: {first_line(e)}")
    if args.guidance_scale is None:
        args.guidance_scale = run_guidance(saved, EvalSettings.guidance_scale)
    run = run_sampling(saved)
    if args.original_steps is None:
        args.original_steps = run["original_steps"]
    args.sampler = args.sampler or run["distill_mode"]
    for k in args.steps:
        if not 1 <= k <= min(args.original_steps, args.reference_steps):
            sys.exit(f"tcdistill eval: error: --steps {k} not in [1, {min(args.original_steps, args.reference_steps)}] "
                     "(at most --original_steps and --reference_steps)")
    if any(not 0.0 <= g <= 1.0 for g in args.gamma):
        sys.exit("tcdistill eval: error: --gamma values must be in [0, 1]")
    if args.batch_size < 1:
        sys.exit("tcdistill eval: error: --batch_size must be >= 1")
    if not np.isfinite(args.guidance_scale):  # nan/inf gave a table of NaN rows and exit 0
        sys.exit("tcdistill eval: error: --guidance_scale must be finite")
    if args.output and Path(args.output).is_dir():
        sys.exit(f"tcdistill eval: error: --output {args.output} is a directory (give the JSON file to write)")
    try:
        # x_T from --seed, re-noising from --seed + 1 (torch generators); an --output that cannot be written: both
        # found here, not after all the sampling.
        check_seed("--seed", args.seed, TORCH_SEEDS, count=2, uses="(the noise uses --seed, the re-noising --seed + 1)")
        if args.output:
            check_output_dir(str(Path(args.output).absolute().parent), flag="--output's folder")
        prompts = read_prompts(None, args.prompts, flag="--prompts")
        args.clip_skip = sampling_clip_skip(args.clip_skip, saved, args.lora)  # the run's unless given (0: none)
        # The run's teacher at the revision it was distilled from (`run_teacher`), as generate's --base: a --teacher given
        # loads as given (hub: main, from the default cache), and was the only way, so a LoRA was measured on another UNet.
        label = "--teacher"
        if not args.teacher:
            args.teacher, label = run_teacher(saved), "the run's teacher"  # a refusal names no flag the user did not pass
            check_run_model_here(args.teacher, "--teacher", "teacher")
        if not args.teacher:
            raise ValueError("--teacher is required (no tcdistill_config.json next to --unet/--lora names the teacher)")
        check_not_single_file(args.teacher, "--teacher")
        index = check_sd_teacher(args.teacher, label)  # first: an SDXL teacher's clip-skip range is not what to tell its user
        check_clip_skip(args.clip_skip, args.teacher, "sd")  # before the teacher's weights load (ConfigError: a ValueError)
        # The run's VAE (from its --cache_dir, as training loaded it) unless --vae is given, as `tcdistill generate` does.
        vae = args.vae or saved.get("pretrained_vae_model_name_or_path")
        if not args.vae:
            check_run_model_here(vae, "--vae", "VAE")
        check_not_single_file(vae, "--vae")
        pipe = load_teacher(args.teacher, index, vae, None if args.vae else run_cache_dir(saved))
        n_train = int(pipe.scheduler.config.num_train_timesteps)
        for flag, n in (("--original_steps", args.original_steps), ("--reference_steps", args.reference_steps)):
            if n > n_train:  # the grid's skip num_train_timesteps // n would be 0: every timestep -1
                raise ValueError(f"{flag} {n} exceeds the teacher's {n_train} training timesteps")
        student = load_student(pipe, args.unet, args.lora)
        settings = EvalSettings(seed=args.seed, guidance_scale=args.guidance_scale, steps=args.steps, gammas=args.gamma,
                                reference_steps=args.reference_steps, original_steps=args.original_steps, batch_size=args.batch_size,
                                timestep_scaling=run["timestep_scaling"], resolution=saved.get("resolution"), clip_skip=args.clip_skip)
        ev = Evaluator(pipe, prompts, settings)
        if args.classifier:
            ev.scorers["world"] = world_scorer(args.classifier, prompts, args.seed)
    except (ValueError, OSError) as e:  # missing/empty prompt file, teacher, student, classifier; a wrong family
        sys.exit(f"tcdistill eval: error: {first_line(e)}")
    ev.scorers.update(torchmetrics_scorers(prompts, ev.reference_images, args.clip_model, args.fid))
    rows = ev.teacher_rows() + ev.student_rows("lora" if args.lora else "unet", student, args.sampler)
    print(format_table(rows))
    if args.output:
        try:
            with atomic_file(args.output) as tmp:  # a full disk left an earlier JSON cut short, under a traceback
                tmp.write_text(json.dumps({"settings": vars(args), "rows": json_rows(rows)}, indent=1))
        except OSError as e:
            sys.exit(f"tcdistill eval: error: writing --output {args.output} failed ({type(e).__name__}: {first_line(e)}); "
                     "the table above is complete")
