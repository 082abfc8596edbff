"""Stopping a run on SIGTERM (a SLURM preemption, `kill`) or SIGINT (Ctrl-C) at a step boundary, after a checkpoint,
instead of losing every step since the last periodic one."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(RuntimeError):
    """SIGTERM (a SLURM preemption, `kill`) or SIGINT (Ctrl-C) stopped the run after saving a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum



@contextlib.contextmanager
def stop_on_signals(record: Callable[[int], None]) -> Iterator[None]:
    """In this block SIGTERM and SIGINT call `record(signum)` instead of ending the process, each once: a second one
    acts as before (Ctrl-C twice stops at once). A signal the process was started ignoring (SIGINT in a shell script's
    background job) stays ignored. Outside the main thread, where signal handlers cannot be set, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: h for s in STOP_SIGNALS if (h := signal.getsignal(s)) is not signal.SIG_IGN}

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signum, previous[signum] if previous[signum] is not None else signal.SIG_DFL)
        record(signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def leave_ctrl_c_to_the_trainer(worker_id: int) -> None:
    """Loader `worker_init_fn`: Ctrl-C signals the whole process group, and torch's worker loop exits on KeyboardInterrupt,
    which would fail the step the trainer finishes before its checkpoint. SIGTERM is left alone: torch and
    multiprocessing shut workers down with it. A handler, not SIG_IGN, which `pipe:` commands would inherit."""
    signal.signal(signal.SIGINT, lambda signum, frame: None)
