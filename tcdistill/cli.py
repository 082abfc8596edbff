"""Entry points: the seed scripts' `train_main(variant)` and the `tcdistill` command with its subcommands."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Sequence

# subcommand -> module with `main(argv)`; each module owns its own flags.
SUBCOMMANDS = {
    "demo": "tcdistill.demo",
    "eval": "tcdistill.evaluate",
    "bench": "tcdistill.bench",
    "cache": "tcdistill.cache",
    "generate": "tcdistill.generate",
    "export": "tcdistill.export",
}


def train_main(variant: str, argv: Sequence[str] | None = None, prog: str | None = None, family: str = "sd",
               defaults: dict[str, Any] | None = None) -> None:
    """Parse flags for `variant` ('full' or 'lora') and `family` and run the trainer; config errors exit with one line.

    `defaults` overrides flag defaults for an entry script (the SDXL scripts' resolution 1024, w_min 3, filters).
    """
    from .config import ConfigError, parse_config

    cfg = parse_config(argv, defaults={**(defaults or {}), "variant": variant, "model_family": family}, prog=prog)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .trainer import NonFiniteError, Trainer

    name = prog or "tcdistill"
    try:
        Trainer(cfg).train()
    except ConfigError as e:
        sys.exit(f"{name}: error: {e}")
    except (DataError, NonFiniteError, CheckpointError) as e:
        # A DataLoader worker's error arrives wrapped with its traceback text; its last line is the message.
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        sys.exit(f"{name}: error: {lines[-1] if lines else type(e).__name__}")


def main(argv: Sequence[str] | None = None) -> None:
    """`tcdistill {train-full,train-lora,demo,eval,bench,cache,generate,export} [flags]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train = {"train-full": "full", "train-lora": "lora"}
    cmd = argv[0] if argv else ""
    if cmd in train:
        return train_main(train[cmd], argv[1:], prog=f"tcdistill {cmd}")
    if cmd in SUBCOMMANDS:
        try:
            mod = importlib.import_module(SUBCOMMANDS[cmd])
        except ModuleNotFoundError as e:
            if e.name == SUBCOMMANDS[cmd]:
                sys.exit(f"tcdistill {cmd}: not available in this build")
            raise
        mod.main(argv[1:])  # not returned: the console-script wrapper would sys.exit() a returned dict (status 1)
        return None
    sys.exit(f"usage: tcdistill {{{','.join([*train, *SUBCOMMANDS])}}} [flags]   (each takes --help)")
