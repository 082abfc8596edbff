"""Atomic, resumable training checkpoints (in the spirit of edm2's ``CheckpointIO``).

``output_dir/checkpoint-<step>/`` holds ``<name>.safetensors`` per entry of ``tensors``, ``<name>.pt``
per entry of ``states`` (optimizer, LR scheduler, counters, ...), ``rng_state_<rank>.pt`` per process,
``meta.json`` and, written last, ``COMPLETE`` ({"step", "files": {name: size}, "crc32": {name: crc}}). A save is staged in
hidden sibling dirs and renamed into place only when complete, so ``latest()`` never picks a
half-written checkpoint, wherever the process is killed.

Multi-process: *every* rank calls ``save(..., barrier=accelerator.wait_for_everyone)``. Each rank
writes ``rng_state_<rank>.pt`` into the shared staging dir ``.checkpoint-<step>.tmp-ranks``; after the
barrier the main process writes ``tensors``/``states`` (other ranks' are ignored), collects the rank
files and publishes; after a second barrier the checkpoint is complete on every rank (or the main
process raised). ``output_dir`` must be on a filesystem all ranks share.

Resuming, on every rank: ``ckpt = io.load_latest()`` (or ``io.load(io.resolve(arg))``), load
tensors/states into the objects, then ``restore_rng_state(ckpt.rng)``; ``ckpt.rng`` is this rank's RNG
state (None if the checkpoint came from a run with fewer processes).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import random
import re
import shutil
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import safetensors.torch
import torch

from .config import first_line, one_line

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_STALE_RE = re.compile(r"^\.checkpoint-\d+\.(tmp|old|del)-\w+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What torch.load(weights_only=True) accepts without allow-listing. Exact types, because subclasses
# such as numpy.float64 (a float) or namedtuples are rejected at load time.
_SAFE_LEAVES = {int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size}


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found or loaded."""


def checkpoint_hint(path: Path) -> str:
    """'; <why>' when `path` is a training checkpoint folder (resume state, which no loader takes), else ''."""
    if path.is_dir() and (_CKPT_RE.match(path.name) or (path / MARKER).is_file()):
        return (f"; {path.name} is a training checkpoint (resume state for --resume_from_checkpoint), not a model: pass the "
                f"output folder {path.parent} that the run saves at its end")
    return ""


@dataclass
class Checkpoint:
    """A loaded checkpoint; all tensors are on the CPU."""

    step: int
    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    states: dict[str, Any]
    meta: dict = field(default_factory=dict)
    rng: dict | None = None  # this rank's RNG state (plus "extra" if saved), for restore_rng_state()


def capture_rng_state() -> dict:
    """Snapshot python, numpy, torch CPU and all CUDA RNGs as weights_only-loadable objects."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        # numpy arrays/scalars are not weights_only-safe, so store plain python numbers.
        "numpy": {"name": str(name), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore the RNGs captured by ``capture_rng_state`` (missing parts are left alone)."""
    if "python" in state:
        random.setstate((state["python"]["version"], tuple(state["python"]["state"]), state["python"]["gauss"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A resumed run may see a different number of GPUs; restore the ones both runs have.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _check_weights_only(obj: Any, where: str) -> None:
    """Fail at save time, not at resume time, on objects torch.load(weights_only=True) rejects."""
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            _check_weights_only(key, f"{where} key {key!r}")
            _check_weights_only(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple, set):
        for i, value in enumerate(obj):
            _check_weights_only(value, f"{where}[{i}]")
    elif type(obj) not in _SAFE_LEAVES and not isinstance(obj, torch.Tensor):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                        "torch.load(weights_only=True) cannot load; convert it to a tensor/number/str/list/dict")


def _fsync(path: Path) -> None:
    """fsync a file or directory, so a crash after the rename cannot expose unwritten data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    """CRC-32 of a file, read in chunks (~1 GB/s here from the page cache: ~15 s for SD 1.5 full's ~14 GB)."""
    crc, buf = 0, bytearray(min(chunk, max(path.stat().st_size, 1)))
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return crc


def _umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing threads that create files meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_modes(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a plain open()/mkdir() would: safetensors 0.8
    writes its files 0600 and tempfile makes 0700 folders, so a ComfyUI/A1111 service run as another user could not
    read the outputs."""
    mask, p = _umask(), Path(path)
    for q in [p, *p.rglob("*")] if p.is_dir() else [p]:
        os.chmod(q, (0o777 if q.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling path to write `final` to; when the block succeeds, move it into place with the modes a
    plain open() gives. A failed write (disk full) leaves the previous `final`, or none, never a half-written one; a
    killed earlier write's leftover goes at the next write of the same file."""
    final = Path(final)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        share_modes(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to write `final` into; when the block succeeds, rename it into place. A failed
    write (disk full) leaves the previous `final`, or none, never a half-written one."""
    final = Path(final)
    tmp, old = (final.with_name(f".{final.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    # Leftovers of a killed earlier save (a whole UNet each): nothing else removes them, and a hub push would upload
    # the `.old` ones. Stale copies of the old folder go only once the new one is in place.
    stale = re.compile(rf"^\.{re.escape(final.name)}\.(tmp|old)-\d+$")
    leftovers = [p for p in final.parent.iterdir() if stale.match(p.name)] if final.parent.is_dir() else []
    for path in leftovers:
        if ".tmp-" in path.name:
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        share_modes(tmp)
        if final.exists():
            # os.rename cannot replace a non-empty dir. A kill between these two renames loses only the old copy.
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)  # put the replaced folder back
        raise
    shutil.rmtree(old, ignore_errors=True)
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def _for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, make contiguous and un-share tensors, which safetensors refuses to save otherwise."""
    out, seen = {}, set()
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {key!r} is a {type(t).__name__}, not a torch.Tensor")
        t, storage = t.detach(), t.untyped_storage()
        if t.numel() and (storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()):
            t = t.clone()  # tied weights and views: give each its own storage
        seen.add(storage.data_ptr())
        out[key] = t.contiguous()
    return out


class CheckpointIO:
    """Saves ``checkpoint-<step>`` directories atomically and finds/loads the newest complete one."""

    def __init__(self, output_dir: str | Path, total_limit: int | None = None, is_main_process: bool = True,
                 rank: int = 0, num_processes: int = 1) -> None:
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"total_limit must be None or >= 1, got {total_limit}")
        if not 0 <= rank < num_processes:
            raise ValueError(f"rank {rank} is not in [0, num_processes={num_processes}); pass num_processes")
        self.output_dir = Path(output_dir)
        self.total_limit, self.is_main_process = total_limit, is_main_process
        self.rank, self.num_processes = rank, num_processes

    def _scan(self) -> list[tuple[int, Path, str | None]]:
        """Every ``checkpoint-<step>`` entry, oldest first, with why it is not a complete checkpoint (None if it is)."""
        paths = self.output_dir.iterdir() if self.output_dir.is_dir() else []
        found = sorted((int(m.group(1)), p) for p in paths if (m := _CKPT_RE.match(p.name)))
        return [(step, p, self._problem(p, step)) for step, p in found]

    def complete(self) -> list[tuple[int, Path]]:
        """All complete checkpoints, oldest first."""
        return [(step, p) for step, p, problem in self._scan() if problem is None]

    @staticmethod
    def _problem(path: Path, step: int | None = None) -> str | None:
        """Why ``path`` is not a complete checkpoint, or None if it is."""
        if not path.is_dir():
            return "does not exist" if not path.exists() else "is not a directory"
        try:
            marker = json.loads((path / MARKER).read_text())
            files, marker_step = dict(marker["files"]), int(marker["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"has no valid {MARKER} marker (the save was interrupted, or it is not a checkpoint)"
        if step is not None and marker_step != step:  # e.g. a copy under another name
            return f"has a {MARKER} marker for step {marker_step}"
        for name, size in files.items():
            if not (path / name).is_file() or (path / name).stat().st_size != size:
                return f"is damaged: {name} is missing or has the wrong size"
        return None

    def latest(self) -> Path | None:
        """Path of the newest complete checkpoint, or None."""
        found = self.complete()
        return found[-1][1] if found else None

    def resolve(self, resume_from_checkpoint: str | Path | None) -> Path | None:
        """Map a ``--resume_from_checkpoint`` value (None, "latest" or a path) to a checkpoint path."""
        if resume_from_checkpoint is None:
            return None
        if str(resume_from_checkpoint) == "latest":
            return self.latest()
        path, in_output = Path(resume_from_checkpoint), self.output_dir / resume_from_checkpoint
        if not path.is_absolute() and in_output.exists():  # accept "checkpoint-500" relative to output_dir, like diffusers
            if path.exists() and not path.samefile(in_output):  # a working directory holding another run's checkpoint-500
                raise CheckpointError(f"--resume_from_checkpoint {str(path)!r} names both {str(path.absolute())!r} and "
                                      f"{str(in_output)!r}: pass the one you mean as an absolute path")
            path = in_output
        if (problem := self._problem(path)) is not None:
            raise CheckpointError(f"cannot resume from {str(path)!r}: it {problem}; newest complete checkpoint "
                                  f"in {str(self.output_dir)!r}: {self.latest() or 'none'}")
        return path

    def load(self, path: str | Path) -> Checkpoint:
        """Load a complete checkpoint (tensors, states, meta, this rank's RNG state) onto the CPU."""
        if (resolved := self.resolve(path)) is None:
            raise CheckpointError(f"no complete checkpoint in {str(self.output_dir)!r}")
        marker = json.loads((resolved / MARKER).read_text())
        ckpt = Checkpoint(step=int(marker["step"]), path=resolved, tensors={}, states={})
        crcs = marker.get("crc32", {})  # absent in checkpoints of earlier versions: sizes only, as then
        try:
            for name in marker["files"]:
                file = resolved / name
                # A value overwritten in place keeps the size: without the checksum a finite one resumed silently.
                if name in crcs and _crc32(file) != crcs[name]:
                    raise CheckpointError(f"cannot load checkpoint {str(resolved)!r}: {name} changed after the save "
                                          "(its CRC-32 differs from the one saved: bit rot or an overwrite)")
                if name.endswith(".safetensors"):
                    ckpt.tensors[name[: -len(".safetensors")]] = safetensors.torch.load_file(file, device="cpu")
                elif name == "meta.json":
                    ckpt.meta = json.loads(file.read_text())
                elif name.startswith("rng_state_"):
                    # Every rank reads every rank's file, so that a damaged one fails the load on all ranks alike: when
                    # only its owner skipped to an older checkpoint, the ranks trained on from different steps and
                    # the run hung at its end.
                    rng = torch.load(file, map_location="cpu", weights_only=True)
                    if name == f"rng_state_{self.rank}.pt":
                        ckpt.rng = rng
                elif name.endswith(".pt"):
                    ckpt.states[name[:-3]] = torch.load(file, map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as exc:
            # One line naming the file: torch's unpickling errors run over several lines, the last of them a link, and
            # their first sentence is all that fits a damaged file (the next ones advise weights_only=False).
            detail = re.split(r"(?<=\.)\s", first_line(exc), maxsplit=1)[0][:200]
            raise CheckpointError(f"cannot load checkpoint {str(resolved)!r}: {name} is unreadable "
                                  f"({type(exc).__name__}: {detail})") from exc
        return ckpt

    def load_latest(self) -> Checkpoint | None:
        """Load the newest complete checkpoint that loads, or return None if there is none.

        A ``checkpoint-<step>`` that is damaged (a file missing or cut short, no marker) or whose files cannot be read
        (bit rot, an overwritten file) is skipped with a warning; if there are checkpoints but none loads, the newest
        one's error is raised rather than starting over (and overwriting them).
        """
        first: CheckpointError | None = None
        for _, path, problem in reversed(self._scan()):
            try:
                if problem is not None:
                    raise CheckpointError(f"cannot resume from {str(path)!r}: it {problem}")
                return self.load(path)
            except CheckpointError as exc:
                logger.warning("skipping checkpoint: %s", exc)
                first = first or exc
        if first is not None:  # the remedy too: these may be another tool's folders (diffusers' scripts name theirs alike)
            raise CheckpointError(f"{first}; none of the checkpoint-N folders in {str(self.output_dir)!r} loads: remove or "
                                  "repair them, or start without --resume_from_checkpoint in another --output_dir") from first
        return None

    def load_resume(self, resume_from_checkpoint: str | Path | None) -> Checkpoint | None:
        """Load what a ``--resume_from_checkpoint`` value names: None -> None; "latest" -> ``load_latest()`` (None when
        there is no complete checkpoint); a path -> ``load(path)`` (an error when it is not a complete checkpoint)."""
        if resume_from_checkpoint is None:
            return None
        return self.load_latest() if str(resume_from_checkpoint) == "latest" else self.load(resume_from_checkpoint)

    def _staging(self, step: int) -> Path:
        """Shared dir where every rank drops its RNG file."""
        return self.output_dir / f".checkpoint-{step}.tmp-ranks"

    def _error(self, step: int, exc: BaseException) -> CheckpointError:
        """One-line error for a failed save, naming the newest checkpoint that survives."""
        try:
            newest = str(self.latest() or "none")
        except OSError:
            newest = "unknown (output dir unreadable)"
        # torch.save's writer reports a short write (disk full, `ulimit -f`) only as "[enforce fail at inline_container.cc]
        # . unexpected pos N vs M", which names no cause.
        short = "; a short write: the disk is full or a file-size limit (ulimit -f) was hit" if "unexpected pos" in str(exc) else ""
        return CheckpointError(f"saving checkpoint-{step} failed ({one_line(exc)}{short}); previous checkpoints are intact, "
                               f"newest: {newest}")

    def save(self, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], states: dict[str, Any],
             meta: dict | None = None, barrier: Callable[[], None] | None = None,
             rank_extra: dict | None = None) -> Path:
        """Save ``checkpoint-<step>``; with several processes call it on every rank and pass a barrier.

        ``rank_extra`` (weights_only-safe, e.g. this rank's data-stream position) is stored with this
        rank's RNG state; after loading it is ``ckpt.rng["extra"]``.
        """
        if self.num_processes > 1 and barrier is None:
            raise ValueError("num_processes > 1: pass barrier= (e.g. accelerator.wait_for_everyone)")
        error: Exception | None = None
        try:
            self.write_rank_state(step, rank_extra)
        except Exception as exc:  # still reach both barriers below, or the other ranks hang
            error = exc
        if barrier is not None:
            barrier()
        try:
            if self.is_main_process and error is None:
                return self.finalize(step, tensors=tensors, states=states, meta=meta)
        finally:
            if barrier is not None:
                barrier()
        if error is not None:
            raise self._error(step, error) from error
        return self.output_dir / f"checkpoint-{step}"

    def write_rank_state(self, step: int, extra: dict | None = None) -> None:
        """Write this rank's RNG state into the shared staging dir (every rank, before the barrier)."""
        staging = self._staging(step)
        staging.mkdir(parents=True, exist_ok=True)
        target = staging / f"rng_state_{self.rank}.pt"
        target.unlink(missing_ok=True)  # so a leftover of an interrupted attempt cannot stand in for this one
        state = capture_rng_state()
        if extra is not None:
            _check_weights_only(extra, "rank_extra")
            state["extra"] = extra
        with atomic_file(target) as tmp:
            torch.save(state, tmp)
            _fsync(tmp)

    def finalize(self, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], states: dict[str, Any],
                 meta: dict | None = None) -> Path:
        """Main process, after every rank's ``write_rank_state``: write the rest and publish atomically."""
        final, staging = self.output_dir / f"checkpoint-{step}", self._staging(step)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for path in self.output_dir.iterdir():  # leftovers of killed or failed saves (the next save removes them)
                if _STALE_RE.match(path.name) and path != staging:
                    shutil.rmtree(path, ignore_errors=True)
            for name in [*tensors, *states]:  # names become file names; rng_state_* is reserved
                if not _NAME_RE.match(name) or name.startswith("rng_state_"):
                    raise ValueError(f"invalid checkpoint entry name {name!r}")
            _check_weights_only(states, "states")
            meta_text = json.dumps(meta or {}, indent=2, sort_keys=True)
            with atomic_dir(final) as tmp:  # .checkpoint-N.tmp-PID, renamed to checkpoint-N once complete
                for name, group in tensors.items():
                    safetensors.torch.save_file(_for_safetensors(group), tmp / f"{name}.safetensors")
                for name, state in states.items():
                    torch.save(state, tmp / f"{name}.pt")
                (tmp / "meta.json").write_text(meta_text)
                for rank in range(self.num_processes):
                    if not (staging / f"rng_state_{rank}.pt").is_file():
                        raise FileNotFoundError(f"rank {rank} wrote no rng_state_{rank}.pt; "
                                                "call save() on every rank with a barrier")
                    os.replace(staging / f"rng_state_{rank}.pt", tmp / f"rng_state_{rank}.pt")
                files, crcs = {}, {}
                for path in sorted(tmp.iterdir()):
                    _fsync(path)
                    files[path.name], crcs[path.name] = path.stat().st_size, _crc32(path)  # read back from the page cache
                (tmp / MARKER).write_text(json.dumps({"step": step, "files": files, "crc32": crcs}, indent=1))
                _fsync(tmp / MARKER)
                _fsync(tmp)
            _fsync(self.output_dir)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)  # every rank is past the barrier, so nobody writes here any more
            if isinstance(exc, Exception):
                raise self._error(step, exc) from exc
            raise
        shutil.rmtree(staging, ignore_errors=True)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        """Delete the oldest complete checkpoints beyond ``total_limit``, never ``keep``."""
        if self.total_limit is None:
            return
        others = [(step, path) for step, path in self.complete() if path != keep]
        for step, path in others[: max(0, len(others) + 1 - self.total_limit)]:
            doomed = self.output_dir / f".checkpoint-{step}.del-{os.getpid()}"
            try:
                os.rename(path, doomed)  # vanish from latest() atomically, then delete at leisure
                shutil.rmtree(doomed)
                logger.info("removed old checkpoint %s (total_limit=%d)", path, self.total_limit)
            except OSError as exc:
                logger.warning("could not remove old checkpoint %s: %s", path, exc)
