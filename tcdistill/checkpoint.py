"""Atomic, resumable training checkpoints (in the spirit of edm2's ``CheckpointIO``).

Layout of ``output_dir/checkpoint-<step>/``::

    <name>.safetensors   one per entry of ``tensors`` (model / EMA / LoRA weights)
    <name>.pt            one per entry of ``states`` (optimizer, LR scheduler, counters, ...)
    rng_state_<rank>.pt  RNG state of every process, see ``capture_rng_state``
    meta.json            the JSON-serialisable ``meta`` dict
    COMPLETE             written last: {"step", "files": {name: size}}

A save is staged in hidden sibling directories and renamed into place only when complete, so
``latest()`` never picks up a half-written checkpoint, whenever the process is killed.

Multi-process runs: *every* rank calls ``save(..., barrier=accelerator.wait_for_everyone)``.
Each rank writes its ``rng_state_<rank>.pt`` into the shared staging dir
``.checkpoint-<step>.tmp-ranks``; after the barrier the main process writes ``tensors``/``states``
(the other ranks' arguments are ignored), collects all rank files and renames the checkpoint into
place; a second barrier means that when ``save`` returns on any rank the checkpoint is complete
(or the main process raised). ``output_dir`` must be on a filesystem all ranks share.

Resuming: ``ckpt = io.load_latest()`` (or ``io.load(io.resolve(arg))``) on every rank, load the
tensors/states into the objects, then ``restore_rng_state(ckpt.rng)`` -- ``ckpt.rng`` is this
rank's RNG state (None if the checkpoint came from a run with fewer processes).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_STALE_RE = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old|del)-[A-Za-z0-9_]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What torch.load(weights_only=True) accepts without allow-listing; exact types, because subclasses
# such as numpy.float64 (a float) or namedtuples are rejected at load time.
_SAFE_LEAVES = {int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size}


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found or loaded."""


@dataclass
class Checkpoint:
    """A loaded checkpoint; all tensors are on the CPU."""

    step: int
    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    states: dict[str, Any]
    meta: dict = field(default_factory=dict)
    rng: dict | None = None  # this rank's RNG state, for restore_rng_state()


def capture_rng_state() -> dict:
    """Snapshot python, numpy, torch CPU and all CUDA RNGs as weights_only-loadable objects."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": {"version": version, "state": list(internal), "gauss": gauss},
                             "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        # numpy arrays/scalars are not weights_only-safe, so store plain python numbers.
        state["numpy"] = {"name": str(name), "keys": [int(k) for k in keys], "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore the RNGs captured by ``capture_rng_state`` (missing parts are left alone)."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
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
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, "
                        "which torch.load(weights_only=True) cannot load; convert it to a tensor/number/str/list/dict")


def _fsync(path: Path) -> None:
    """fsync a file or directory so a crash after rename cannot expose unwritten data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, make contiguous and un-share tensors, which safetensors refuses to save otherwise."""
    out, seen = {}, set()
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {key!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and (ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()  # tied weights / views: give each its own storage
        elif ptr is not None:
            seen.add(ptr)
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

    # ---------------------------------------------------------------- finding
    def _complete(self) -> list[tuple[int, Path]]:
        """All complete checkpoints, oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for path in self.output_dir.iterdir():
            match = _CKPT_RE.match(path.name)
            if match and self._problem(path, int(match.group(1))) is None:
                found.append((int(match.group(1)), path))
        return sorted(found)

    @staticmethod
    def _problem(path: Path, step: int | None = None) -> str | None:
        """Why ``path`` is not a complete checkpoint, or None if it is."""
        if not path.is_dir():
            return "does not exist" if not path.exists() else "is not a directory"
        try:
            marker = json.loads((path / MARKER).read_text())
            files: dict[str, int] = dict(marker["files"])
            if int(marker["step"]) != (step if step is not None else int(marker["step"])):
                return f"has a {MARKER} marker for step {marker['step']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"has no valid {MARKER} marker (the save was interrupted, or it is not a checkpoint)"
        for name, size in files.items():
            if not (path / name).is_file() or (path / name).stat().st_size != size:
                return f"is damaged: {name} is missing or has the wrong size"
        return None

    def latest(self) -> Path | None:
        """Path of the newest complete checkpoint, or None."""
        found = self._complete()
        return found[-1][1] if found else None

    def resolve(self, resume_from_checkpoint: str | Path | None) -> Path | None:
        """Map a ``--resume_from_checkpoint`` value (None, "latest" or a path) to a checkpoint path."""
        if resume_from_checkpoint is None:
            return None
        if str(resume_from_checkpoint) == "latest":
            return self.latest()
        path = Path(resume_from_checkpoint)
        if not path.exists() and not path.is_absolute() and (self.output_dir / path).exists():
            path = self.output_dir / path  # accept "checkpoint-500" relative to output_dir, like diffusers
        problem = self._problem(path)
        if problem is not None:
            raise CheckpointError(f"cannot resume from {str(path)!r}: it {problem}; newest complete checkpoint "
                                  f"in {str(self.output_dir)!r}: {self.latest() or 'none'}")
        return path

    # ---------------------------------------------------------------- loading
    def load(self, path: str | Path) -> Checkpoint:
        """Load a complete checkpoint (tensors, states, meta and this rank's RNG state) onto the CPU."""
        path = self.resolve(path)
        assert path is not None
        marker = json.loads((path / MARKER).read_text())
        ckpt = Checkpoint(step=int(marker["step"]), path=path, tensors={}, states={})
        try:
            for name in marker["files"]:
                if name.endswith(".safetensors"):
                    ckpt.tensors[name[: -len(".safetensors")]] = safetensors.torch.load_file(path / name, device="cpu")
                elif name == "meta.json":
                    ckpt.meta = json.loads((path / name).read_text())
                elif name.endswith(".pt") and not name.startswith("rng_state_"):
                    ckpt.states[name[:-3]] = torch.load(path / name, map_location="cpu", weights_only=True)
            rng_file = path / f"rng_state_{self.rank}.pt"
            ckpt.rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
        except Exception as exc:
            raise CheckpointError(f"cannot load checkpoint {str(path)!r}: {type(exc).__name__}: {exc}") from exc
        return ckpt

    def load_latest(self) -> Checkpoint | None:
        """Load the newest complete checkpoint, or return None if there is none."""
        path = self.latest()
        return None if path is None else self.load(path)

    # ---------------------------------------------------------------- saving
    def _staging(self, step: int) -> Path:
        return self.output_dir / f".checkpoint-{step}.tmp-ranks"

    def _error(self, step: int, exc: BaseException) -> CheckpointError:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())  # keep the message on one line
        return CheckpointError(f"saving checkpoint-{step} failed ({detail}); previous checkpoints are intact, "
                               f"newest: {self.latest() or 'none'}")

    def save(self, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], states: dict[str, Any],
             meta: dict | None = None, barrier: Callable[[], None] | None = None) -> Path:
        """Save ``checkpoint-<step>``; with several processes call it on every rank and pass a barrier."""
        if self.num_processes > 1 and barrier is None:
            raise ValueError("num_processes > 1: pass barrier= (e.g. accelerator.wait_for_everyone)")
        error: Exception | None = None
        try:
            self.write_rank_state(step)
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

    def write_rank_state(self, step: int) -> None:
        """Write this rank's RNG state into the shared staging dir (every rank, before the barrier)."""
        staging = self._staging(step)
        staging.mkdir(parents=True, exist_ok=True)
        target = staging / f"rng_state_{self.rank}.pt"
        # Remove a leftover from an interrupted earlier attempt first, so a failed write shows as missing.
        target.unlink(missing_ok=True)
        tmp = staging / f".rng_state_{self.rank}.pt.{os.getpid()}"
        torch.save(capture_rng_state(), tmp)
        _fsync(tmp)
        os.replace(tmp, target)

    def finalize(self, step: int, *, tensors: dict[str, dict[str, torch.Tensor]], states: dict[str, Any],
                 meta: dict | None = None) -> Path:
        """Main process, after every rank's ``write_rank_state``: write the rest and publish atomically."""
        final = self.output_dir / f"checkpoint-{step}"
        staging = self._staging(step)
        tmp = self.output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
        old = self.output_dir / f".checkpoint-{step}.old-{os.getpid()}"
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for path in self.output_dir.iterdir():  # leftovers of killed or failed saves
                if _STALE_RE.match(path.name) and path != staging:
                    shutil.rmtree(path, ignore_errors=True)
            for name in [*tensors, *states]:  # names become file names; rng_state_* is reserved
                if not _NAME_RE.match(name) or name.startswith("rng_state_"):
                    raise ValueError(f"invalid checkpoint entry name {name!r}")
            _check_weights_only(states, "states")
            meta_text = json.dumps(meta or {}, indent=2, sort_keys=True)
            tmp.mkdir()
            for name, group in tensors.items():
                safetensors.torch.save_file(_for_safetensors(group), tmp / f"{name}.safetensors")
            for name, state in states.items():
                torch.save(state, tmp / f"{name}.pt")
            (tmp / "meta.json").write_text(meta_text)
            for rank in range(self.num_processes):
                rng_name = f"rng_state_{rank}.pt"
                if not (staging / rng_name).is_file():
                    raise FileNotFoundError(f"rank {rank} wrote no {rng_name}; call save() on every rank with a barrier")
                os.replace(staging / rng_name, tmp / rng_name)
            files = {}
            for path in sorted(tmp.iterdir()):
                _fsync(path)
                files[path.name] = path.stat().st_size
            (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}, indent=1))
            _fsync(tmp / MARKER)
            _fsync(tmp)
            if final.exists():
                # os.rename cannot replace a non-empty dir; a kill between these two renames loses only
                # this step's old copy (older checkpoints stay), and the next save removes `old`.
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync(self.output_dir)
        except BaseException as exc:
            for path in (tmp, staging):  # every rank is past the barrier, so nobody writes here any more
                shutil.rmtree(path, ignore_errors=True)
            if old.exists() and not final.exists():
                os.rename(old, final)  # put the replaced checkpoint back
            if isinstance(exc, Exception):
                raise self._error(step, exc) from exc
            raise
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        self._prune(keep=final)
        return final

    def _prune(self, keep: Path) -> None:
        """Delete the oldest complete checkpoints beyond ``total_limit``, never ``keep``."""
        if self.total_limit is None:
            return
        others = [(step, path) for step, path in self._complete() if path != keep]
        for step, path in others[: max(0, len(others) + 1 - self.total_limit)]:
            doomed = self.output_dir / f".checkpoint-{step}.del-{os.getpid()}"
            try:
                os.rename(path, doomed)  # vanish from latest() atomically, then delete at leisure
                shutil.rmtree(doomed)
                logger.info("removed old checkpoint %s (total_limit=%d)", path, self.total_limit)
            except OSError as exc:
                logger.warning("could not remove old checkpoint %s: %s", path, exc)
