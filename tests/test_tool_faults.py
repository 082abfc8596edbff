"""Faults of the non-training commands `generate`, `eval` and `export`: a run killed part-way, a prompt file that cannot
be read, an output folder that a live training run holds or whose run record is damaged. Expected: one line naming the
file and the fix, and no output that looks whole but is not."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import full_output, lock_holder, make_lora, run_script, train_flags

from tcdistill.cli import main
from tcdistill.export import LORA_WEIGHT_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_rerun_killed_part_way_leaves_no_metadata_line_of_another_image(tiny_teacher: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: metadata.jsonl was written once, after the last image: a re-run killed part-way had replaced its first images
    while the earlier run's lines (its seed, steps, model) still described them. The lines of the images a run rewrites
    go first and each batch's lines follow its images; no half-written PNG or temporary file is left."""
    from diffusers import StableDiffusionPipeline

    lora = make_lora(tiny_teacher, tmp_path / "lora")
    out = tmp_path / "imgs"
    out.mkdir()
    (out / "metadata.jsonl").write_text('{"file_name": "mine.png", "prompt": "kept"}')  # no final newline
    argv = ["generate", "--lora", str(lora), "--base", str(tiny_teacher), "--prompt", "a red circle", "--prompt", "a blue square",
            "--steps", "1", "--output_dir", str(out)]
    main(argv)
    before = (out / "00000_a_red_circle.png").read_bytes()
    call = StableDiffusionPipeline.__call__
    calls = []

    def killed_at_the_second_batch(self: Any, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return call(self, *a, **kw)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", killed_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--seed", "5"])
    assert (out / "00000_a_red_circle.png").read_bytes() != before  # rewritten (seed 5)
    lines = [json.loads(ln) for ln in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(r["file_name"], r.get("seed")) for r in lines] == [("mine.png", None), ("00000_a_red_circle.png", 5)]
    # and the run lock's file, kept (a lock file removed while another run opens it would let two runs hold it)
    assert sorted(p.name for p in out.iterdir()) == [".tcdistill.lock", "00000_a_red_circle.png", "00001_a_blue_square.png",
                                                    "metadata.jsonl"]


def test_a_prompt_file_not_utf8_or_unreadable_is_one_line_naming_its_flag(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: a Latin-1 prompt file gave "error: 'utf-8' codec can't decode byte 0xe9 in position 3: invalid continuation
    byte", naming neither the file nor the flag; a missing one a bare "[Errno 2]". Eval reads its --prompts alike."""
    from tcdistill.evaluate import main as eval_main
    from tcdistill.generate import read_prompts

    latin1 = tmp_path / "p.txt"
    latin1.write_bytes("caf\xe9 red circle\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^--prompt_file {re.escape(str(latin1))} is not UTF-8 text \(.* at byte 3\); save it as UTF-8$"):
        read_prompts(None, str(latin1))
    for path in (tmp_path / "missing.txt", tmp_path):
        with pytest.raises(ValueError, match=rf"^--prompt_file {re.escape(str(path))} cannot be read: \w"):
            read_prompts(["x"], str(path))
    with pytest.raises(SystemExit) as info:
        eval_main(["--teacher", str(tiny_teacher), "--unet", str(tiny_teacher / "unet"), "--steps", "1", "--prompts", str(latin1)])
    assert str(info.value.code).startswith(f"tcdistill eval: error: --prompts {latin1} is not UTF-8 text")


def test_an_output_a_live_training_run_holds_or_with_a_damaged_run_record_is_one_line(
        tiny_teacher: Path, tmp_path: Path, run_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """QA: a training run started on a finished output folder writes its tcdistill_config.json at its start, its weights
    at its end: meanwhile generate sampled the earlier run's LoRA on the new run's grid (--num_ddim_timesteps 10 where
    the weights were trained on 50), and refused --steps past it. generate, eval and export now refuse a folder a live run
    holds, naming its pid; a run record that is not JSON was a bare parser message (eval: a traceback)."""
    from tcdistill.evaluate import main as eval_main

    out = make_lora(tiny_teacher, tmp_path / "run")
    (out / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": str(tiny_teacher), "num_ddim_timesteps": 10}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    gen = ["generate", "--lora", str(out), "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "imgs")]
    runs = {"generate": lambda: main(gen), "export": lambda: main(["export", "--lora", str(out / LORA_WEIGHT_NAME)]),
            "eval": lambda: eval_main(["--teacher", str(tiny_teacher), "--lora", str(out), "--prompts", str(prompts), "--steps", "1"])}
    with lock_holder(out, run_env) as holder:
        for name, run in runs.items():
            with pytest.raises(SystemExit) as info:
                run()
            msg = str(info.value.code) if name == "eval" else capsys.readouterr().err
            assert f"{out} is in use by a training run (pid {holder.pid}): its tcdistill_config.json is that run's" in msg, (name, msg)
            assert msg.strip().count("\n") == 0, (name, msg)
        # QA review: with --base, export read no run record and so skipped the check: it exported the earlier run's LoRA
        # beside the live run's future one, and listed it in a model card the live run rewrites at its end.
        with pytest.raises(SystemExit):
            main(["export", "--lora", str(out), "--base", str(tiny_teacher)])
        assert f"{out} is in use by a training run (pid {holder.pid})" in capsys.readouterr().err
    assert not (tmp_path / "imgs").exists() and not (out / "pytorch_lora_weights_kohya.safetensors").exists()
    runs["export"]()  # the run ended: the folder is its own again
    assert (out / "pytorch_lora_weights_kohya.safetensors").is_file()
    (out / "tcdistill_config.json").write_text('{"pretrained_teacher_model": "/some/tea')  # cut short
    for name, run in runs.items():
        with pytest.raises(SystemExit) as info:
            run()
        msg = str(info.value.code) if name == "eval" else capsys.readouterr().err
        assert f"{out / 'tcdistill_config.json'} cannot be read as the run's flags (Unterminated string" in msg, (name, msg)
    # export --base reads the flags for ss_clip_skip alone: the damaged record was refused with advice to pass --base
    from safetensors import safe_open

    main(["export", "--lora", str(out), "--base", str(tiny_teacher), "--output", str(tmp_path / "k.safetensors")])
    assert "cannot be read as the run's flags" in capsys.readouterr().err  # a warning: the file gets no ss_clip_skip
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert "ss_clip_skip" not in f.metadata()


def _stopped_at(step: int, *flags: str) -> None:
    """Run the LoRA seed script with `flags`, SIGTERMed (as a preemption) during `step`: it finishes the step, saves a
    checkpoint of it and exits 143 before its final save."""
    import os
    import signal

    from tcdistill.trainer import Trainer

    log = Trainer._log_step

    def preempted(self: Any, *a: Any) -> None:
        log(self, *a)
        if self.global_step == step - 1:  # the signal is read at the next step's end
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_log_step", preempted)
        with pytest.raises(SystemExit) as info:
            run_script("train_tcd_distill_lora_sd_wds.py", list(flags))
    assert info.value.code == 128 + signal.SIGTERM


def test_an_output_whose_run_stopped_before_its_final_save_is_refused_in_one_line(
        tiny_teacher: Path, tiny_shards: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """QA: a run writes its tcdistill_config.json at its start and its weights at its end. A finished run resumed for more
    steps (or a new run on its folder) and stopped by SIGTERM left the new run's record beside the earlier run's weights:
    generate, eval and export used them silently, with the stopped run's flags (here its grid, --num_ddim_timesteps 25
    where the LoRA was trained on 50). A run stopped before its first end gave a bare "no LoRA weights at ...". The record
    now holds the step of the final weights (null until the final save), and a stopped run's folder is refused."""
    from tcdistill.evaluate import main as eval_main

    out, prompts = tmp_path / "run", tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    gen = ["generate", "--lora", str(out), "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "imgs")]
    runs = {"generate": lambda: main(gen), "export": lambda: main(["export", "--lora", str(out / LORA_WEIGHT_NAME)]),
            "export --base": lambda: main(["export", "--lora", str(out), "--base", str(tiny_teacher)]),
            "eval": lambda: eval_main(["--teacher", str(tiny_teacher), "--lora", str(out), "--prompts", str(prompts), "--steps", "1"])}

    def refused(why: str) -> None:
        for name, run in runs.items():
            with pytest.raises(SystemExit) as info:
                run()
            msg = str(info.value.code) if name == "eval" else capsys.readouterr().err
            assert msg.strip().count("\n") == 0, (name, msg)
            assert (f"{out / 'tcdistill_config.json'} is of a training run that stopped before its final save, so {why}; resume "
                    "it (--resume_from_checkpoint latest: its newest checkpoint is checkpoint-") in msg, (name, msg)
        assert not (tmp_path / "imgs").exists() and not (out / "pytorch_lora_weights_kohya.safetensors").exists()

    quick = "--validation_steps=0"
    _stopped_at(2, *train_flags(tiny_teacher, tiny_shards, out, 3, quick))
    capsys.readouterr()
    refused("it has no final weights")
    run_script("train_tcd_distill_lora_sd_wds.py", train_flags(tiny_teacher, tiny_shards, out, 3, quick, "--resume_from_checkpoint=latest"))
    assert json.loads((out / "tcdistill_config.json").read_text())["final_step"] == 3
    _stopped_at(5, *train_flags(tiny_teacher, tiny_shards, out, 6, quick, "--resume_from_checkpoint=latest",
                                 "--num_ddim_timesteps=25"))
    assert json.loads((out / "tcdistill_config.json").read_text())["final_step"] is None
    capsys.readouterr()
    refused(f"the {LORA_WEIGHT_NAME} there is an earlier run's")


def test_an_output_passed_as_the_other_variant_is_one_line(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """QA: a LoRA run trained into a folder that held a full-model run kept its unet_target/: `generate --unet DIR` sampled
    that earlier run's UNet with the LoRA run's flags, silently (and a LoRA output passed as --unet, or a full one as
    --lora, was a bare "no UNet config.json" / "no LoRA weights"). The run record's variant now picks the flag."""
    from tcdistill.evaluate import main as eval_main

    out = full_output(tiny_teacher, tmp_path / "run")  # unet_target/ of an earlier full-model run
    make_lora(tiny_teacher, out)
    record = {"pretrained_teacher_model": str(tiny_teacher), "variant": "lora"}
    (out / "tcdistill_config.json").write_text(json.dumps(record))
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    gen = ["generate", "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "imgs")]
    for unet in (out, out / "unet_target"):
        with pytest.raises(SystemExit):
            main([*gen, "--unet", str(unet)])
        assert capsys.readouterr().err.splitlines()[-1] == (f"tcdistill generate: error: {out} is the output of a LoRA run (its "
                                                            "tcdistill_config.json): pass it as --lora; the unet_target there is an earlier run's")
    (out / "tcdistill_config.json").write_text(json.dumps({**record, "variant": "full"}))
    with pytest.raises(SystemExit) as info:
        eval_main(["--teacher", str(tiny_teacher), "--lora", str(out / LORA_WEIGHT_NAME), "--prompts", str(prompts), "--steps", "1"])
    assert str(info.value.code) == (f"tcdistill eval: error: {out} is the output of a full-model run (its tcdistill_config.json): "
                                    f"pass it as --unet; the {LORA_WEIGHT_NAME} there is an earlier run's")
    main([*gen, "--unet", str(out)])  # the right flag
    assert json.loads((tmp_path / "imgs" / "metadata.jsonl").read_text())["unet"] == str(out)

def test_an_eval_output_that_cannot_be_written_is_one_line_and_keeps_the_earlier_file(
        tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: `eval --output` was written in place after the sampling: a full disk cut an earlier JSON short under a
    traceback. It is written whole or not at all, and the failure is one line."""
    import errno

    from tcdistill.evaluate import main as eval_main

    prompts, out = tmp_path / "p.txt", tmp_path / "rows.json"
    prompts.write_text("a red circle\n")
    out.write_text('{"earlier": 1}')
    write_text = Path.write_text

    def full(path: Path, data: str, *a: Any, **kw: Any) -> int:
        write_text(path, data[:9], *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SystemExit) as info:
        eval_main(["--teacher", str(tiny_teacher), "--unet", str(tiny_teacher / "unet"), "--prompts", str(prompts),
                   "--steps", "1", "--gamma", "0", "--reference_steps", "2", "--output", str(out)])
    assert str(info.value.code) == (f"tcdistill eval: error: writing --output {out} failed (OSError: [Errno 28] No space left on "
                                    "device); the table above is complete")
    assert out.read_text() == '{"earlier": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["p.txt", "rows.json"]


def test_a_lora_file_lacking_some_weights_is_one_line_in_generate_and_eval(tiny_teacher: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """QA: a LoRA file missing some modules' lora_B weights (a damaged or cut-down copy) loaded silently with those weights
    on the meta device; generate and eval then stopped in `pipe.to()` on a "Cannot copy out of meta tensor" traceback.
    (`export` already refused it: test_a_lora_file_missing_half_of_a_pair_is_refused.)"""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tcdistill.evaluate import main as eval_main

    lora = make_lora(tiny_teacher, tmp_path / "lora")
    f = lora / LORA_WEIGHT_NAME
    with safe_open(str(f), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    dropped = [k for k in tensors if ".lora_B." in k][:3]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(f), metadata=meta)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(SystemExit):
        main(["generate", "--lora", str(lora), "--base", str(tiny_teacher), "--prompt", "x", "--steps", "1",
              "--output_dir", str(tmp_path / "imgs")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"tcdistill generate: error: {f} is not a complete LoRA file: 3 adapter weight(s) are missing"), err
    with pytest.raises(SystemExit) as info:
        eval_main(["--teacher", str(tiny_teacher), "--lora", str(lora), "--prompts", str(prompts), "--steps", "1"])
    assert f"{f} is not a complete LoRA file: 3 adapter weight(s)" in str(info.value.code)


def test_export_or_generate_with_a_base_the_lora_does_not_fit_is_one_line(tiny_teacher: Path, sdxl_teacher: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """QA: `export --lora SD_LORA --base SDXL_MODEL` wrote a kohya file without a word: the SD LoRA's modules got SDXL's
    original-UNet names and the `sdxl_base_v1-0` tag (A1111 then hides it from the SD model it belongs to). A LoRA whose
    modules are not in --base's UNet, or have other widths there, is refused, either way round; its own base exports."""
    sd_lora, xl_lora = make_lora(tiny_teacher, tmp_path / "sd"), make_lora(sdxl_teacher, tmp_path / "xl")
    for lora, base in ((sd_lora, sdxl_teacher), (xl_lora, tiny_teacher)):
        with pytest.raises(SystemExit) as info:
            main(["export", "--lora", str(lora), "--base", str(base), "--output", str(tmp_path / "k.safetensors")])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith(f"tcdistill export: error: the LoRA does not fit the UNet of --base {base}: "
                                                       "its module "), err
        assert "belongs to another base model; pass the model it was trained on as --base" in err and err.count("\n") == 1, err
        assert not (tmp_path / "k.safetensors").exists()
        # QA: generate said diffusers' first line ("Error(s) in loading state_dict for UNet2DConditionModel:"), naming no
        # module and not what to pass; it says export's line now.
        with pytest.raises(SystemExit):
            main(["generate", "--lora", str(lora), "--base", str(base), "--prompt", "x", "--output_dir", str(tmp_path / "imgs")])
        err = capsys.readouterr().err.splitlines()[-1]  # after the pipeline's loading bars
        assert err.startswith(f"tcdistill generate: error: the LoRA does not fit the UNet of --base {base}: its module "), err
        assert err.endswith("belongs to another base model; pass the model it was trained on as --base"), err
    main(["export", "--lora", str(xl_lora), "--base", str(sdxl_teacher), "--output", str(tmp_path / "k.safetensors")])
    assert (tmp_path / "k.safetensors").is_file()


def test_a_damaged_demo_classifier_is_one_line_naming_the_flag(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: `eval --classifier DIR` with a cut-short classifier.safetensors stopped on a SafetensorError traceback, and with
    a damaged classifier.json on a bare JSON parser line naming no file."""
    from tcdistill.demo.classifier import AttributeClassifier, save_classifier
    from tcdistill.evaluate import main as eval_main

    clf = tmp_path / "classifier"
    save_classifier(AttributeClassifier(), clf)
    weights = (clf / "classifier.safetensors").read_bytes()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    argv = ["--teacher", str(tiny_teacher), "--unet", str(tiny_teacher / "unet"), "--prompts", str(prompts), "--steps", "1",
            "--gamma", "0", "--reference_steps", "2", "--classifier", str(clf)]
    (clf / "classifier.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(SystemExit) as info:
        eval_main(argv)
    assert str(info.value.code).startswith(f"tcdistill eval: error: --classifier {clf}: cannot load it (SafetensorError: ")
    (clf / "classifier.safetensors").write_bytes(weights)
    (clf / "classifier.json").write_text('{"attributes": {')
    with pytest.raises(SystemExit) as info:
        eval_main(argv)
    assert str(info.value.code).startswith(f"tcdistill eval: error: --classifier {clf}: cannot load it (JSONDecodeError: ")


def test_a_base_with_a_cut_short_weight_file_is_one_line_naming_it(tiny_teacher: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """QA: a base (generate --base, eval --teacher) whose text encoder weights were cut short (an interrupted copy or
    download) stopped on a SafetensorError traceback: transformers lets it through. One line names the file now."""
    import shutil

    from tcdistill.evaluate import main as eval_main

    base = tmp_path / "base"
    shutil.copytree(tiny_teacher, base)
    damaged = base / "text_encoder" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    lora = make_lora(tiny_teacher, tmp_path / "lora")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(SystemExit):
        main(["generate", "--lora", str(lora), "--base", str(base), "--prompt", "x", "--steps", "1", "--output_dir", str(tmp_path / "i")])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"tcdistill generate: error: {damaged} cannot be read ("), err
    with pytest.raises(SystemExit) as info:
        eval_main(["--teacher", str(base), "--lora", str(lora), "--prompts", str(prompts), "--steps", "1"])
    assert str(info.value.code).startswith(f"tcdistill eval: error: {damaged} cannot be read (")
    assert str(info.value.code).endswith("a weight file cut short or damaged; copy or download it again")


def test_run_teacher_reads_the_runs_cache_dir_only_where_it_is_on_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: an output copied or pushed from the machine it trained on names that machine's --cache_dir: generate (no --base,
    as the card's command line) fetched the teacher into that path there (a folder made anew, or a PermissionError /
    offline 'not in the cache' line), not from this machine's hub cache. The revision names the trained teacher; the
    cache is only where it was kept, and one that is not here is not used."""
    from diffusers import DiffusionPipeline

    from tcdistill.run_outputs import run_teacher

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(lambda cls, base, **kw: calls.append(kw) or str(tmp_path)))
    gone = str(tmp_path / "elsewhere" / "hf")
    for cache, used in ((gone, None), (str(tmp_path), str(tmp_path))):
        assert run_teacher({"pretrained_teacher_model": "org/sd", "teacher_revision": "v1", "cache_dir": cache}) == str(tmp_path)
        assert calls.pop() == {"revision": "v1", "cache_dir": used}
    assert run_teacher({"pretrained_teacher_model": "org/sd", "cache_dir": gone}) == "org/sd" and not calls  # main, this cache
    assert not (tmp_path / "elsewhere").exists()


def test_a_runs_hub_vae_loads_from_its_cache_dir(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: a run trained with a hub --pretrained_vae_model_name_or_path read through its --cache_dir: generate (no --vae)
    loaded that VAE from the default cache, as the teacher before it ("tiny/vae does not appear to have a file named
    config.json" offline; a second download online). It comes from the run's cache now, as its teacher does."""
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--tiny--vae"
    shutil.copytree(tiny_teacher / "vae", repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    lora = make_lora(tiny_teacher, tmp_path / "run")
    (lora / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": str(tiny_teacher), "resolution": 32,
                                                             "pretrained_vae_model_name_or_path": "tiny/vae", "cache_dir": str(tmp_path / "hub")}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the VAE comes from the run's cache only
    main(["generate", "--lora", str(lora), "--prompt", "x", "--steps", "1", "--device", "cpu", "--output_dir", str(tmp_path / "imgs")])
    assert json.loads((tmp_path / "imgs" / "metadata.jsonl").read_text())["vae"] == "tiny/vae"


def test_a_second_generate_into_a_folder_in_use_is_refused_before_loading(tiny_teacher: Path, tmp_path: Path, run_env: dict[str, str],
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """QA: two `generate` runs on one --output_dir each rewrote metadata.jsonl without the lines of the images it replaces,
    dropping the lines the other had appended meanwhile. The folder is locked as a training run's is: the second run is
    refused in one line naming the holder, and leaves the first's files alone; the lock ends with the run (in-process too)."""
    from tcdistill import preflight

    lora = make_lora(tiny_teacher, tmp_path / "lora")
    out = tmp_path / "imgs"
    out.mkdir()
    (out / "metadata.jsonl").write_text('{"file_name": "00000_x.png", "prompt": "the first run"}\n')
    argv = ["generate", "--lora", str(lora), "--base", str(tiny_teacher), "--prompt", "x", "--steps", "1", "--output_dir", str(out)]
    with lock_holder(out, run_env, role="`tcdistill generate` run") as holder, pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(rf"tcdistill generate: error: --output_dir .* is in use by another `tcdistill generate` run \(pid {holder.pid}.*", err)
    assert "the first run" in (out / "metadata.jsonl").read_text() and not list(out.glob("*.png"))
    main(argv)  # its holder gone, a run goes ahead and lets go of the folder when it ends
    assert len(list(out.glob("*.png"))) == 1 and preflight.output_dir_holder(out) is None
    assert os.path.realpath(out) not in preflight._held_locks


def test_an_sdxl_export_reads_the_runs_cache_dir_only_where_it_is_on_this_machine(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: generate and eval read a run's hub teacher from its --cache_dir only where that folder is on this machine (an
    output copied from where it trained names that machine's), but export's SDXL names still read the teacher's UNet config
    from the recorded one: offline it warned and kept diffusers-style names where generate found the teacher, online it
    fetched into that path anew."""
    from diffusers import UNet2DConditionModel

    from tcdistill.export import run_unet_config

    calls: list[dict] = []
    monkeypatch.setattr(UNet2DConditionModel, "load_config", classmethod(lambda cls, src, **kw: calls.append(kw) or {"x": 1}))
    gone = str(tmp_path / "elsewhere" / "hf")
    for cache, used in ((gone, None), (str(tmp_path), str(tmp_path))):
        run = {"model_family": "sdxl", "pretrained_teacher_model": "org/sdxl", "teacher_revision": "v1", "cache_dir": cache}
        assert run_unet_config(run) == {"x": 1}
        assert calls.pop() == {"subfolder": "unet", "revision": "v1", "cache_dir": used}


def test_export_of_a_full_model_output_says_it_converts_loras_only(tiny_teacher: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """QA: `tcdistill export --lora OUT` of a full-model run said only "no LoRA weights at OUT/pytorch_lora_weights.safetensors
    (expected a training output folder ...)", though OUT is one: it names the folder's UNet and says export takes LoRAs."""
    out = full_output(tiny_teacher, tmp_path / "full")
    with pytest.raises(SystemExit) as exc:
        main(["export", "--lora", str(out)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert f"{out} is a full-model output (its UNet: {out / 'unet_target'}), not a LoRA: `tcdistill export` converts LoRAs only" in err


def test_a_generate_writing_into_a_finished_output_does_not_block_its_export(tiny_teacher: Path, tmp_path: Path,
                                                                             run_env: dict[str, str]) -> None:
    """QA: `tcdistill generate --lora OUT --output_dir OUT` holds OUT's lock while it writes its images there; export (and
    generate, eval) of OUT meanwhile were refused as "in use by a `tcdistill generate` run: its tcdistill_config.json is
    that run's and its weights are not yet", though generate writes neither. Only a training run's lock refuses them."""
    out = make_lora(tiny_teacher, tmp_path / "run")
    (out / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": str(tiny_teacher), "final_step": 1}))
    with lock_holder(out, run_env, role="`tcdistill generate` run"):
        main(["export", "--lora", str(out)])
    assert (out / "pytorch_lora_weights_kohya.safetensors").is_file()
