"""The subcommands' and training scripts' argparse pieces: one-line errors and "(default: X)" in --help."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn, Sequence


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """An argparse formatter that appends "(default: X)" to an option's help, for the subcommands' --help."""

    # As the training scripts' --help does; left out where the text already speaks of its default or there is none to
    # show (None, False or empty).

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (action.option_strings and text is not argparse.SUPPRESS and "default" not in text.lower()
                and d is not None and d is not False and d is not argparse.SUPPRESS and d != []):
            shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
            text = f"{text} (default: {shown.replace('%', '%%')})".lstrip()
        return text


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `prog: error: message`: argparse printed the whole usage before it
    (73 lines for the training scripts, the error last), and an unknown flag names the nearest known one (a typo)."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            import difflib

            known = [o for a in self._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
            hints = [f"{arg} (did you mean {near[0]}?)" if arg.startswith("--") and (near := difflib.get_close_matches(
                arg.split("=")[0], known, n=1)) else arg for arg in extra]
            self.error(f"unrecognized arguments: {' '.join(hints)}; --help lists the flags")
        return ns

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")
