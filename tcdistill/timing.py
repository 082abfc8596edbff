"""Optional per-section timing of a training step (used by the benchmark; a no-op by default)."""

from __future__ import annotations

import contextlib
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class StepTimer:
    """Accumulates wall time per named section; synchronises CUDA around sections so GPU time is attributed."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - t0
            self.counts[name] += 1

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with each call timed under `name` (identity when disabled)."""
        if not self.enabled:
            return fn

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.section(name):
                return fn(*args, **kwargs)

        return timed

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()


def profile_steps(step: Callable[[], Any], steps: int, row_limit: int = 20) -> dict[str, Any]:
    """Run `step` `steps` times under torch.profiler; report wall vs device-busy time per step and the top ops.

    Device-busy is the sum of the GPU kernels' own time (they never overlap on one stream), so
    `1 - busy / wall` is the share of the step in which the GPU waited for the host (launch overhead, syncs).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / max(steps, 1)
    events = prof.key_averages()
    # The kernels themselves (device-side events): summing the op rows too would count each kernel twice.
    device_us = sum(e.self_device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else 0.0
    out: dict[str, Any] = {
        "steps": steps, "wall_ms": 1000.0 * wall,
        "device_busy_ms": device_us / 1000.0 / max(steps, 1) if cuda else None,
        "host_ms": sum(e.self_cpu_time_total for e in events) / 1000.0 / max(steps, 1),
        "top_self_cpu": events.table(sort_by="self_cpu_time_total", row_limit=row_limit),
    }
    if cuda:
        out["top_self_device"] = events.table(sort_by="self_device_time_total", row_limit=row_limit)
    return out


class OpCounter(TorchDispatchMode):
    """Counts the tensor ops a step dispatches below autograd (forward and backward), views and allocations excluded.

    On a GPU each is about one kernel launch (a foreach or fused op counts once), so the count measures on any
    device the host work that makes a GPU step host-bound; `by_op` says which ops they are.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if not func.is_view and not func.__name__.startswith("empty"):  # an allocation launches no kernel
            self.by_op[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None without procfs."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def trim_heap() -> None:
    """Hand glibc's freed heap pages back to the OS, so the next RSS peak measures only what comes after."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's peak-allocated counter, or the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)


def held_memory(device: torch.device) -> int:
    """Bytes held now: CUDA allocated, or the process's RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return _proc_status_bytes("VmRSS") or 0


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated, or this process's peak RSS since the last reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm, "peak_rss"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak_rss_process_lifetime"
