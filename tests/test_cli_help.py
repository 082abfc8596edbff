"""The `tcdistill` command line: `tcdistill train-*` with a family's script defaults, `python -m`, and the --help of the
dispatcher and of each subcommand."""

from __future__ import annotations

import argparse
import importlib

import pytest

from tcdistill.cli import SUBCOMMANDS, main
from tcdistill.config import TrainConfig
from tcdistill.families import SDXL_FLAG_DEFAULTS


def test_tcdistill_train_with_sdxl_family_gets_the_sdxl_script_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tcdistill train-full --model_family sdxl` trained with SD's defaults (512 px, w_min 5, no image filters)."""
    import tcdistill.trainer

    seen = []

    class FakeTrainer:
        def __init__(self, cfg: TrainConfig) -> None:
            seen.append(cfg)

        def train(self) -> None:
            pass

    monkeypatch.setattr(tcdistill.trainer, "Trainer", FakeTrainer)
    flags = ["--pretrained_teacher_model=t", "--train_shards_path_or_url=s.tar", "--max_train_steps=1"]
    main(["train-lora", *flags, "--model_family", "sdxl"])
    main(["train-full", *flags])
    assert [(c.variant, c.model_family) for c in seen] == [("lora", "sdxl"), ("full", "sd")]
    assert {k: getattr(seen[0], k) for k in SDXL_FLAG_DEFAULTS} == SDXL_FLAG_DEFAULTS
    assert seen[1].resolution == 512


def test_a_model_family_without_a_value_is_one_line_naming_the_command(capsys: pytest.CaptureFixture) -> None:
    """QA: `tcdistill train-lora --model_family` (no value) was the family pre-parser's usage and error, as `__main__.py`."""
    with pytest.raises(SystemExit):
        main(["train-lora", "--pretrained_teacher_model=t", "--model_family"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tcdistill train-lora: error: argument --model_family: expected one argument"], err


def test_python_dash_m_runs_the_cli() -> None:
    """`python -m tcdistill` and `python -m tcdistill.cli` are the console script (QA: the second silently did nothing)."""
    import subprocess
    import sys

    for mod in ("tcdistill", "tcdistill.cli"):
        proc = subprocess.run([sys.executable, "-m", mod, "nonsense"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "usage: tcdistill {train-full" in proc.stderr, (mod, proc.stderr[-500:])


def test_tcdistill_help_is_usage_on_stdout_and_status_0(capsys: pytest.CaptureFixture) -> None:
    """QA: `tcdistill --help` printed the usage to stderr and exited 1, as for an unknown subcommand."""

    for flag in ("--help", "-h"):
        main([flag])  # returns: no SystemExit
        assert capsys.readouterr().out.startswith("usage: tcdistill {train-full,train-lora,demo,")
    with pytest.raises(SystemExit) as e:
        main([])
    assert str(e.value).startswith("usage: tcdistill {")


@pytest.mark.parametrize("cmd", ["demo", "eval", "bench", "cache", "generate", "export"])
def test_subcommand_help_shows_every_default(cmd: str, capsys: pytest.CaptureFixture) -> None:
    """QA: `tcdistill eval --help` gave no default for --steps, --gamma, --reference_steps or --batch_size (nor demo for
    --output_dir, cache for --batch_size ...), where the training scripts' --help shows every default. Each option whose
    default is a value now shows it in its help line. QA: an option with no help text at all (eval's --batch_size, bench's
    --mixed_precision and --seed, cache's --interpolation_type) was skipped here, so its default went unshown: every
    option now has a help line."""
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines (also after a hyphen): compare without spaces
    mod = importlib.import_module(SUBCOMMANDS[cmd])
    if cmd == "export":  # its parser is built inside main: the flag with a default is --output
        assert "--outputOUTPUTOutputfile(default:" in text
        return
    parser = mod.build_parser()
    for action in parser._actions:
        d = action.default
        assert action.help or not action.option_strings, (action.option_strings, "has no help text")
        if action.help == argparse.SUPPRESS or not action.option_strings or d in (None, argparse.SUPPRESS) or d is False or d == []:
            continue
        help_text = "".join(parser._get_formatter()._expand_help(action).split())
        assert "default" in help_text.lower() and help_text in text, (action.option_strings, help_text)


@pytest.mark.parametrize("cmd", ["demo", "eval", "bench", "cache", "generate"])
def test_help_shows_a_default_once_and_none_for_switches(cmd: str, capsys: pytest.CaptureFixture) -> None:
    """Mutation QA: DefaultsHelpFormatter adding "(default: 4)" to generate's "TCD sampling steps (default: 4).", a
    "(default: False)" to every switch or "(default: None)" to an option without a default, or eval's --steps as
    "[1, 2, 4, 8, 20]" (not what one types) passed every test."""
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: False)" not in text and "(default: None)" not in text and "(default: [" not in text
    parser = importlib.import_module(SUBCOMMANDS[cmd]).build_parser()
    for action in parser._actions:
        if action.help not in (None, argparse.SUPPRESS):
            assert parser._get_formatter()._expand_help(action).lower().count("default") <= 1, action.option_strings
    if cmd == "eval":
        assert "(default: 1 2 4 8 20)" in text and "(default: 0.0 0.3)" in text



@pytest.mark.parametrize("cmd", ["demo", "eval", "bench", "cache", "generate", "export"])
def test_a_subcommands_bad_flag_is_one_line(cmd: str, capsys: pytest.CaptureFixture) -> None:
    """The subcommands' parsers printed the whole usage before argparse's error line (the training parser, OneLineParser,
    gives one line); a mistyped flag names the nearest one where no required flag is missing first."""
    with pytest.raises(SystemExit) as e:
        main([cmd, "--sede=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"tcdistill {cmd}: error: ") and "usage:" not in err[0], err
    if cmd in ("demo", "bench"):  # the others first miss a required flag (--teacher, --unet/--lora, ...), named instead
        assert "--sede=1 (did you mean --seed?)" in err[0], err
    else:
        assert "required" in err[0], err


def test_bench_help_names_each_presets_defaults() -> None:
    """QA: `tcdistill bench --help` gave --warmup and --steps no default (None: the preset's), where --batch_size,
    --resolution and --workers name each preset's; every preset-filled flag now names them."""
    from tcdistill.bench import PRESETS, build_parser

    parser = build_parser()
    helps = {a.dest: " ".join(parser._get_formatter()._expand_help(a).split()) for a in parser._actions if a.help}
    for key in PRESETS["tiny"]:
        expected = "preset default: " + ", ".join(f"{name} {PRESETS[name][key]}" for name in PRESETS)
        assert expected in helps[key], (key, helps[key])
