"""Checks run before any weights load, each failing with one line (a ConfigError): shards, output dir, machine,
trackers, hub repo, and the --device of the cache and inference commands."""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import re
from typing import Any

import torch

from .config import ConfigError, TrainConfig, first_line


def check_shards(spec: str, flag: str = "--train_shards_path_or_url") -> None:
    """Fail early when every local shard of `flag` is missing (pipe:/remote urls are checked by the loader)."""
    from .data import expand_urls

    urls = expand_urls(spec)
    pairs = local_shards(urls)
    local, paths = [u for u, _ in pairs], [p for _, p in pairs]
    # A folder exists too, but reading it is a shard error each time: the run stopped only after the teacher loaded.
    if local and len(local) == len(urls) and not any(os.path.exists(p) and not os.path.isdir(p) for p in paths):
        folder = next((p for p in paths if os.path.isdir(p)), None)
        if folder is not None:
            raise ConfigError(f"{flag}: {folder} is a folder, not a shard file: name its shards, '::'-joined or as a brace "
                              f"pattern ({folder.rstrip('/')}/{_brace_pattern(folder)})")
        shown = ", ".join(local[:3]) + (f" (+{len(local) - 3} more)" if len(local) > 3 else "")
        # "a.tar,b.tar" or "a.tar b.tar" (other tools' list syntax) is one path, which does not exist.
        listed = any(os.path.exists(piece) for p in paths for piece in re.split(r"[,\s]+", p) if piece and piece != p)
        hint = "; join several shards with '::' or a brace pattern (dir/{00000..00009}.tar)" if listed else ""
        if any(c in p for p in paths for c in "*?"):  # the shell leaves a flag's `--name=dir/*.tar` as it is
            hint = "; wildcards (*, ?) are not expanded: name the shards with a brace pattern (dir/{00000..00009}.tar)"
        raise ConfigError(f"{flag}: none of the {len(local)} shard file(s) exists: {shown}{hint}")


def _brace_pattern(folder: str) -> str:
    """The brace pattern of the numbered shards in `folder` (`tcdistill cache` writes 00000.tar, ...: the fix to copy, not
    an example ten shards long), else an example one."""
    try:
        names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".tar"))
    except OSError:
        names = []
    if names and all(n.isdigit() and len(n) == len(names[0]) for n in names):
        return f"{names[0]}.tar" if len(names) == 1 else f"{{{names[0]}..{names[-1]}}}.tar"
    return "{00000..00009}.tar"


def local_shards(urls: list[str]) -> list[tuple[str, str]]:
    """(url, file path) of each local shard among `urls`: pipe: commands and remote urls are left out; gopen opens
    `file:/x.tar` (as `file:///x.tar`) as the local file /x.tar, so its path is that, not the url text."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    return [(u, url2pathname(urlparse(u).path) if u.startswith("file:") else u) for u in urls if "://" not in u and not u.startswith("pipe:")]


def resolved_shards(spec: Any) -> Any:
    """The shard list `spec` names with each local shard as its resolved path, so `./s/{0..1}.tar`, `s/{0..1}.tar` and
    their absolute spelling compare equal (a resumed run's flags); urls and pipe: commands stay as written, and a spec
    that names no shard is returned as it is."""
    from .data import expand_urls

    try:
        urls = expand_urls(spec)
    except (TypeError, ValueError):
        return spec
    local = dict(local_shards(urls))
    return [os.path.realpath(local[u]) if u in local else u for u in urls]


def check_output_dir(path: str, flag: str = "--output_dir", make: bool = True) -> None:
    """Fail before any weights load when the folder `path` (named `flag` in the message) cannot be created or written
    (read-only, no permission), instead of after the work whose results it was to hold. `make=False`: the same refusals
    without making anything (a missing folder is probed in the nearest existing one above it). A broken symbolic link
    on the way (to a disk not mounted) is named: makedirs said "File exists", and `make=False` probed above it."""
    import tempfile

    if not path:  # makedirs("") fails, while make=False probed the folder above the working directory and passed
        raise ConfigError(f"{flag} is empty: name a folder ('.' for the working directory).")
    if os.path.exists(path) and not os.path.isdir(path):  # makedirs says "File exists", read as "not writable: File exists"
        raise ConfigError(f"{flag} {path!r} is a file, not a folder.")
    probe = path  # the nearest part of `path` that exists (a link counts, broken or not)
    while not os.path.lexists(probe) and os.path.dirname(os.path.abspath(probe)) != os.path.abspath(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if os.path.islink(probe) and not os.path.exists(probe):  # makedirs said "File exists" ("No such file" below it)
        raise ConfigError(f"{flag} {path!r} goes through the broken symbolic link {probe!r} (to {os.readlink(probe)!r}); "
                          "create its target or pick another folder.")
    try:
        if make:
            os.makedirs(path, exist_ok=True)
            probe = path
        elif not os.path.isdir(probe):  # below a file: what makedirs would say
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), probe)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path!r} is not writable: {e.strerror or e}") from None


LOCK_NAME = ".tcdistill.lock"
_held_locks: dict[str, int] = {}  # real path of an output dir -> the open lock file's descriptor, kept for the process's life


TRAINING_ROLE = "training run"  # the lock file's role of a training run (older runs wrote their pid alone: one too)


def lock_output_dir(path: str, role: str = TRAINING_ROLE) -> None:
    """Hold an exclusive lock on the output dir (`LOCK_NAME` in it) for the rest of this process, or raise a one-line
    ConfigError naming the process that holds it (and its `role`, which the lock file records). Two runs on one --output_dir interleaved their checkpoints and
    metrics.jsonl, and each save deletes the staging folders it finds as a killed save's leftovers, the other run's
    in-flight one included ("save failed"). A POSIX record lock (lockf), not an flock: the kernel drops it when this
    process ends, SIGKILL included, so a killed run leaves no stale lock and its resume takes the lock again; an flock
    belongs to the open file, which forked loader workers share, and outlived a SIGKILLed trainer until they noticed.
    Held per process: trainers built one after another in one process (tests, the demo, the bench) share it (and the
    process opens the file only here: closing any other descriptor of it would drop the lock). Where the filesystem
    has no locks (some network mounts) the run goes on unguarded, with a warning."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return
    key = os.path.realpath(path)
    if key in _held_locks:
        return
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:  # a folder of that name, another user's file: a ConfigError, which claim_output_dir broadcasts
        raise ConfigError(f"--output_dir {path!r}: its lock file {LOCK_NAME} cannot be opened ({e.strerror or e}); remove it "
                          "if no run uses the folder, or pick another --output_dir.") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # POSIX lets a held lock answer either
            os.close(fd)
            logging.getLogger("tcdistill").warning("--output_dir %s cannot be locked (%s): nothing stops a second run on it "
                                                   "from mixing its checkpoints with this one's.", path, e.strerror or e)
            return
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(f"--output_dir {path!r} is in use by another {holder}, holding {LOCK_NAME}); wait for it to end, "
                          "or pick another --output_dir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {role}".encode(), 0)  # for the refusal message of a second run
    _held_locks[key] = fd


def unlock_output_dir(path: str) -> None:
    """Drop this process's lock of the folder `path` (`lock_output_dir`), if it holds one: a command that ends without
    its process ending (`tcdistill generate` called from Python) frees the folder for the next."""
    fd = _held_locks.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)


def _holder(fd: int) -> str:
    """'<role> (pid N' of the process that wrote the lock file `fd` ("PID ROLE"; older runs wrote the pid alone)."""
    pid, _, role = (os.read(fd, 128).decode(errors="replace").strip() or "unknown").partition(" ")
    return f"{role or TRAINING_ROLE} (pid {pid}"


def output_dir_holder(path: str | os.PathLike) -> str | None:
    """'<role> (pid N' of another live process holding the run lock of the folder `path` (`lock_output_dir`), else None:
    no lock file, a free one (its run ended, or was killed), or this process's own."""
    try:
        import fcntl
    except ImportError:
        return None
    if os.path.realpath(path) in _held_locks:  # closing a second descriptor of the file would drop this process's lock
        return None
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a read lock: refused while a run holds its write lock
    except OSError as e:
        return _holder(fd) if e.errno in (errno.EACCES, errno.EAGAIN) else None
    finally:
        os.close(fd)  # drops the read lock taken here, if any
    return None


def claim_output_dir(cfg: TrainConfig, accelerator: Any) -> str | None:
    """--output_dir made and locked for a run of any number of processes, with --push_to_hub's repo created (the main
    process's; its id returned there, else None). Every refusal of the folder (a file, not writable, held by another run)
    comes before the repo is created, which left an empty hub repo behind, and the repo before the folder is made, which
    left an empty folder behind a hub that could not be reached. The main process holds the lock (it saves; the other
    ranks only write into its staging), and any refusal of its stops every rank: the others went on to load the teacher
    and crashed in DDP's first collective with a traceback."""
    path = cfg.output_dir
    check_output_dir(path, make=False)
    if cfg.report_to != "none":  # the trackers make it at the run's start: a file in the way was a traceback after the loads
        check_output_dir(os.path.join(path, cfg.logging_dir), "--logging_dir", make=False)
    refusal, repo = None, None
    if accelerator.is_main_process:
        try:
            if os.path.isdir(path):
                lock_output_dir(path)  # a folder another run holds: refused before the repo
            repo = create_hub_repo(cfg) if cfg.push_to_hub else None
            check_output_dir(path)
            lock_output_dir(path)
        except ConfigError as e:
            refusal = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise ConfigError(refusal)
    return repo


def check_process_count(num_processes: int) -> None:
    """Refuse, in one line, a process that its launcher started as one of several (WORLD_SIZE) but that accelerate set
    up as a run of its own: without a GPU, `accelerate launch` with a config file's `distributed_type: MULTI_GPU` and
    `use_cpu: true` does not pass use_cpu on to the processes, so each trained alone on the same --output_dir, and
    all but one stopped on the run lock, naming a sibling as "another training run"."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > num_processes:
        raise ConfigError(f"launched as one of {world} processes (WORLD_SIZE={world}), but accelerate set up a run of "
                          f"{num_processes} process(es) here; without a GPU, set ACCELERATE_USE_CPU=true for the launch "
                          "(accelerate launch does not pass a config file's use_cpu to --multi_gpu processes).")


def check_environment(cfg: TrainConfig, device: torch.device) -> None:
    """Reject settings this machine cannot run, as one line, before any weights load."""
    if cfg.mixed_precision == "fp16" and device.type == "cpu":
        raise ConfigError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision no (or bf16).")
    # torch 2.13's inductor miscompiles 16-bit AVX-512 CPU kernels: `F.layer_norm(a + b.transpose(1, 2), (64,))` on
    # bf16 [1, 64, 64] tensors returns NaN/garbage (its tile-transpose reduction kernel; right with g++
    # -fno-tree-slp-vectorize, with 256-bit code, or backend aot_eager). That is a transformer block's residual + norm:
    # the first step's loss was NaN (--compile_scope blocks). With 256-bit (AVX2) code the compiled UNets gave the
    # eager outputs (to bf16 rounding), so only AVX-512 machines are refused.
    if cfg.compile_unet and (missing := compile_support_missing(cfg.compile_scope)):
        raise ConfigError(f"--compile_unet needs {missing}, which torch {torch.__version__} lacks: upgrade torch, or train "
                          "without --compile_unet.")
    if cfg.compile_unet and cfg.mixed_precision == "bf16" and device.type == "cpu" and inductor_cpu_vector_bits() >= 512:
        raise ConfigError("--compile_unet with --mixed_precision bf16 on this CPU: torch inductor's AVX-512 code for bf16 "
                          "UNet blocks gives NaN losses; use --mixed_precision no with --compile_unet, or bf16 without it.")
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None


def compile_support_missing(scope: str) -> str | None:
    """What `--compile_unet` calls that this torch lacks, else None. pyproject allows torch >= 2.4, but validation (and the
    bench's counts) run compiled UNets eagerly through `torch.compiler.set_stance` (torch 2.6+), and `--compile_scope
    blocks` raises dynamo's `recompile_limit` (torch 2.7+; `cache_size_limit` before): an AttributeError traceback at the
    first validation, or after the weights had loaded."""
    import torch._dynamo

    if not hasattr(torch.compiler, "set_stance"):
        return "torch.compiler.set_stance (torch 2.6+)"
    if scope == "blocks" and not hasattr(torch._dynamo.config, "recompile_limit"):
        return "torch._dynamo.config.recompile_limit (torch 2.7+)"
    return None


def inductor_cpu_vector_bits() -> int:
    """The vector width, in bits, of the C++ kernels torch inductor generates on this CPU (0: scalar code, or no answer)."""
    # It builds test programs: without a C++ compiler it raised InvalidCxxCompiler (a traceback in preflight); the
    # compile itself reports that, as it did before this probe.
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        return pick_vec_isa().bit_width()
    except Exception:  # noqa: BLE001
        return 0


def check_lr_schedule(name: str, lr: float, warmup: int, steps: int) -> None:
    """Refuse, in one line, an --lr_scheduler that fails with this learning rate, warmup and run length: it is built on a
    throwaway optimizer and evaluated at the steps where diffusers' schedules compare or divide (0, the warmup's end, the
    run's end). polynomial refuses a learning rate at or below its end value (1e-7) when built (a traceback after the
    weights loaded), and with --lr_warmup_steps equal to the run's length divided by zero at the last step: a traceback
    after the whole run, before its outputs were saved."""
    from diffusers.optimization import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    try:
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=steps)
        for step in (0, warmup, steps):
            for factor in getattr(sched, "lr_lambdas", []):
                factor(step)
    except ValueError as e:
        raise ConfigError(f"--lr_scheduler {name} with learning rate {lr:g}: {first_line(e)}") from None
    except ZeroDivisionError:
        raise ConfigError(f"--lr_scheduler {name} with --lr_warmup_steps {warmup} leaves none of the run's {steps} steps to "
                          "decay over (a division by zero at the last step): lower --lr_warmup_steps.") from None


def check_trackers(cfg: TrainConfig) -> None:
    """Refuse a --report_to tracker that is not installed, in one line."""
    # accelerate only warns about one and then logs nowhere; this runs before the Accelerator is made, so that its warning
    # does not come before the error line.
    for tracker in ("wandb", "comet_ml"):  # each tracker's package has the tracker's name
        if cfg.report_to == tracker and importlib.util.find_spec(tracker) is None:
            raise ConfigError(f"--report_to {tracker} needs the {tracker} package: pip install {tracker} (or use --report_to tensorboard).")


def create_hub_repo(cfg: TrainConfig) -> str:
    """--push_to_hub: create (or reuse) the hub repo before any weights load, as the reference does, so a missing
    network or token fails in one line at the start instead of after the whole run."""
    from huggingface_hub import create_repo

    try:
        return create_repo(repo_id=cfg.hub_repo_name, exist_ok=True, token=cfg.hub_token).repo_id
    except Exception as e:  # noqa: BLE001 - offline, DNS, auth and HTTP errors all mean "cannot push"
        raise ConfigError(f"--push_to_hub: cannot create the hub repo {cfg.hub_repo_name!r} ({type(e).__name__}: {first_line(e)})") from None


def resolve_device(name: str | None) -> torch.device:
    """A `--device` value: cuda when there is one, else cpu, by default; a malformed or absent device is one line."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r}: {first_line(e)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    return dev
