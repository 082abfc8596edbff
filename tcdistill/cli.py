"""Entry points: the seed scripts' `main(variant)` and the `tcdistill` command."""

from __future__ import annotations

import sys
from typing import Sequence


def train_main(variant: str, argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parse flags for `variant` ('full' or 'lora') and run the trainer; config errors exit with one line."""
    from .config import ConfigError, parse_config

    cfg = parse_config(argv, defaults={"variant": variant}, prog=prog)
    from .trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except ConfigError as e:
        sys.exit(f"{prog or 'tcdistill'}: error: {e}")
    trainer.train()


def main(argv: Sequence[str] | None = None) -> None:
    """`tcdistill train-full|train-lora ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = {"train-full": "full", "train-lora": "lora"}
    if not argv or argv[0] not in cmds:
        sys.exit(f"usage: tcdistill {{{','.join(cmds)}}} [flags]   (see --help of each)")
    train_main(cmds[argv[0]], argv[1:], prog=f"tcdistill {argv[0]}")
