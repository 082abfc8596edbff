"""One training loop for full and LoRA TCD distillation: `Trainer(cfg).train()` -> `train_step()`."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections import Counter
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoint import CheckpointError, CheckpointIO, atomic_file, restore_rng_state
from .config import FINAL_STEP, NUMPY_SEEDS, RUN_CONFIG, ConfigError, TrainConfig, check_seed, first_line, one_line
from .data import DataConfig, StreamTracker, build_train_dataloader, expand_urls
from .families import load_error, load_family
from .models import DTYPES, enable_gradient_checkpointing, enable_memory_efficient_attention, encode_latents, keep_channels_last, latent_normalization, speed_up_unets
from .preflight import check_environment, check_lr_schedule, check_process_count, check_shards, check_trackers, claim_output_dir
from .schedule import NoiseSchedule, ddim_grid
from .shard_failures import ShardFailureLog
from .stops import StepGuard, stop_on_signals
from .strategy import make_strategy
from .tcd import TCDLoss, draw_tcd
from .teacher_checks import check_teacher_config, check_teacher_schedule
from .timing import StepTimer

logger = logging.getLogger("tcdistill")

class Trainer(StepGuard):
    """Owns the accelerator, models, data, optimizer and checkpoints of one distillation run."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        tokenizers = self._check_inputs()
        self._set_up_run()
        self._load_models(tokenizers)
        self._set_up_unets()
        self._build_loss()
        self._build_optimizer()
        self.global_step = 0
        # Skipped samples: every process's (each step adds all ranks' pending ones), and this process's not yet added.
        self.skipped, self.pending_skips = Counter[str](), Counter[str]()
        self.timer = StepTimer(enabled=False)  # the benchmark turns it on
        self.nonfinite_streak = 0
        self.stream = StreamTracker()
        self.shard_log = ShardFailureLog(f"rank {self.accelerator.process_index}: " if self.accelerator.num_processes > 1 else "")
        self.stop_signal: int | None = None  # SIGTERM/SIGINT received by this process during train()
        self.stop_requested = False  # ... by any process, agreed in _finite_step so that every rank stops at one step

    def _check_inputs(self) -> dict[str, Any]:
        """The accelerator, then every refusal that needs no weights and makes no folder; returns the checked tokenizers."""
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

        cfg = self.cfg
        trackers = None if cfg.report_to == "none" else cfg.report_to
        check_trackers(cfg)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=cfg.mixed_precision,
            log_with=trackers,
            project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, cfg.logging_dir)),
            # Each process reads its own resampled shard stream, so the loader is never sharded or split by
            # accelerate; batch size is per device (split_batches=False set here, where accelerate >= 1.0 reads it).
            dataloader_config=DataLoaderConfiguration(split_batches=False),
        )
        acc = self.accelerator
        check_process_count(acc.num_processes)
        cfg.mixed_precision = acc.mixed_precision
        check_environment(cfg, acc.device)
        self.global_batch = cfg.train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps
        self.max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(cfg.max_train_samples / self.global_batch)
        self.lr = cfg.learning_rate * (self.global_batch if cfg.scale_lr else 1)
        check_lr_schedule(cfg.lr_scheduler, self.lr, cfg.lr_warmup_steps, self.max_train_steps)
        if cfg.seed is not None:  # set_seed(device_specific=True) seeds numpy on rank r with --seed + r
            check_seed("--seed", cfg.seed, NUMPY_SEEDS, count=acc.num_processes,
                       uses=f"with {acc.num_processes} processes (rank r seeds with --seed + r)")
        latents = cfg.train_latents_path_or_url  # wins over --train_shards_path_or_url
        check_shards(latents or cfg.train_shards_path_or_url, "--train_latents_path_or_url" if latents else "--train_shards_path_or_url")
        tokenizers = check_teacher_config(cfg)  # read once: the family load below keeps them
        check_teacher_schedule(cfg)
        if latents:  # the cache's record against the flags (its clip skip, resolution...): refused before the teacher loads
            from .data_cached import check_cache_record

            self.cache_sidecar = check_cache_record(cfg)
        self.ckpt = CheckpointIO(cfg.output_dir, cfg.checkpoints_total_limit, acc.is_main_process, acc.process_index, acc.num_processes)
        # A path that is no complete checkpoint: one line, before any weights load and before the output dir is made
        # (a mistyped path used to leave an empty --output_dir behind).
        self.ckpt.resolve(cfg.resume_from_checkpoint)
        return tokenizers

    def _set_up_run(self) -> None:
        """After the refusals: the output dir (its refusals, the hub repo, then the folder locked), logging, seeds, TF32,
        weight dtype."""
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        self.hub_repo_id = claim_output_dir(cfg, acc)  # the folder's refusals, then the hub repo, then the folder
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if acc.is_main_process else logging.WARNING)
        if cfg.seed is not None:
            set_seed(cfg.seed, device_specific=True)  # different noise per rank, reproducible per rank
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.weight_dtype = DTYPES.get(acc.mixed_precision, torch.float32)  # "no" -> fp32
        self.device = acc.device

    def _load_models(self, tokenizers: dict[str, Any]) -> None:
        """The teacher family (encoders on the device in the weight dtype), its noise schedule, and the student strategy."""
        cfg = self.cfg
        try:
            self.family = family = load_family(cfg, tokenizers)
        except (OSError, ValueError) as e:
            raise load_error(f"cannot load the teacher {cfg.pretrained_teacher_model!r}", e) from None
        if cfg.train_latents_path_or_url:
            from .data_cached import prepare_cached_training

            prepare_cached_training(cfg, family, self.cache_sidecar)  # checks the cache against the teacher; drops the VAE encoder
        self.schedule = NoiseSchedule.from_scheduler(family.noise_scheduler).to(self.device)
        self.latent_norm = latent_normalization(family.vae.config, family.name)  # SDXL VAEs with latents_mean/std
        # Frozen VAE and text encoder(s) in the weight dtype (SD 1.5's VAE encodes safely in fp16/bf16; an SDXL VAE that
        # sets force_upcast stays fp32 under fp16: pass the fp16-fix VAE with --pretrained_vae_model_name_or_path).
        family.to(self.device, self.weight_dtype)
        self.strategy = make_strategy(cfg, family, self.weight_dtype)
        self.strategy.to(self.device)
        w_val = cfg.validation_guidance_scale - 1.0
        if cfg.variant == "full" and cfg.validation_steps and self.accelerator.is_main_process and not cfg.w_min <= w_val <= cfg.w_max:
            logger.warning("--validation_guidance_scale %g embeds w = %g, outside the trained range [--w_min %g, --w_max %g]: "
                           "the validation images show a w the student never trained on.", cfg.validation_guidance_scale, w_val,
                           cfg.w_min, cfg.w_max)

    def _set_up_unets(self) -> None:
        """Gradient checkpointing in the student; xformers, channels_last and torch.compile in every distinct UNet."""
        cfg = self.cfg
        student = self.strategy.student
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(student, cfg.gradient_checkpointing_policy)
            if cfg.gradient_checkpointing_policy == "selective" and self.device.type == "cuda" and not cfg.compile_unet:
                logger.warning("--gradient_checkpointing_policy selective runs a Python policy on every op in eager mode "
                               "(H100, SD 1.5: student forward 3.3x slower); pair it with --compile_unet, or use 'full'.")
        unets = {id(m): m for m in (student, self.strategy.target_unet, self.strategy.teacher_unet) if m is not None}
        if cfg.enable_xformers_memory_efficient_attention:
            for m in unets.values():
                enable_memory_efficient_attention(m)
        if cfg.channels_last or cfg.compile_unet:
            speed_up_unets(unets.values(), cfg)
        # CUDA-graph modes: each micro-batch starts a new graph iteration (outputs of the last one may be reused).
        self.cudagraphs = cfg.compile_unet and cfg.compile_mode in ("reduce-overhead", "max-autotune")

    def _build_loss(self) -> None:
        """The DDIM grid (skip k) and the TCD loss on the teacher's schedule."""
        cfg = self.cfg
        self.num_ddim = cfg.num_ddim_timesteps
        self.grid = ddim_grid(self.schedule.num_train_timesteps, self.num_ddim).to(self.device)
        self.k = int(self.grid[0]) + 1  # the skip: grid[0] = k - 1
        self.loss_fn = TCDLoss(
            self.schedule, cfg.loss_type, cfg.huber_c, mode=cfg.distill_mode, w_cond_student=self.strategy.w_cond_student,
            batched_teacher=cfg.batched_teacher, skip_identity_target=cfg.skip_identity_target,
            static_shapes=cfg.compile_unet,  # a varying target batch would recompile the compiled UNets
            timestep_scaling=cfg.timestep_scaling_factor,
        )

    def _build_optimizer(self) -> None:
        """Optimizer and LR schedule (run length and learning rate: _check_inputs); then the student and optimizer prepared by accelerate."""
        from diffusers.optimization import get_scheduler

        cfg, acc = self.cfg, self.accelerator
        self.optimizer = self._make_optimizer(self.strategy.trainable_parameters(), self.lr)
        # Stepped once per optimizer step on every rank (not prepared, so accelerate does not multiply steps); its
        # refusals came in check_lr_schedule, before the weights loaded.
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=self.max_train_steps)
        self.student, self.optimizer = acc.prepare(self.strategy.student, self.optimizer)

    def _make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """AdamW (fused on CUDA and CPU unless --no_fused_adam) or bitsandbytes' 8-bit AdamW."""
        c = self.cfg
        kw = dict(lr=lr, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
        if c.use_8bit_adam:
            import bitsandbytes as bnb

            return keep_channels_last(bnb.optim.AdamW8bit(params, **kw), c.channels_last)
        return torch.optim.AdamW(params, fused=c.fused_adam and self.device.type in ("cuda", "cpu"), **kw)

    # ------------------------------------------------------------------ state
    def _data_seed(self) -> int | None:
        """--seed; without one, this rank's stream seed is drawn once and kept in its checkpoints (a resume then reads
        the same stream from the saved position instead of a new stream at an unrelated one)."""
        if self.cfg.seed is not None:
            return self.cfg.seed
        if self.stream.base_seed is None:
            self.stream.base_seed = secrets.randbits(62)
        return self.stream.base_seed

    def data_loader(self) -> Any:
        c = self.cfg
        if self.global_step and self.stream.num_workers != max(1, c.dataloader_num_workers) and self.accelerator.is_main_process:
            logger.warning("The checkpoint's data stream was read by %d loader worker(s), this run uses %d: "
                           "the shard stream starts fresh instead of continuing exactly.", self.stream.num_workers, c.dataloader_num_workers)
        ws = self.accelerator.num_processes
        if self.global_step and self.stream.world_size not in (None, ws) and self.accelerator.is_main_process:
            logger.warning("The checkpoint's data streams were read by %d process(es), this run has %d: each rank's shard "
                           "stream starts fresh instead of continuing exactly.", self.stream.world_size, ws)
        dcfg = DataConfig(
            train_shards_path_or_url=c.train_latents_path_or_url or c.train_shards_path_or_url, resolution=c.resolution, interpolation_type=c.interpolation_type,
            center_crop=c.center_crop, random_flip=c.random_flip, train_batch_size=c.train_batch_size,
            dataloader_num_workers=c.dataloader_num_workers, proportion_empty_prompts=c.proportion_empty_prompts,
            seed=self._data_seed(), rank=self.accelerator.process_index, world_size=self.accelerator.num_processes,
            failure_patience=c.data_failure_patience, stall_timeout=c.data_timeout,
            min_image_size=c.min_image_size, max_pwatermark=c.max_pwatermark,
            # A resumed run continues the shard stream exactly where its checkpoint left it.
            resume_state=self.stream.state() if self.global_step else None,
        )
        self.stream.world_size = self.accelerator.num_processes
        n_shards, streams = len(expand_urls(dcfg.train_shards_path_or_url)), ws * max(1, c.dataloader_num_workers)
        if n_shards < streams and self.accelerator.is_main_process:
            logger.warning("%d shard(s) for %d process(es) x %d loader worker(s): streams that share a shard read it through "
                           "small shuffles of its same stretch, so their batches overlap; use at least %d shards.", n_shards, ws,
                           max(1, c.dataloader_num_workers), streams)
        if c.train_latents_path_or_url:
            from .data_cached import build_cached_dataloader

            return build_cached_dataloader(dcfg)
        return build_train_dataloader(dcfg)

    def save_checkpoint(self) -> None:
        """Every rank calls this; the main process publishes `checkpoint-<step>` atomically."""
        states = {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "progress": {"global_step": self.global_step, "skipped": dict(self.skipped)},
        }
        self.ckpt.save(self.global_step, tensors=self.strategy.state_tensors(), states=states,
                       meta={"variant": self.cfg.variant, "config": self.cfg.to_dict(redact=True)}, barrier=self.accelerator.wait_for_everyone,
                       rank_extra={"data": self.stream.state()})

    def maybe_resume(self) -> dict | None:
        """Restore weights, EMA target, optimizer, LR schedule, data position and step from `--resume_from_checkpoint`.

        Returns this rank's RNG state for the caller to restore *after* it builds the data iterator (creating a
        DataLoader iterator draws from torch's RNG, which the uninterrupted run did before its first step).
        """
        # "latest": the newest checkpoint that loads (one whose files are intact in size but unreadable is skipped).
        ck = self.ckpt.load_resume(self.cfg.resume_from_checkpoint)
        if ck is None:
            if self.cfg.resume_from_checkpoint:
                logger.info("No complete checkpoint in %s; starting a new run.", self.cfg.output_dir)
            elif (old := self.ckpt.latest()) is not None and self.accelerator.is_main_process:
                # An earlier run's checkpoints stay until this run overwrites each step: `latest` would pick the
                # earlier run's newest one (and its outputs and metrics.jsonl would mix with this run's) without a word.
                logger.warning("%s already holds checkpoints of an earlier run (newest: %s); without --resume_from_checkpoint "
                               "this run starts over and replaces them step by step, and until then "
                               "--resume_from_checkpoint latest picks the earlier run's. Pass --resume_from_checkpoint "
                               "latest to continue it, or use another --output_dir.", self.cfg.output_dir, old)
            return None
        path = ck.path
        saved = {"variant": ck.meta.get("variant"), "model_family": ck.meta.get("config", {}).get("model_family")}
        for key, value in saved.items():  # a LoRA run's checkpoints are no start for a full run, nor SD's for SDXL
            if value is not None and value != getattr(self.cfg, key):
                raise CheckpointError(f"cannot resume from {str(path)!r}: it was saved by a {key} {value!r} run; "
                                      f"this run trains {key} {getattr(self.cfg, key)!r} (use another --output_dir).")
        hyper = ("initial_lr", "betas", "eps", "weight_decay")  # what this run's flags set (initial_lr: after --scale_lr)
        asked = [{k: g.get(k) for k in hyper} for g in self.optimizer.param_groups]
        try:
            self.strategy.load_state_tensors(ck.tensors)
            self.optimizer.load_state_dict(ck.states["optimizer"])
            self.lr_scheduler.load_state_dict(ck.states["lr_scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
            first = next((ln for ln in lines if "mismatch" in ln or ln.startswith(("Missing", "Unexpected"))), lines[0])[:300]
            raise CheckpointError(f"cannot resume from {str(path)!r}: it does not match this run's model or flags "
                                  f"({type(e).__name__}: {first})") from e
        # The optimizer state brings its hyper-parameters (and the LR schedule its base LR): flags that set them to
        # other values are not applied to a resumed run; say so instead of dropping them silently.
        norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        kept = {k: (g.get(k), a[k]) for g, a in zip(self.optimizer.param_groups, asked) for k in hyper if norm(g.get(k)) != norm(a[k])}
        if kept and self.accelerator.is_main_process:
            logger.warning("Resumed with the optimizer settings of %s, not this run's --learning_rate/--scale_lr/--adam_* flags: %s "
                           "(use another --output_dir to train with new ones).", path,
                           ", ".join(f"{k} {old} (flags: {new})" for k, (old, new) in kept.items()))
        if (changed := self.cfg.changed_since(ck.meta.get("config", {}))) and self.accelerator.is_main_process:
            logger.warning("Resuming %s with flags other than the run that saved it: %s. The run trains on with these; use "
                           "another --output_dir to start one with them.", path, ", ".join(changed))
        self.global_step = int(ck.states["progress"]["global_step"])
        self.skipped.update(ck.states["progress"].get("skipped", {}))
        newer = [p for s, p in self.ckpt.complete() if s > self.global_step]
        if newer and str(self.cfg.resume_from_checkpoint) != "latest" and self.accelerator.is_main_process:
            # Resumed from an earlier checkpoint than the newest: the newer ones, of the run this one branches from, stay
            # until this run saves their steps again, and a stop before then had `latest` (the seed command's) pick them.
            logger.warning("Resuming %s, but %s holds newer checkpoints of the run it branches from (newest: %s): "
                           "--resume_from_checkpoint latest picks them until this run saves their steps again (move them "
                           "out of --output_dir for a stop to resume this run).", path, self.cfg.output_dir, newer[-1])
        if ck.rng is not None:
            if "data" in ck.rng.get("extra", {}):
                self.stream = StreamTracker(ck.rng["extra"]["data"])
        else:
            logger.warning("%s has no state for rank %d (fewer processes saved it): data and RNG streams start fresh.",
                           path, self.accelerator.process_index)
        logger.info("Resumed from %s at step %d.", path, self.global_step)
        return ck.rng

    def _log_step(self, loss_sum: float, sps: float) -> None:
        """The step's loss, LR, throughput and data-skip counts to the trackers and (main process) metrics.jsonl."""
        logs = {"loss": loss_sum, "lr": self.lr_scheduler.get_last_lr()[0], "samples_per_s": sps}
        logs.update({f"data/skipped_{k}": v for k, v in self.skipped.items()})
        self.accelerator.log(logs, step=self.global_step)
        if not self.accelerator.is_main_process:
            return
        # A plain per-step record next to the trackers: survives kills line by line, easy to diff/plot.
        try:
            with open(os.path.join(self.cfg.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.global_step, **logs}) + "\n")
        except OSError as e:  # disk full, read-only: like a failed checkpoint save, training goes on
            logger.error("step %d: writing metrics.jsonl failed (%s)", self.global_step, one_line(e))

    # ------------------------------------------------------------------ step
    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Encode a batch, draw (t, t_n, s, w, eps) and return the TCD loss of the student."""
        timer = self.timer
        if "latents" in batch:  # cached shards (`tcdistill cache`): VAE posterior and prompt embeddings precomputed
            from .data_cached import cached_inputs

            with timer.section("vae"):
                x0, cond, uncond = cached_inputs(batch, self.device)
        else:
            with timer.section("vae"):
                pixels = batch["pixel_values"].to(self.device, non_blocking=True)
                x0 = encode_latents(self.family.vae, pixels, self.cfg.vae_encode_batch_size, self.latent_norm)
            with timer.section("text_encoder"):
                cond = self.family.encode(batch, self.device)
                uncond = self.family.uncond(batch, self.device)
        draw = draw_tcd(x0, self.grid, self.k, self.cfg.w_min, self.cfg.w_max, mode=self.cfg.distill_mode)
        student, target, teacher = self.strategy.denoisers(self.student)
        student, target, teacher = timer.wrap("student_forward", student), timer.wrap("target", target), timer.wrap("teacher", teacher)
        with self.accelerator.autocast():
            return self.loss_fn(student, target, teacher, x0, cond, uncond, draw)

    def optimizer_step(self, data: Iterator[dict[str, Any]]) -> tuple[float, int, bool]:
        """One optimizer step over `gradient_accumulation_steps` batches of `data` (then LR schedule, EMA, step count).

        Returns (mean loss, samples seen by all processes, whether the step was applied); the benchmark calls it too.
        """
        acc, cfg = self.accelerator, self.cfg
        self.student.train()
        loss_sum: float | None = None
        loss_dev, samples, step_ok = torch.zeros((), device=self.device), 0, True
        for _ in range(cfg.gradient_accumulation_steps):
            with self.timer.section("data"):
                batch = next(data)
            if "stream_pos" in batch:
                self.stream.consumed(batch)
            self.pending_skips.update(batch.get("skipped", {}))
            self.shard_log.report(batch.get("failed_shards", ()))
            with acc.accumulate(self.student):
                if self.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                loss, stats = self.train_step(batch)
                with self.timer.section("student_backward"):
                    acc.backward(loss)
                loss_dev = loss_dev + loss.detach().float() / cfg.gradient_accumulation_steps  # on the device: no sync
                samples += len(batch["captions"]) * acc.num_processes
                with self.timer.section("optimizer"):
                    step_ok = True
                    if acc.sync_gradients:
                        loss_sum, step_ok = self._finite_step(loss_dev)
                    if step_ok:
                        self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
        if step_ok:
            self.lr_scheduler.step()
            with self.timer.section("ema"):
                self.strategy.after_optimizer_step()
            self.global_step += 1
        return loss_dev.item() if loss_sum is None else loss_sum, samples, step_ok

    def train(self) -> None:
        """Run until `max_train_steps`, checkpointing, validating and logging along the way."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        rng = self.maybe_resume()
        remaining = self.max_train_steps - self.global_step
        if remaining < 0:  # training on would overwrite the outputs with weights from past the asked-for length
            raise CheckpointError(f"the resumed checkpoint is at step {self.global_step}, past --max_train_steps "
                                  f"{self.max_train_steps}: raise --max_train_steps, or resume from an earlier checkpoint.")
        if acc.is_main_process:  # after the resume, so a refused one leaves the previous run's record as it was
            try:
                self._write_run_record(None)  # no final weights yet: those in the folder, if any, are an earlier run's
            except OSError as e:  # a disk an earlier run left full passes check_output_dir's empty probe file
                raise ConfigError(f"--output_dir {cfg.output_dir!r}: writing {RUN_CONFIG} failed "
                                  f"({type(e).__name__}: {first_line(e)})") from None
            acc.init_trackers(cfg.tracker_project_name, config={k: v for k, v in cfg.to_dict(redact=True).items() if isinstance(v, (int, float, str, bool))})
        data = iter(self.data_loader())
        if rng is not None:
            restore_rng_state(rng)
        logger.info("Training %s for %d more steps (global batch %d, %d process(es)).", cfg.variant, remaining, self.global_batch, acc.num_processes)
        bar = tqdm(total=self.max_train_steps, initial=self.global_step, disable=not acc.is_local_main_process, desc="steps")
        t_last, samples = time.perf_counter(), 0
        try:
            # A preemption's SIGTERM or a Ctrl-C ends the run at the end of the step, after a checkpoint; from the final
            # save on, a signal acts as it did before (the final outputs are written atomically).
            with stop_on_signals(self._on_signal):
                while self.global_step < self.max_train_steps:
                    if self.stop_requested:
                        self._stop_for_signal()
                    loss_sum, n, step_ok = self.optimizer_step(data)
                    samples += n
                    if not step_ok:
                        continue
                    sps = samples / max(time.perf_counter() - t_last, 1e-9)
                    samples = 0
                    self._log_step(loss_sum, sps)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum:.4g}", samples_s=f"{sps:.2f}")
                    if self.global_step % cfg.checkpointing_steps == 0 or self.global_step == self.max_train_steps:
                        self._try_checkpoint()
                    # Not on a stopping run's last step: validation (a minute and more for SDXL) would come before the
                    # save, in the grace time a preemption's SIGTERM leaves (torchrun SIGKILLs 30 s after forwarding it).
                    if cfg.validation_steps and self.global_step % cfg.validation_steps == 0 and acc.is_main_process and not self.stop_requested:
                        self.validate()
                    # The next step's throughput is its own: this step's save and validation (a minute for SDXL) are not in it.
                    t_last = time.perf_counter()
        finally:
            bar.close()  # before any error message, so the message is the last line
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._finish()
        acc.end_training()

    def _write_run_record(self, final_step: int | None) -> None:
        """The run's flags and the step of its final weights (`FINAL_STEP`) to `RUN_CONFIG`, whole or not at all: a full
        disk or a kill mid-write cut a finished run's record short (generate failed). Published: no hub token."""
        with atomic_file(os.path.join(self.cfg.output_dir, RUN_CONFIG)) as tmp, open(tmp, "w") as f:
            json.dump({**self.cfg.to_dict(redact=True), FINAL_STEP: final_step}, f, indent=2)

    def _finish(self) -> None:
        """Main process, after the last step: the final outputs, the model card and the hub push, each failure one line."""
        cfg = self.cfg
        try:
            paths = self.strategy.save_outputs(cfg.output_dir)
        except Exception as e:  # disk full, read-only dir: one line naming what survives, not a traceback
            raise CheckpointError(f"saving the final model to {cfg.output_dir!r} failed ({one_line(e)}); "
                                  f"newest checkpoint: {self.ckpt.latest() or 'none'}") from e
        logger.info("Saved %s", ", ".join(paths))
        try:
            self._write_run_record(self.global_step)  # the weights are this run's now
        except OSError as e:
            raise CheckpointError(f"writing {RUN_CONFIG} to {cfg.output_dir!r} failed ({type(e).__name__}: {first_line(e)}); "
                                  "the trained weights are saved, but generate/eval/export refuse them until a resume "
                                  "(--resume_from_checkpoint latest) writes it") from e
        from .modelcard import push_to_hub, write_model_card

        schedule = self.family.noise_scheduler.config  # the card's usage code samples on the trained schedule
        try:
            logger.info("Model card: %s", write_model_card(cfg, paths, schedule=schedule))
        except OSError as e:  # disk full after the weights: one line, as for a failed final save
            raise CheckpointError(f"writing the model card to {cfg.output_dir!r} failed ({type(e).__name__}: "
                                  f"{first_line(e)}); the trained weights are saved: {', '.join(paths)}") from e
        if cfg.push_to_hub:
            try:
                logger.info("Pushed %s to the hub repo %s", cfg.output_dir, push_to_hub(cfg, paths, self.hub_repo_id, schedule))
            except Exception as e:  # noqa: BLE001 - network/auth errors: one line; the outputs are on disk
                raise CheckpointError(f"--push_to_hub: uploading {cfg.output_dir!r} failed ({one_line(e, 300)}); "
                                      f"the trained outputs are saved there") from e
        if self.skipped:
            logger.warning("Skipped samples by kind: %s", dict(self.skipped))
        self.shard_log.summary()

    def validate(self) -> None:
        """TCD samples at the configured step counts for each student view, to disk and every tracker; images that
        cannot be written (disk full, read-only output dir) are logged and training goes on, as for a checkpoint."""
        from .validation import run_validation

        try:
            run_validation(self, self.global_step)
        except OSError as e:
            logger.error("step %d: validation could not write its images (%s); training goes on.", self.global_step, one_line(e))
