"""Kohya-format LoRA export: key format, alpha = PEFT scale x rank, and samples equal to the diffusers file's."""

from __future__ import annotations

import os
import re
import stat
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_lora, randomize_lora_b, sample  # noqa: E402

from tcdistill.export import KOHYA_WEIGHT_NAME, LORA_WEIGHT_NAME, _peft_scale, export_kohya  # noqa: E402

RANK, ALPHA = 4, 8  # alpha != rank, so a converter that assumed scale 1 would give different samples
pytestmark = pytest.mark.usefixtures("one_thread")


def test_kohya_keys_and_alpha(tiny_teacher: Path, tmp_path: Path) -> None:
    """Every diffusers pair becomes lora_unet_<module>.lora_down/lora_up with alpha = lora_alpha (scale alpha / rank)."""
    src = load_file(make_lora(tiny_teacher, tmp_path) / LORA_WEIGHT_NAME)
    dst = load_file(export_kohya(tmp_path))
    key_re = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(key_re.match(k) for k in dst), [k for k in dst if not key_re.match(k)][:3]
    modules = {k.split(".")[0] for k in dst}
    assert len(modules) == len(src) // 2 and len(dst) == 3 * len(modules)
    assert {float(dst[f"{m}.alpha"]) for m in modules} == {float(ALPHA)}
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(dst[f"{name}.lora_down.weight"], src[f"{prefix}.lora_A.weight"])
    assert torch.equal(dst[f"{name}.lora_up.weight"], src[f"{prefix}.lora_B.weight"])
    from safetensors import safe_open

    with safe_open(export_kohya(tmp_path), framework="pt") as fh:  # what kohya's tools read to tell a LoRA from a LyCORIS
        assert fh.metadata()["ss_network_module"] == "networks.lora"
    # Readable by others under the usual umask (safetensors 0.8 alone writes 0600).
    old_mask = os.umask(0o022)
    try:
        os.chmod(export_kohya(tmp_path), 0o600)  # (a re-export replaces the file and its mode)
        assert stat.S_IMODE(os.stat(export_kohya(tmp_path)).st_mode) == 0o644
    finally:
        os.umask(old_mask)
    # Outputs saved in the older mixed-key layout export to the same kohya file.
    mixed = load_file(export_kohya(make_lora(tiny_teacher, tmp_path / "mixed", mixed_keys=True)))
    assert mixed.keys() == dst.keys() and all(torch.equal(mixed[k], dst[k]) for k in dst)


def test_kohya_file_samples_like_diffusers_file(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`tcdistill export --lora DIR` writes a file that diffusers' loader reads as kohya and samples identically."""
    from diffusers import StableDiffusionPipeline

    from tcdistill.cli import main

    make_lora(tiny_teacher, tmp_path)
    main(["export", "--lora", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(tmp_path / KOHYA_WEIGHT_NAME)
    base = sample(StableDiffusionPipeline.from_pretrained(tiny_teacher))
    outs = []
    for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher)
        pipe.load_lora_weights(tmp_path, weight_name=name)
        outs.append(sample(pipe))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    assert np.abs(outs[0] - base).max() > 1e-2


def test_peft_scale_variants() -> None:
    """Scale = alpha / r, or alpha / sqrt(r) with rsLoRA; alpha_pattern overrides; no metadata means scale 1."""
    assert _peft_scale("down_blocks.0.x", 4, {}) == 1.0
    assert _peft_scale("down_blocks.0.x", 4, {"lora_alpha": 8}) == 2.0
    assert _peft_scale("down_blocks.0.x", 4, {"lora_alpha": 8, "use_rslora": True}) == 4.0
    conf = {"lora_alpha": 8, "alpha_pattern": {"to_q": 2}}
    assert _peft_scale("mid_block.attentions.0.to_q", 4, conf) == 0.5
    assert _peft_scale("mid_block.attentions.0.to_k", 4, conf) == 2.0


def test_export_rejects_bad_input(tiny_teacher: Path, tmp_path: Path) -> None:
    """A missing file or a non-LoRA safetensors file is a one-line error (exit 2), not a traceback."""
    from tcdistill.export import main

    with pytest.raises(SystemExit) as exc:
        main(["--lora", str(tmp_path / "nothing")])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="not a diffusers UNet LoRA"):
        export_kohya(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "x.safetensors")


def test_export_of_a_checkpoints_lora_file_names_the_output_folder(tmp_path: Path) -> None:
    """QA: `tcdistill export --lora OUT/checkpoint-3/lora.safetensors` (resume state, bare PEFT keys) said only "not a diffusers
    UNet LoRA file"; the checkpoint folder itself got the hint to pass the output folder, its file did not."""
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    save_file({"conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3), "conv_in.lora_B.weight": torch.zeros(8, 4, 1, 1)}, ckpt / "lora.safetensors")
    with pytest.raises(ValueError, match=rf"not a diffusers UNet LoRA file .*checkpoint-3 is a training checkpoint .*output folder {re.escape(str(tmp_path))}"):
        export_kohya(ckpt / "lora.safetensors", tmp_path / "k.safetensors")


def test_export_refuses_to_overwrite_its_input_or_a_folder(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """QA: --output equal to the input would replace the diffusers LoRA by the kohya copy; --output a folder and a
    file that is not safetensors gave tracebacks (and a left-over .tmp file). All three are one-line errors now."""
    from tcdistill.export import main

    out = make_lora(tiny_teacher, tmp_path / "lora")
    src = out / LORA_WEIGHT_NAME
    before = src.read_bytes()
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    for argv, needle in (([str(out), "--output", str(src)], "is the input file"), ([str(out), "--output", str(tmp_path)], "is a directory"),
                         ([str(tmp_path / "junk.safetensors")], "cannot read")):
        with pytest.raises(SystemExit) as exc:
            main(["--lora", *argv])
        assert exc.value.code == 2 and needle in capsys.readouterr().err
    assert src.read_bytes() == before and not list(tmp_path.glob(".*tmp-*"))


# SDXL base 1.0's UNet layout (no weights needed for names).
SDXL_BASE_UNET = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2,
                  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "addition_embed_type": "text_time"}


def test_sgm_names_of_sdxl_modules() -> None:
    """The original-UNet names kohya's SDXL LoRAs use (and that A1111 and ComfyUI look up directly)."""
    from tcdistill.export import sgm_module_name

    for diffusers_name, sgm in (("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
                                ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
                                ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
                                ("down_blocks.2.resnets.0.conv_shortcut", "input_blocks.7.0.skip_connection"),
                                ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
                                ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
                                ("up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2", "output_blocks.2.1.transformer_blocks.9.ff.net.2"),
                                ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),  # A1111 maps the diffusers name to .2.1.conv
                                ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
                                ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
                                ("conv_in", "input_blocks.0.0"), ("add_embedding.linear_2", "label_emb.0.2"), ("time_embedding.linear_1", "time_embed.0")):
        assert sgm_module_name(diffusers_name, SDXL_BASE_UNET) == sgm, diffusers_name
    # Layers per block as a list (up blocks take it reversed), and an upsampler in an up block without attention.
    other = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": [1, 2],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    for diffusers_name, sgm in (("down_blocks.1.resnets.1.conv1", "input_blocks.4.0.in_layers.2"),
                                ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
                                ("up_blocks.1.resnets.1.conv2", "output_blocks.4.0.out_layers.3")):
        assert sgm_module_name(diffusers_name, other) == sgm, diffusers_name


def test_sdxl_kohya_file_uses_sgm_names_and_samples_like_diffusers_file(sdxl_teacher: Path, tmp_path: Path) -> None:
    """QA: an SDXL run's kohya file named its modules diffusers-style (`lora_unet_up_blocks_0_upsamplers_0_conv`), which A1111
    maps with SD 1.x's block layout, silently dropping SDXL's first upsampler. `tcdistill export` of an SDXL run (the teacher
    named in its tcdistill_config.json) now writes kohya's SDXL (sgm) names, and diffusers reads them back to the same UNet."""
    import json

    from diffusers import StableDiffusionXLPipeline

    extra = ("conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2")
    make_lora(sdxl_teacher, tmp_path, extra=extra)
    (tmp_path / "tcdistill_config.json").write_text(json.dumps({"model_family": "sdxl", "pretrained_teacher_model": str(sdxl_teacher)}))
    dst = load_file(export_kohya(tmp_path))
    modules = {k.split(".")[0] for k in dst}
    assert not [m for m in modules if re.search(r"down_blocks|mid_block|up_blocks|conv_in|conv_out|embedding", m)], sorted(modules)[:5]
    # The tiny UNet: one layer per block; its first up block has cross-attention, so its upsampler is output_blocks.1.2.
    assert {"lora_unet_output_blocks_1_2_conv", "lora_unet_input_blocks_2_0_op", "lora_unet_input_blocks_0_0", "lora_unet_out_2",
            "lora_unet_time_embed_0", "lora_unet_label_emb_0_2", "lora_unet_middle_block_1_proj_in"} <= modules
    assert {float(dst[f"{m}.alpha"]) for m in modules} == {float(ALPHA)} and len(modules) == len(load_file(tmp_path / LORA_WEIGHT_NAME)) // 2
    if Version(version("diffusers")) < Version("0.39"):
        # diffusers < 0.39 reads no kohya SDXL module outside the blocks (time_embed, label_emb, input_blocks.0.0, out.2):
        # "Checkpoint not supported because layer lora_unet_label_emb_0_2.alpha"; ComfyUI and A1111 do. Read back the rest.
        make_lora(sdxl_teacher, tmp_path)
        modules = {k.split(".")[0] for k in load_file(export_kohya(tmp_path))}
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_teacher)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    weights = {}
    for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        pipe.load_lora_weights(tmp_path, weight_name=name, adapter_name=name.split(".")[0])
        pipe.fuse_lora(adapter_names=[name.split(".")[0]])
        weights[name] = {k.replace(".base_layer", ""): v.clone() for k, v in pipe.unet.state_dict().items() if "lora" not in k}
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    a, b = weights.values()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    changed = {k.rsplit(".", 1)[0] for k in a if not torch.allclose(a[k], base[k], atol=1e-4)}
    assert "up_blocks.0.upsamplers.0.conv" in changed and len(changed) == len(modules)  # every LoRA module was applied


def test_kohya_file_names_its_base_model_version_as_a1111_reads_it(sdxl_teacher: Path, tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: the kohya file's metadata named no base model, which A1111 takes for SD 1.x: its Lora tab (by default) hid an SDXL
    run's kohya file while an SDXL model was loaded (and an SD 2.x one under SD 2.x). It now carries kohya's tags."""
    import json

    from safetensors import safe_open

    xl = make_lora(sdxl_teacher, tmp_path / "xl")
    (xl / "tcdistill_config.json").write_text(json.dumps({"model_family": "sdxl", "pretrained_teacher_model": str(sdxl_teacher)}))
    with safe_open(export_kohya(xl), framework="pt") as fh:
        assert fh.metadata()["ss_base_model_version"] == "sdxl_base_v1-0" and fh.metadata()["ss_network_module"] == "networks.lora"
    from tcdistill.export import kohya_base_tags

    # Without a config (an SD run's export reads none), the width of the LoRA's cross-attention keys tells the version.
    for width, tags in ((768, {"ss_base_model_version": "sd_v1", "ss_v2": "False"}), (1024, {"ss_base_model_version": "sd_v2", "ss_v2": "True"}),
                        (2048, {"ss_base_model_version": "sdxl_base_v1-0"}), (32, {})):
        for key in ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight", "unet.x.attn2.to_v.lora.down.weight"):
            assert kohya_base_tags({key: torch.zeros(4, width), "unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3)}) == tags, (width, key)
    assert kohya_base_tags({}, {"cross_attention_dim": 1024})["ss_v2"] == "True" and kohya_base_tags({}, {"cross_attention_dim": [768, 768]}) == {}
    with safe_open(export_kohya(make_lora(tiny_teacher, tmp_path / "sd")), framework="pt") as fh:  # a tiny UNet's width: no tag
        assert "ss_base_model_version" not in fh.metadata()


def test_a_lora_file_missing_half_of_a_pair_is_refused() -> None:
    """A lora_A without its lora_B (a damaged or hand-edited file) was a raw KeyError; now one ValueError naming it."""
    from tcdistill.export import to_kohya

    sd = {"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(8, 4, 1, 1),
          "unet.conv_out.lora_A.weight": torch.zeros(4, 8, 3, 3)}
    with pytest.raises(ValueError, match=r"1 module\(s\) lack their lora_A or lora_B weight, such as \['unet.conv_out'\]"):
        to_kohya(sd)
    assert len(to_kohya({k: v for k, v in sd.items() if "conv_out" not in k})) == 3  # down, up, alpha


def test_to_kohya_refuses_what_it_cannot_convert_and_keeps_sd_names() -> None:
    import json

    from tcdistill.export import to_kohya

    pair = {"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.zeros(8, 4, 1, 1)}
    with pytest.raises(ValueError, match="DoRA"):
        to_kohya(pair, {"lora_adapter_metadata": json.dumps({"unet.use_dora": True, "unet.r": 4})})
    with pytest.raises(ValueError, match="not a diffusers UNet LoRA"):  # a text-encoder LoRA has no place in a UNet file
        to_kohya({**pair, "text_encoder.q_proj.lora_A.weight": torch.zeros(4, 8), "text_encoder.q_proj.lora_B.weight": torch.zeros(8, 4)})
    sd_unet = {**SDXL_BASE_UNET, "addition_embed_type": None}  # an SD UNet's modules keep their diffusers-style names
    assert set(to_kohya(pair, unet_config=sd_unet)) == {"lora_unet_conv_in.lora_down.weight", "lora_unet_conv_in.lora_up.weight",
                                                         "lora_unet_conv_in.alpha"}


def test_export_of_a_failed_write_leaves_no_file(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    make_lora(tiny_teacher, tmp_path)

    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_kohya(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LORA_WEIGHT_NAME]


def test_an_sd_runs_export_reads_no_teacher_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Only an SDXL run's modules get original-UNet names: an SD run's teacher (maybe an uncached hub id) is not read."""
    from tcdistill.export import run_unet_config

    assert run_unet_config({"model_family": "sd", "pretrained_teacher_model": str(tmp_path / "gone")}) is None
    assert capsys.readouterr().err == ""


def test_an_sdxl_lora_file_outside_its_run_folder_exports_with_base(sdxl_teacher: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """QA: an SDXL LoRA file moved out of its training output (no tcdistill_config.json beside it to name the teacher) was
    exported silently with diffusers-style names, which A1111 maps with SD 1.x's layout for SDXL. `tcdistill export --base
    MODEL` names the modules from that model's UNet, as the export of the run folder does; without it the export warns."""
    import json
    import shutil

    from tcdistill.cli import main

    run = make_lora(sdxl_teacher, tmp_path / "run")
    (run / "tcdistill_config.json").write_text(json.dumps({"model_family": "sdxl", "pretrained_teacher_model": str(sdxl_teacher)}))
    in_run = load_file(export_kohya(run))
    bare = tmp_path / "elsewhere" / "my_sdxl_lora.safetensors"
    bare.parent.mkdir()
    shutil.copy(run / LORA_WEIGHT_NAME, bare)
    main(["export", "--lora", str(bare)])
    assert "pass --base" in capsys.readouterr().err
    main(["export", "--lora", str(bare), "--base", str(sdxl_teacher)])
    assert capsys.readouterr().err == ""
    out = load_file(bare.with_name(KOHYA_WEIGHT_NAME))
    assert out.keys() == in_run.keys() and all(torch.equal(out[k], in_run[k]) for k in out)
    assert any(k.startswith("lora_unet_output_blocks_") for k in out)
    main(["export", "--lora", str(run)])  # a run folder names its family: no warning
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exc:
        main(["export", "--lora", str(bare), "--base", str(tmp_path / "missing")])
    assert exc.value.code == 2 and "error: --base " in capsys.readouterr().err


def test_only_an_sdxl_like_lora_without_a_named_family_warns(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Mutation QA: the "pass --base" warning was pinned for an SDXL file only: taking any LoRA with attention in down
    block 1 (SD 1.x's too), or one with no attention layers, as SDXL-like, or warning for a run folder whose config names
    the SD family, passed every test."""
    import json

    from tcdistill.export import _sdxl_like

    t = torch.zeros(1)
    attn = {b: f"unet.down_blocks.{b}.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" for b in (0, 1, 2)}
    conv = "unet.down_blocks.0.resnets.0.conv1.lora_A.weight"
    assert _sdxl_like({attn[1]: t, attn[2]: t, conv: t})
    assert not _sdxl_like({attn[0]: t, attn[1]: t, conv: t})  # SD 1.x/2.x: attention in down block 0 too
    assert not _sdxl_like({conv: t})  # no attention layers: nothing says SDXL
    run = make_lora(tiny_teacher, tmp_path / "run")  # the tiny SD UNet keeps attention off block 0: laid out like SDXL
    (run / "tcdistill_config.json").write_text(json.dumps({"model_family": "sd", "pretrained_teacher_model": str(tiny_teacher)}))
    export_kohya(run)
    assert capsys.readouterr().err == ""


def test_export_reads_the_run_config_once(tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: without a UNet config, export read the run's tcdistill_config.json twice: once for an SDXL run's teacher and
    again for the SDXL-like warning. It is read once and handed to both."""
    import json

    import tcdistill.run_outputs as run_outputs

    reads = []
    real = run_outputs.run_config
    monkeypatch.setattr(run_outputs, "run_config", lambda path: reads.append(path) or real(path))
    make_lora(tiny_teacher, tmp_path)
    (tmp_path / "tcdistill_config.json").write_text(json.dumps({"pretrained_teacher_model": str(tiny_teacher)}))
    assert Path(export_kohya(tmp_path)).name == KOHYA_WEIGHT_NAME and len(reads) == 1


def test_export_into_an_output_folder_lists_the_kohya_file_in_its_card(tiny_teacher: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """QA: after a later `tcdistill export`, the output folder's model card (uploaded as it is by a later push) still
    listed only the diffusers LoRA file. Export now adds the kohya file to the card's file list, once; a README that is
    not a tcdistill card, or a kohya file written elsewhere, leaves the README as it was."""
    from tcdistill.config import TrainConfig
    from tcdistill.export import main
    from tcdistill.modelcard import write_model_card

    out, other = make_lora(tiny_teacher, tmp_path / "out"), make_lora(tiny_teacher, tmp_path / "other")
    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url="s/{0..9}.tar", output_dir=str(out),
                      max_train_steps=1, variant="lora", model_family="sd")
    write_model_card(cfg, [str(out / LORA_WEIGHT_NAME)])
    (other / "README.md").write_text(f"Files:\n- `{LORA_WEIGHT_NAME}`\n")
    main(["--lora", str(out)])
    main(["--lora", str(out)])
    main(["--lora", str(out), "--output", str(tmp_path / "elsewhere.safetensors")])
    main(["--lora", str(other)])
    card = (out / "README.md").read_text()
    assert f"Files:\n- `{LORA_WEIGHT_NAME}`\n- `{KOHYA_WEIGHT_NAME}`\n\n" in card and card.count(KOHYA_WEIGHT_NAME) == 1
    assert (other / "README.md").read_text() == f"Files:\n- `{LORA_WEIGHT_NAME}`\n"


def test_export_beside_a_readme_that_is_not_utf8_succeeds(tiny_teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Review: export into a LoRA folder whose README.md is another tool's, in UTF-16 (or latin-1), wrote the kohya file
    and then exited 2 with `error: 'utf-8' codec can't decode ...` from the card update. Such a README is no tcdistill
    card (those are UTF-8): it is left as it is and the export succeeds."""
    from tcdistill.export import main

    lora = make_lora(tiny_teacher, tmp_path)
    readme = "Files:\n- `a.safetensors`\n".encode("utf-16")
    (lora / "README.md").write_bytes(readme)
    main(["--lora", str(lora)])
    assert capsys.readouterr().out.strip() == str(lora / KOHYA_WEIGHT_NAME) and (lora / "README.md").read_bytes() == readme


# UNet layouts unlike the tiny teachers' (one layer per level, no attention on the first): attention on every level, two
# layers per block, linear projections, no mid block (SD); three levels, two layers per block, deeper transformers (SDXL).
OTHER_LAYOUTS = {
    "sd": dict(down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2, layers_per_block=2,
               use_linear_projection=True, mid_block_type=None),
    "sdxl": dict(layers_per_block=2, transformer_layers_per_block=[1, 1, 2]),
}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lora_of_other_unet_layouts_adapts_every_target_and_loads_back(family: str, tiny_shards: str, tmp_path: Path) -> None:
    """QA, teachers shaped unlike the tiny ones: the LoRA run adapts every module the spec's target list names, and its
    diffusers file and its kohya export (SDXL: sgm names) load back through `load_lora_weights` to the student's UNet."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    from tcdistill.config import TrainConfig
    from tcdistill.tiny import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
    from tcdistill.trainer import Trainer

    sdxl = family == "sdxl"
    pipe = build_tiny_sdxl_pipeline(None, block_out_channels=(16, 32, 32)) if sdxl else build_tiny_sd_pipeline(None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.register_modules(unet=UNet2DConditionModel.from_config(pipe.unet.config, **OTHER_LAYOUTS[family]))
    pipe.save_pretrained(tmp_path / "teacher", safe_serialization=True)
    cfg = TrainConfig(pretrained_teacher_model=str(tmp_path / "teacher"), train_shards_path_or_url=tiny_shards, output_dir=str(tmp_path),
                      resolution=32, max_train_steps=1, variant="lora", lora_rank=RANK, lora_alpha=ALPHA, model_family=family,
                      min_image_size=0, w_min=3.0)
    strategy = Trainer(cfg).strategy
    student = strategy.student
    randomize_lora_b(student)  # no training needed: random adapters, so that a dropped module shows
    adapted = {n for n, m in student.named_modules() if isinstance(m, LoraLayer)}
    named = {n for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
             and any(n == t or n.endswith("." + t) for t in cfg.lora_modules)}
    mark = "down_blocks.2.attentions.1.transformer_blocks.1." if sdxl else "down_blocks.0.attentions.1."  # the new layout's parts
    assert named == adapted and any(n.startswith(mark) for n in adapted), sorted(named ^ adapted)
    strategy.save_outputs(str(tmp_path))
    export_kohya(tmp_path, unet_config=dict(student.config))
    gen = torch.Generator().manual_seed(0)
    x, states = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 16, pipe.unet.config.cross_attention_dim, generator=gen)
    added = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 16, generator=gen), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}}
    kw = {"encoder_hidden_states": states, **(added if sdxl else {})}
    with torch.no_grad():
        want = student.eval()(x, 499, **kw).sample
        assert (want - pipe.unet(x, 499, **kw).sample).abs().max() > 1e-2  # the adapters change the output
        for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME):
            loaded = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(tmp_path / "teacher")
            loaded.load_lora_weights(tmp_path, weight_name=name)
            torch.testing.assert_close(loaded.unet(x, 499, **kw).sample, want, rtol=1e-5, atol=1e-5, msg=name)


def test_kohya_file_records_the_runs_clip_skip_as_kohya_counts_it(tiny_teacher: Path, tmp_path: Path) -> None:
    """QA: the kohya file wrote no ss_clip_skip, which sd-scripts writes (str(args.clip_skip): "None" without it) and A1111
    and ComfyUI users read. It is the run's --clip_skip in kohya's count (hidden_states[-N]: diffusers' clip_skip + 1 on SD,
    + 2 on SDXL), "None" for a run without it, absent where no run record tells; with --base too."""
    import json

    from safetensors import safe_open

    from tcdistill.cli import main
    from tcdistill.export import kohya_clip_skip_tag

    def tag(path: str | Path) -> str | None:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata().get("ss_clip_skip")

    run = make_lora(tiny_teacher, tmp_path / "run")
    assert tag(export_kohya(run)) is None  # no run record: nothing to tell
    record = {"model_family": "sd", "pretrained_teacher_model": str(tiny_teacher)}
    (run / "tcdistill_config.json").write_text(json.dumps(record))
    assert tag(export_kohya(run)) == "None"
    (run / "tcdistill_config.json").write_text(json.dumps({**record, "clip_skip": 1}))
    assert tag(export_kohya(run)) == "2"  # diffusers' clip_skip=1: A1111's "Clip skip 2"
    main(["export", "--lora", str(run), "--base", str(tiny_teacher), "--output", str(tmp_path / "base.safetensors")])
    assert tag(tmp_path / "base.safetensors") == "2"
    assert kohya_clip_skip_tag({"model_family": "sdxl", "clip_skip": 1}) == {"ss_clip_skip": "3"}
    assert kohya_clip_skip_tag({"model_family": "sdxl"}) == {"ss_clip_skip": "None"} and kohya_clip_skip_tag({}) == {}


def test_a_later_run_rewrites_the_kohya_exports_beside_the_lora_it_saves(tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """QA: a run with --export_kohya (or a `tcdistill export --output` into the folder), then a resume that trained on
    without the flag: the new LoRA was saved beside the old kohya files, now exports of the earlier LoRA, dropped from the
    rewritten card's file list but uploaded by a push. The save now rewrites each from the new LoRA (and the card lists
    them); a .safetensors file there that is no export of it (another run's LoRA exported into the folder) is left alone."""
    from safetensors.torch import save_file

    from tcdistill.config import TrainConfig
    from tcdistill.trainer import Trainer

    out = tmp_path / "out"
    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher), train_shards_path_or_url=tiny_shards, output_dir=str(out),
                      resolution=32, max_train_steps=1, variant="lora", lora_rank=RANK, lora_alpha=ALPHA, report_to="none")
    strategy = Trainer(cfg).strategy
    randomize_lora_b(strategy.student, seed=0)
    assert strategy.save_outputs(str(out)) == [str(out / LORA_WEIGHT_NAME)]  # no export asked for, none there
    export_kohya(out)
    export_kohya(out, out / "mine.safetensors")
    save_file({"w": torch.ones(1)}, str(out / "other.safetensors"))
    # Another folder's LoRA, also named pytorch_lora_weights.safetensors, exported here: no export of this run's LoRA.
    theirs = load_file(export_kohya(make_lora(tiny_teacher, tmp_path / "elsewhere"), out / "theirs.safetensors"))
    (out / "notes.safetensors").write_text("not a safetensors file")
    randomize_lora_b(strategy.student, seed=1)  # the LoRA trained on
    paths = strategy.save_outputs(str(out))
    assert sorted(Path(p).name for p in paths) == sorted([LORA_WEIGHT_NAME, "mine.safetensors", KOHYA_WEIGHT_NAME])
    now = load_file(export_kohya(out, tmp_path / "now.safetensors"))
    for name in ("mine.safetensors", KOHYA_WEIGHT_NAME):
        written = load_file(out / name)
        assert written.keys() == now.keys() and all(torch.equal(written[k], now[k]) for k in now), name
    assert torch.equal(load_file(out / "other.safetensors")["w"], torch.ones(1))
    assert all(torch.equal(load_file(out / "theirs.safetensors")[k], v) for k, v in theirs.items())
