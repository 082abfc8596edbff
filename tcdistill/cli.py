"""Entry points: the seed scripts' `train_main(variant)` and the `tcdistill` command with its subcommands."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

# subcommand -> module with `main(argv)`; each module owns its own flags.
SUBCOMMANDS = {
    "demo": "tcdistill.demo",
    "eval": "tcdistill.evaluate",
    "bench": "tcdistill.bench",
    "cache": "tcdistill.cache",
    "generate": "tcdistill.generate",
    "export": "tcdistill.export",
    "convert": "tcdistill.convert",
}


def error_line(e: BaseException) -> str:
    """The message of a training error as one line."""
    # A DataLoader worker's error arrives wrapped with its traceback text, whose last line is `module.Class: message`; the
    # class path is dropped, as a main-process error shows none.
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1].removeprefix(f"{type(e).__module__}.{type(e).__qualname__}: ") if lines else type(e).__name__


def train_main(variant: str, argv: Sequence[str] | None = None, prog: str | None = None, family: str = "sd") -> None:
    """Parse flags for `variant` ('full' or 'lora') and `family` and run the trainer; config errors exit with one line.

    The family's flag defaults apply (`families.flag_defaults`: the SDXL scripts' resolution 1024, w_min 3, filters).
    The entry point fixes the variant and the family: a `--variant` or `--model_family` that contradicts it is refused
    instead of training, say, a LoRA from the full-model script (`tcdistill train-*` take the family from its flag).
    """
    from .config import SEED_SCRIPTS, ConfigError, parse_config
    from .families import flag_defaults

    cfg = parse_config(argv, defaults={**flag_defaults(family), "variant": variant, "model_family": family}, prog=prog)
    name = prog or "tcdistill"
    if cfg.variant != variant or cfg.model_family != family:
        sys.exit(f"{name}: error: --variant {cfg.variant} / --model_family {cfg.model_family} contradict this entry point "
                 f"({variant}, {family}); use {SEED_SCRIPTS[cfg.variant, cfg.model_family]}.")
    from .checkpoint import CheckpointError
    from .data import DataError
    from .stops import Interrupted, NonFiniteError, loader_worker_death, peer_failure
    from .trainer import Trainer

    try:
        Trainer(cfg).train()
    except ConfigError as e:
        sys.exit(f"{name}: error: {e}")
    except Interrupted as e:  # 128 + the signal, as a shell reports a process the signal ended (SLURM requeues on it)
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except (DataError, NonFiniteError, CheckpointError) as e:
        sys.exit(f"{name}: error: {error_line(e)}")
    except RuntimeError as e:
        if (broken := peer_failure(e) or loader_worker_death(e)) is None:
            raise
        sys.exit(f"{name}: error: {broken}")


def main(argv: Sequence[str] | None = None) -> None:
    """`tcdistill {train-full,train-lora,demo,eval,bench,cache,generate,export,convert} [flags]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train = {"train-full": "full", "train-lora": "lora"}
    cmd = argv[0] if argv else ""
    if cmd in train:
        # The family comes from its flag, and `--model_family sdxl` gets the SDXL scripts' flag defaults too
        # (resolution 1024, w_min 3, filters), as train_tcd_distill_*sdxl_wds.py do.
        from .argparsing import OneLineParser

        pre = OneLineParser(prog=f"tcdistill {cmd}", add_help=False)  # its errors are the training parser's one line
        pre.add_argument("--model_family", default="sd")
        family = pre.parse_known_args(argv[1:])[0].model_family
        return train_main(train[cmd], argv[1:], prog=f"tcdistill {cmd}", family=family)
    if cmd in SUBCOMMANDS:
        try:
            mod = importlib.import_module(SUBCOMMANDS[cmd])
        except ModuleNotFoundError as e:
            if e.name == SUBCOMMANDS[cmd]:
                sys.exit(f"tcdistill {cmd}: not available in this build")
            raise
        mod.main(argv[1:])  # not returned: the console-script wrapper would sys.exit() a returned dict (status 1)
        return None
    usage = f"usage: tcdistill {{{','.join([*train, *SUBCOMMANDS])}}} [flags]   (each takes --help)"
    if cmd in ("-h", "--help"):  # asked for: stdout and status 0, as argparse's own --help
        print(usage)
        return None
    sys.exit(usage)


if __name__ == "__main__":  # `python -m tcdistill.cli ...`, as the console script
    main()
