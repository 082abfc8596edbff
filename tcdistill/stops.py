"""Stopping a run on SIGTERM (a SLURM preemption, `kill`) or SIGINT (Ctrl-C) at a step boundary, after a checkpoint,
instead of losing every step since the last periodic one; and the step guard that skips non-finite steps and stops
after too many in a row (`StepGuard`, a base of the Trainer)."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn

import torch

from .checkpoint import CheckpointError, CheckpointIO
from .config import TrainConfig, first_line

logger = logging.getLogger("tcdistill")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Interrupted(RuntimeError):
    """SIGTERM (a SLURM preemption, `kill`) or SIGINT (Ctrl-C) stopped the run after saving a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def peer_failure(e: BaseException) -> str | None:
    """The one-line error of a process whose collective (DDP's gradient all-reduce, the step guard's reduce, a barrier)
    broke because another process of the run ended, else None. That process has printed its own error (a bad shard
    only it reads, say); this one printed a gloo traceback ("Connection closed by peer") after it, which read as the
    cause. Recognised by gloo's transport errors (the CPU backend's); any other error keeps its traceback."""
    text = first_line(e)
    if "gloo/transport/" not in text:
        return None
    import torch.distributed as dist

    rank = f"process {dist.get_rank()}" if dist.is_available() and dist.is_initialized() else "this process"
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]  # without gloo's source location and its advice
    return f"{rank} stops: another process of this run ended (its own error names the cause), which broke the collective ({detail})."


# Why a loader worker died, by the signal torch names ("is killed by signal: <strsignal>"); unknown: both likely causes.
_WORKER_DEATHS = {
    "Killed": "a worker the kernel kills is most often out of memory: lower --dataloader_num_workers",
    "Terminated": "a SIGTERM sent to the whole process group (SLURM's, torchrun's, `kill -- -PGID`) ends the loader workers before the "
                  "trainer can save: send it to the trainer process only, which saves and stops after its step",
}
_WORKER_DEATH = "out of memory (lower --dataloader_num_workers), or a SIGTERM to the whole process group (send it to the trainer only)"


def loader_worker_death(e: BaseException) -> str | None:
    """The one-line error of a run one of whose DataLoader worker processes died, else None. torch raises it as "DataLoader
    worker (pid N) is killed by signal: Killed." from its SIGCHLD handler, wherever the trainer is (the traceback ended in
    an unrelated conv2d), or as "DataLoader worker (pid(s) N) exited unexpectedly" from the next batch's wait."""
    text = first_line(e)
    if not text.startswith("DataLoader worker (pid"):
        return None
    text = text.rstrip(". ")
    why = next((hint for name, hint in _WORKER_DEATHS.items() if text.endswith(f"by signal: {name}")), f"most often {_WORKER_DEATH}")
    return f"a data loader worker process ended ({text}): {why}; --resume_from_checkpoint latest continues from the newest checkpoint."


@contextlib.contextmanager
def stop_on_signals(record: Callable[[int], None]) -> Iterator[None]:
    """In this block SIGTERM and SIGINT call `record(signum)` instead of ending the process, each once: a second one
    acts as before (Ctrl-C twice stops at once). A signal the process was started ignoring (SIGINT in a shell script's
    background job) stays ignored. When the block raises, the first SIGTERM after it is absorbed (see below), also in a
    caller that goes on. Outside the main thread, where signal handlers cannot be set, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: h for s in STOP_SIGNALS if (h := signal.getsignal(s)) is not signal.SIG_IGN}
    received: set[int] = set()

    def give_back(signum: int, frame: Any = None) -> None:
        signal.signal(signum, previous[signum] if previous[signum] is not None else signal.SIG_DFL)

    def handler(signum: int, frame: Any) -> None:
        give_back(signum)
        received.add(signum)
        record(signum)

    for s in previous:
        signal.signal(s, handler)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for s in previous:
            give_back(s)
        if failed and signal.SIGTERM in previous and signal.SIGTERM not in received:
            # The run ends on an error it is about to report in one line. Under torchrun, the process whose error ended
            # the run gets this one SIGTERMed now, and the default action ended it before its line (2 CPU processes on a
            # loaded machine, 2 runs in 12): the first SIGTERM until the exit is absorbed, a second acts as before.
            signal.signal(signal.SIGTERM, give_back)


def leave_ctrl_c_to_the_trainer(worker_id: int) -> None:
    """Loader `worker_init_fn`: Ctrl-C signals the whole process group, and torch's worker loop exits on KeyboardInterrupt,
    which would fail the step the trainer finishes before its checkpoint. SIGTERM is left alone: torch and
    multiprocessing shut workers down with it. A handler, not SIG_IGN, which `pipe:` commands would inherit."""
    signal.signal(signal.SIGINT, lambda signum, frame: None)


def weight_groups(strategy: Any, family: Any) -> list[tuple[str, Iterable[tuple[str, torch.Tensor]]]]:
    """(what, named weights) of a run for `first_nonfinite_weight`: teacher, trained weights, EMA target."""
    # The frozen teacher first: the full student starts as its copy, so a damaged teacher is named as such.
    encoders = [(f"teacher {n}'s", getattr(family, n).named_parameters()) for n in ("text_encoder", "text_encoder_2", "vae")
                if getattr(family, n, None) is not None]
    teacher = [(n, p) for n, p in strategy.teacher_unet.named_parameters() if not p.requires_grad]
    trained = [(n, p) for n, p in strategy.student.named_parameters() if p.requires_grad]
    target = [("EMA target UNet's", strategy.target.named_parameters())] if isinstance(getattr(strategy, "target", None), torch.nn.Module) else []
    return [("teacher UNet's", teacher), *encoders, ("trained student's", trained), *target]


def first_nonfinite_weight(groups: Iterable[tuple[str, Iterable[tuple[str, torch.Tensor]]]]) -> str | None:
    """`what weight 'name'` of the first floating-point weight holding NaN/inf among `groups`, else None."""
    for what, named in groups:
        for name, t in named:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{what} weight {name!r}"
    return None


def nonfinite_stop_message(streak: int, step: int, applied_step: int, checkpoints: list[tuple[int, Path]], bad_weight: str | None) -> str:
    """The step guard's one-line stop: which weights are non-finite, and which checkpoint is worth resuming."""
    # A checkpoint saved at `applied_step` holds the very weights the failing steps started from (an exploded learning
    # rate's, or a resumed damaged one), and a resume keeps its learning rate: it is not called "last good".
    text = f"{streak} consecutive non-finite steps at step {step}; stopping."
    if bad_weight:
        text += f" The {bad_weight} holds non-finite values."
    at = [path for saved, path in checkpoints if saved == applied_step]
    before = [path for saved, path in checkpoints if saved < applied_step]
    if at:
        older = f"an earlier one: {before[-1]}" if before else "no earlier one is left"
        text += f" The checkpoint {at[0]} holds the weights these steps started from, so resuming it may fail alike ({older})."
    else:
        text += f" Last good checkpoint: {before[-1]}." if before else " No checkpoint saved before it."
    if bad_weight and bad_weight.startswith("teacher"):
        return text + " The teacher's files are damaged: repair or re-download --pretrained_teacher_model."
    return text + (" Lower --learning_rate in a new --output_dir (a resume keeps its checkpoint's learning rate), or check "
                   "the data and --mixed_precision.")


class StepGuard:
    """The Trainer's step guard and stop handling: skip non-finite steps (stop after too many in a row), and on a
    SIGTERM/SIGINT to any process save and stop every rank at the same step."""

    # Set by the Trainer.
    accelerator: Any
    cfg: TrainConfig
    ckpt: CheckpointIO
    strategy: Any
    family: Any
    global_step: int
    skipped: Counter[str]
    pending_skips: Counter[str]
    nonfinite_streak: int
    stop_signal: int | None
    stop_requested: bool
    save_checkpoint: Callable[[], None]

    def _finite_step(self, loss: torch.Tensor) -> tuple[float, bool]:
        """Decide, identically on every rank, whether to apply this step; stop after too many bad ones in a row.

        `loss` is this rank's step loss on the device. Gradients are already all-reduced here, so their norm is the
        same on every rank; the loss and the non-finite-loss flag are averaged over ranks. The loss, the flag and the norm's
        finiteness come to the host in one transfer, not four syncs (each sync stalls the host until the GPU
        drains, and the GPU step is host-bound). Under fp16 an overflowing gradient is the GradScaler's business
        (it skips and lowers the scale). The same collective and transfer carry whether any rank received a stop
        signal (`stop_requested`), so that all ranks save and stop after the same step. Returns (loss value, apply the step).
        """
        acc = self.accelerator
        grad_norm = acc.clip_grad_norm_(self.strategy.trainable_parameters(), self.cfg.max_grad_norm)
        loss = loss.reshape(()).float()
        bad = (~torch.isfinite(loss)).float()
        stop, skips = (torch.full((), float(v), device=loss.device) for v in (self.stop_signal is not None, bool(self.pending_skips)))
        if acc.num_processes > 1:  # one collective: the loss of the global batch (not rank 0's share), and any bad rank
            loss, bad, stop, skips = acc.reduce(torch.stack([loss, bad, stop, skips]), reduction="mean").unbind()
        norm_ok = torch.isfinite(torch.as_tensor(grad_norm, device=loss.device).float()) if grad_norm is not None else torch.ones((), device=loss.device)
        loss_value, n_bad, grad_ok, stops, any_skips = torch.stack([loss, bad.reshape(()), norm_ok.reshape(()).float(), stop, skips]).tolist()
        if any_skips:  # a rank skipped samples: every rank counts every rank's (rank 0 logs and saves the counts)
            from accelerate.utils import gather_object

            for counts in gather_object([dict(self.pending_skips)]) if acc.num_processes > 1 else [self.pending_skips]:
                self.skipped.update(counts)
            self.pending_skips.clear()
        self.stop_requested = stops > 0
        if n_bad == 0 and (grad_ok or acc.mixed_precision == "fp16"):
            self.nonfinite_streak = 0
            return loss_value, True
        self.nonfinite_streak += 1
        self.skipped["nonfinite_step"] += 1
        if acc.is_main_process:  # every rank decides the same: one line per skipped step, not one per rank
            logger.warning("step %d: non-finite %s; step skipped (%d in a row, limit %d).", self.global_step + 1,
                           "loss" if n_bad else "gradient", self.nonfinite_streak, self.cfg.max_nonfinite_steps)
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(nonfinite_stop_message(self.nonfinite_streak, self.global_step + 1, self.global_step,
                                                        self.ckpt.complete(), first_nonfinite_weight(weight_groups(self.strategy, self.family))))
        return loss_value, False

    def _try_checkpoint(self) -> None:
        """Save a checkpoint; a failed save (disk full, permissions) keeps the older ones and training goes on."""
        try:
            self.save_checkpoint()
        except CheckpointError as e:
            logger.error("%s", e)

    def _on_signal(self, signum: int) -> None:
        self.stop_signal = signum

    def _stop_for_signal(self) -> NoReturn:
        """Every rank, once `stop_requested`: save the finished steps (unless this step's checkpoint is already saved) and
        stop, so that a preempted job resumes where it was stopped instead of at the last periodic checkpoint."""
        if self.global_step % self.cfg.checkpointing_steps:
            self._try_checkpoint()
        self.accelerator.end_training()  # flush the trackers' last steps
        name = signal.Signals(self.stop_signal).name if self.stop_signal is not None else "a signal to another process"
        raise Interrupted(f"stopped by {name} at step {self.global_step}; newest checkpoint: {self.ckpt.latest() or 'none'} "
                          "(--resume_from_checkpoint latest continues from it)", self.stop_signal or signal.SIGTERM)
