"""`tcdistill bench` on the tiny preset, and the optimisations it measures keep the loss: batched teacher, skipped
identity targets and the adapters-off LoRA teacher give the reference path's loss on a real tiny UNet (budget: ~60 s)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from conftest import randomize_lora_b

from tcdistill.bench import device_peak_tflops, main as bench_main
from tcdistill.config import TrainConfig
from tcdistill.schedule import TimestepDraw
from tcdistill.tcd import TCDDraw, TCDLoss


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_bench_tiny_compare_reports_every_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both variants, both modes, 2 timed steps: finite throughput, memory, FLOPs, split and ratios, JSON and table."""
    out = tmp_path / "bench.json"
    bench_main(["--preset", "tiny", "--variant", "full,lora", "--compare", "--steps", "2", "--warmup", "0", "--split-steps", "1",
                "--batch_size", "2", "--threads", "1", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["preset"] == "tiny" and res["device"] == "cpu" and res["peak_tflops"] is None
    assert res["cache"]["num_samples"] == 32  # the optimised mode trained from `tcdistill cache` output
    assert [r["variant"] for r in res["runs"]] == ["full", "lora"]
    for run in res["runs"]:
        ref, opt = run["modes"]["reference-like"], run["modes"]["optimised"]
        for m in (ref, opt):
            for k in ("samples_per_s", "step_time_ms", "step_time_median_ms", "cpu_time_ms", "flops_per_sample", "achieved_tflops"):
                assert _finite(m[k]) and m[k] > 0, (m["mode"], k, m[k])
            assert _finite(m["warmup_s"]) and m["warmup_s"] >= 0
            assert m["peak_memory_bytes"] > 2**20 and m["peak_memory_kind"].startswith("peak_rss")
            assert m["samples"] == 4 and len(m["losses"]) == 2 and all(map(_finite, m["losses"]))
            assert m["timing"] == "interleaved"  # CPU --compare: the modes' timed steps alternate
            assert {"data", "teacher", "student_forward", "target", "student_backward", "optimizer"} <= set(m["split_ms"])
            assert all(map(_finite, m["split_ms"].values()))
        # Reference-like re-encodes pixels and prompts every step; the optimised mode reads the cache.
        assert ref["split_ms"]["vae"] > 0 and ref["split_ms"]["text_encoder"] > 0 and "text_encoder" not in opt["split_ms"]
        assert ref["config"]["teacher_dtype"] == "fp32" and not ref["config"]["batched_teacher"]
        assert opt["config"]["batched_teacher"] and opt["config"]["skip_identity_target"]
        # Same seed, same draw: the counted FLOPs differ by the VAE/text encoders and the skipped target rows only.
        assert ref["flops_per_sample"] > opt["flops_per_sample"]
        # Fewer dispatched ops (one batched teacher, no VAE/text encoder, fused AdamW), counted on a warm step.
        assert 0 < opt["ops_per_step"] < ref["ops_per_step"] and run["ratio"]["ops"] < 1
        assert 0 <= opt["casts_per_step"] < opt["ops_per_step"]
        assert 0 < sum(opt["ops_top"].values()) <= opt["ops_per_step"]
        assert all(_finite(v) and v > 0 for v in run["ratio"].values())
    for text in ("reference-like", "optimised", "optimised/ref", "samples/s", "median", "warmup", "peak memory", "GFLOP/sample", "student_backward",
                 "dispatched ops/step"):
        assert text in printed


def test_each_timed_mode_prints_its_line_before_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not interleaved (as on a GPU), each mode's figures are printed as soon as it is done, so a run killed by a time
    cap during a later mode (a compile) still leaves the earlier modes' figures in its output."""
    res = bench_main(["--preset", "tiny", "--variant", "full", "--compare", "--no-interleave", "--steps", "1", "--warmup", "0",
                      "--split-steps", "0", "--batch_size", "2", "--threads", "1", "--workdir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if ln.startswith("mode full/")]
    assert [ln.split(":")[0] for ln in lines] == ["mode full/reference-like", "mode full/optimised"]
    assert printed.index(lines[-1]) < printed.index("tcdistill bench: preset tiny")
    opt = res["runs"][0]["modes"]["optimised"]
    assert f"{opt['samples_per_s']:.3f} samples/s" in lines[1] and f"step {opt['step_time_ms']:.1f} ms" in lines[1]


def test_data_only_and_peak_table(tmp_path: Path) -> None:
    from tcdistill.cli import main as cli_main

    res = bench_main(["--preset", "tiny", "--data-only", "--data-workers", "0", "--data-batches", "2", "--workdir", str(tmp_path)])
    assert res["data"][0]["workers"] == 0 and res["data"][0]["samples_per_s"] > 0
    # `tcdistill bench` (the console script) exits 0: it must not hand the result dict to the wrapper's sys.exit
    assert cli_main(["bench", "--preset", "tiny", "--data-only", "--data-workers", "0", "--data-batches", "1", "--workdir", str(tmp_path)]) is None
    assert device_peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert device_peak_tflops("NVIDIA H200")[0] == 989.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert device_peak_tflops("Some GPU")[0] is None and device_peak_tflops("Some GPU", 100.0)[0] == 100.0


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_optimisations_give_the_reference_loss(variant: str, tiny_teacher: Path, tiny_shards: str, tmp_path: Path) -> None:
    """On the real tiny UNets: batched vs separate teacher passes, skipped vs computed identity targets, and (LoRA)
    the adapters-off teacher vs a separate frozen copy give one loss to float precision."""
    from tcdistill.models import UNetDenoiser
    from tcdistill.trainer import Trainer

    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path), train_shards_path_or_url=tiny_shards,
                      resolution=32, max_train_steps=1, report_to="none", seed=0, mixed_precision="no", variant=variant,
                      lora_separate_teacher=variant == "lora", lora_rank=4)
    tr = Trainer(cfg)
    strat = tr.strategy
    if variant == "lora":
        randomize_lora_b(strat.student, scale=0.05)  # non-zero adapters, so "adapters off" really differs from the student
    else:
        with torch.no_grad():  # an EMA target that differs from the student, as after some training
            for p in strat.target.parameters():
                p.add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 16, 16, generator=g)
    cond = {"encoder_hidden_states": torch.randn(6, 16, 32, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(1, 16, 32, generator=g).expand(6, -1, -1)}
    t = torch.tensor([999, 499, 259, 39, 739, 99])
    t_n = (t - tr.k).clamp(min=0)
    s = torch.tensor([979, 0, 239, 0, 100, 79])  # rows 0, 2, 5: s == t_n (identity target); others: a real target
    draw = TCDDraw(steps=TimestepDraw(t=t, t_n=t_n, s=s), w=torch.rand(6, generator=g) * 10 + 5, eps=torch.randn(6, 4, 16, 16, generator=g))
    student, target, teacher = strat.denoisers(tr.student)
    losses = {}
    for batched in (False, True):
        for skip, static in ((False, False), (True, False), (True, True)):
            fn = TCDLoss(tr.schedule, w_cond_student=strat.w_cond_student, batched_teacher=batched, skip_identity_target=skip,
                         static_shapes=static)
            loss, stats = fn(student, target, teacher, x0, cond, uncond, draw)
            assert stats["target_forwards"] == (3 if skip and not static else 6)
            losses[(batched, skip, static)] = loss.item()
    ref = losses[(False, False, False)]
    for key, val in losses.items():
        # 1e-4: the loss is a small difference of two predictions, so batch-size-dependent conv rounding (~1e-7 in
        # x_prev) shows up at ~2e-5 here; a real change of the math moves it by > 1e-3 (checked below).
        assert val == pytest.approx(ref, rel=1e-4), (key, losses)
    if variant == "lora":
        from tcdistill.unet_views import AdaptersOff

        fn = TCDLoss(tr.schedule, w_cond_student=False)
        off = AdaptersOff(UNetDenoiser(strat.student), strat.student)
        one_unet = fn(student, target, off, x0, cond, uncond, draw)[0].item()
        assert one_unet == pytest.approx(ref, rel=1e-4)  # the separate copy == the base with adapters off
        on = fn(student, target, UNetDenoiser(strat.student), x0, cond, uncond, draw)[0].item()
        assert abs(on - ref) > 1e-3 * abs(ref)  # and the adapters really change the teacher, so the check has teeth
        # The merged-weights target (the default) == the adapted UNet's own forward, and leaves the base untouched.
        from tcdistill.unet_views import MergedAdapters

        assert isinstance(target, MergedAdapters)
        base = {n: p.clone() for n, p in strat.student.named_parameters() if "base_layer" in n}
        unmerged = fn(student, UNetDenoiser(strat.student), off, x0, cond, uncond, draw)[0].item()
        assert unmerged == pytest.approx(ref, rel=1e-4)
        assert all(torch.equal(p, base[n]) for n, p in strat.student.named_parameters() if "base_layer" in n)
        # (the forward itself is compared against fp64 in test_merged_lora_target_is_the_adapted_unet)


def test_merged_lora_target_is_the_adapted_unet() -> None:
    """The merged-weights LoRA target computes the adapted UNet: in fp64 to ~1e-12, and in fp32 as close to the fp64
    result as the adapter-branch forward is; dropout or DoRA keep the adapter branch (`applies` is False)."""
    from peft import LoraConfig

    from tcdistill.models import UNetDenoiser
    from tcdistill.unet_views import MergedAdapters
    from tcdistill.tiny import build_tiny_sd_pipeline

    torch.manual_seed(0)
    mods = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "time_emb_proj"]
    unet = build_tiny_sd_pipeline(None).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=64, target_modules=mods, init_lora_weights="gaussian"))
    randomize_lora_b(unet, scale=0.05)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 16, 16, generator=g), torch.tensor([10, 500, 900])
    cond = {"encoder_hidden_states": torch.randn(3, 8, unet.config.cross_attention_dim, generator=g)}
    assert MergedAdapters.applies(unet)
    with torch.no_grad():
        merged32, branch32 = MergedAdapters(unet)(x, t, cond), UNetDenoiser(unet)(x, t, cond)
        base = {n: p.clone() for n, p in unet.named_parameters()}
        unet.double()
        x64, cond64 = x.double(), {k: v.double() for k, v in cond.items()}
        merged64, branch64 = MergedAdapters(unet)(x64, t, cond64), UNetDenoiser(unet)(x64, t, cond64)
        off = MergedAdapters(unet).view(x64, t, cond64)  # the same UNet with the adapters off: the teeth of the check
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert rel(merged64, branch64) < 1e-10
    assert rel(off, branch64) > 1e-2
    assert rel(merged32, branch64) < 3 * rel(branch32, branch64) + 1e-6
    assert all(torch.equal(p.double(), base[n].double()) for n, p in unet.named_parameters())  # base never written
    unet.float()
    dropout = build_tiny_sd_pipeline(None).unet
    dropout.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=mods, lora_dropout=0.1))
    assert not MergedAdapters.applies(dropout)


def test_native_teacher_runs_outside_autocast_in_its_own_dtype() -> None:
    """`UNetDenoiser(native=True)` (the weight-dtype teacher) runs its UNet with the enclosing autocast switched off
    (seen from inside the forward) and gives what the bf16 UNet gives with no autocast at all."""
    from tcdistill.models import UNetDenoiser
    from tcdistill.tiny import build_tiny_sd_pipeline

    unet = build_tiny_sd_pipeline(None).unet.to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])
    cond = {"encoder_hidden_states": torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)}
    seen: list[bool] = []
    unet.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    with torch.no_grad():
        plain = UNetDenoiser(unet, None, torch.bfloat16)(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            native = UNetDenoiser(unet, None, torch.bfloat16, native=True)(x, t, cond)
            autocast = UNetDenoiser(unet, None, torch.bfloat16)(x, t, cond)
    assert native.dtype == torch.bfloat16
    assert torch.equal(native, plain)
    assert autocast.dtype == torch.bfloat16
    assert seen == [False, False, True]  # plain, native (autocast off inside), default adapter (autocast on inside)


def _compile_with_backend(monkeypatch: pytest.MonkeyPatch, backend: Any) -> None:
    """`Module.compile` with dynamo's real graph capture but `backend` (no inductor code generation) and no mode."""
    import torch._dynamo

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, **{**kw, "backend": backend, "mode": None}))
    torch._dynamo.reset()


@pytest.fixture
def dynamo_limits_strict() -> Iterator[None]:
    """A frame past dynamo's recompile limit raises instead of running eagerly; the limits that `--compile_scope
    blocks` raises process-wide are put back after the test."""
    import torch._dynamo

    c = torch._dynamo.config
    with c.patch(recompile_limit=c.recompile_limit, accumulated_recompile_limit=c.accumulated_recompile_limit,
                 fail_on_recompile_limit_hit=True):
        yield


@pytest.mark.slow
@pytest.mark.parametrize("variant,mode,scope", [("full", "reduce-overhead", "unet"), ("lora", "default", "unet"), ("lora", "default", "blocks")])
def test_compiled_unets_compile_once(variant: str, mode: str, scope: str, tiny_teacher: Path, tiny_shards: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, dynamo_limits_strict: None) -> None:
    """`--compile_unet`: every graph is captured in the first step and no later step recompiles, although identity
    target rows (s == t_n) vary per batch (the loss keeps the target at the full batch). dynamo's graph capture is
    real; the backend is `eager` (inductor's code generation would take minutes here and is not what recompiles).
    `--compile_scope blocks`: one graph per block shape and call site, none left to run eagerly by dynamo's
    recompile limit (all ResNet blocks share one code object; the fixture makes hitting it an error). LoRA runs at
    rank 64, where the student merges most layers (its merged forwards must not recompile the teacher or target)."""
    import torch._dynamo

    from tcdistill.models import REGIONAL_BLOCKS
    from tcdistill.trainer import Trainer

    captured: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        captured.append(len(example_inputs))
        return gm.forward

    _compile_with_backend(monkeypatch, counting_backend)
    cfg = TrainConfig(pretrained_teacher_model=str(tiny_teacher), output_dir=str(tmp_path), train_shards_path_or_url=tiny_shards,
                      resolution=32, max_train_steps=8, report_to="none", seed=0, mixed_precision="no", variant=variant,
                      train_batch_size=4, lora_rank=64, compile_unet=True, compile_mode=mode, compile_scope=scope,
                      num_ddim_timesteps=4, validation_inference_steps="1,2,4")  # N=4: s == t_n in ~half the rows
    tr = Trainer(cfg)
    assert tr.loss_fn.static_shapes and tr.cudagraphs == (mode == "reduce-overhead")
    data = iter(tr.data_loader())
    tr.optimizer_step(data)
    first = len(captured)
    assert first >= 3  # teacher, target and student (plus any graph breaks)
    if scope == "blocks":
        blocks = [m for m in tr.strategy.student.modules() if type(m).__name__ in REGIONAL_BLOCKS]
        shapes = {(type(m).__name__, tuple(p.shape for p in m.parameters())) for m in blocks}
        assert len(blocks) > len(shapes) > 1  # some blocks share a shape (and so a graph) in this UNet
        assert first >= 3 * len(shapes)  # >= one graph per block shape and call site (teacher 2B, target B, student B)
    losses = [tr.optimizer_step(data)[0] for _ in range(6)]
    assert len(captured) == first, f"recompiled after step 1: {first} -> {len(captured)} graphs"
    assert all(math.isfinite(x) for x in losses)
    tr.validate()  # samples eagerly: eval mode and the sampling batch would otherwise compile again
    assert len(captured) == first, f"validation compiled: {first} -> {len(captured)} graphs"
    torch._dynamo.reset()


@pytest.mark.slow
def test_compare_with_compile_times_three_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compare --compile_unet`: reference-like, optimised (eager) and compiled in one interleaved run, each
    non-reference mode with its ratio. dynamo captures graphs for real; the backend is `eager` (no inductor here)."""
    import torch._dynamo

    _compile_with_backend(monkeypatch, "eager")
    res = bench_main(["--preset", "tiny", "--variant", "full", "--compare", "--compile_unet", "--steps", "2", "--warmup", "1",
                      "--split-steps", "1", "--batch_size", "2", "--threads", "1", "--workdir", str(tmp_path / "work")])
    torch._dynamo.reset()
    printed = capsys.readouterr().out
    run = res["runs"][0]
    assert list(run["modes"]) == ["reference-like", "optimised", "compiled"]
    assert [run["modes"][m]["config"]["compile_unet"] for m in run["modes"]] == [False, False, True]
    assert set(run["ratios"]) == {"optimised", "compiled"} and run["ratio"] == run["ratios"]["optimised"]
    assert all(_finite(v) and v > 0 for r in run["ratios"].values() for v in r.values())
    assert "compiled/ref" in printed and "optimised/ref" in printed


def test_op_counter_counts_forward_and_backward_ops_but_not_views() -> None:
    """`OpCounter` (the bench's dispatched ops/step) sees the ops below autograd, backward included, and skips views."""
    from tcdistill.timing import OpCounter

    x = torch.randn(4, 3, requires_grad=True)
    with OpCounter() as ops:
        y = (x * 2).view(12).t().sum()
        y.backward()
    assert ops.by_op["mul"] >= 2  # x * 2 in the forward, grad * 2 in the backward
    assert ops.by_op["sum"] == 1 and not {"view", "t", "expand", "transpose"} & set(ops.by_op)
    assert ops.count == sum(ops.by_op.values())


def test_bench_flag_errors_are_one_line(tmp_path: Path) -> None:
    """QA: --steps 0 (ZeroDivisionError), an unparsable --set value and a config the trainer refuses gave tracebacks;
    --set train_batch_size ran batch 2 under a header that said 4; --data-only --data-workers "" printed nothing."""
    for argv, needle in ((["--steps", "0"], "--steps must be >= 1"), (["--set", "learning_rate=abc"], "could not convert"),
                         (["--set", "train_batch_size=2"], "use --batch_size"), (["--opt-set", "resolution=64"], "use --resolution"),
                         (["--data-only", "--data-workers", ""], "--data-workers needs"),
                         (["--data-only", "--data-workers", "x"], "--data-workers needs"),
                         (["--set", "lora_rank=0", "--variant", "lora", "--no-cache", "--steps", "1", "--warmup", "0"], "--lora_rank must be >= 1")):
        with pytest.raises(SystemExit, match=needle):
            bench_main([*argv, "--workdir", str(tmp_path / "w")])


@pytest.mark.parametrize("argv, needle", [
    (["--set", "variant=lora"], "--set/--opt-set variant: use --variant"),  # ran LoRA under a "variant full" header
    (["--compare", "--opt-set", "variant=lora"], "use --variant"),  # compared a LoRA with the full reference-like model
    (["--set", "train_shards_path_or_url=x.tar"], "use --preset"),
    (["--threads", "-1"], "--threads must be >= 1"),  # torch's RuntimeError traceback
    (["--profile", "-1"], "--profile must be >= 0"),  # printed a profile of no steps
    (["--peak_tflops", "-3"], "--peak_tflops must be > 0"),
    (["--resolution", "30"], "--resolution 30: the tiny preset needs a multiple of 4"),  # the teacher build's traceback
    (["--data-only", "--resolution", "100000"], "tcdistill bench: --resolution 100000 is above 9459"),  # the shards': MemoryError
    (["--reference-like", "--compile_unet", "--opt-set", "fused_adam=false"], "--compile_unet, --opt-set only change the optimised mode"),
])
def test_bench_refuses_mislabelled_crashing_or_ignored_flags_before_building(argv: list[str], needle: str, tmp_path: Path) -> None:
    """QA: these ran (or crashed after minutes of building an sd15 teacher) instead of stopping in one line at once."""
    with pytest.raises(SystemExit, match=needle):
        bench_main([*argv, "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()  # refused before the teacher, shards or cache were built


@pytest.mark.parametrize("workers, untimed", [(0, 1), (2, 6)])
def test_data_only_times_no_worker_start_up(workers: int, untimed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QA: --data-only timed from the first batch on, so every worker but the first started inside the timed batches
    (2 tiny workers: ~90 ms of start-up in ~130 ms timed). The clock now starts after each worker's first batch and the
    prefetch queues they filled meanwhile (prefetch_factor 2: 3 batches a worker); then --data-batches batches are timed."""
    import time

    from tcdistill import bench, data

    pulled: list[int] = []

    class Loader:  # a DataLoader's worker count and prefetch queue depth, batches of 4
        prefetch_factor = 2 if workers else None

        def __iter__(self) -> Iterator[dict[str, list[str]]]:
            while True:
                pulled.append(1)
                yield {"captions": ["c"] * 4}

    monkeypatch.setattr(data, "build_train_dataloader", lambda cfg: Loader())
    started: list[int] = []
    clock = time.perf_counter
    monkeypatch.setattr(bench.time, "perf_counter", lambda: started.append(len(pulled)) or clock())
    args = bench.build_parser().parse_args(["--data-workers", str(workers), "--data-batches", "3", "--batch_size", "4", "--resolution", "32"])
    args.data_workers = [workers]
    (res,) = bench.data_throughput(args, bench.Assets(teacher="t", shards="s.tar"))
    assert started[0] == untimed and len(pulled) == untimed + 3
    assert res["workers"] == workers and res["samples_per_s"] > 0


def test_a_json_path_that_cannot_be_written_is_refused_before_the_runs(tmp_path: Path) -> None:
    """QA: `--json FILE/x.json` (a file where its folder should be) ran the whole benchmark, then ended in a
    FileExistsError traceback and lost the results; it is refused at the start, in one line."""
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit, match=r"--json .*taken/x.json: cannot make its folder \(FileExistsError"):
        bench_main(["--data-only", "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "taken" / "x.json")])
    assert not (tmp_path / "w").exists()


def test_data_only_builds_no_teacher(tmp_path: Path) -> None:
    """QA: --data-only built (or, in a kept --workdir, reused) the preset's teacher first, which it never loads: for
    `--preset sd15 --data-only` that was SD 1.5's 1.1B random weights initialised and ~4 GB written. So it takes any
    --resolution, not only those the preset's teacher takes (tiny: a multiple of 4)."""
    res = bench_main(["--preset", "tiny", "--data-only", "--data-workers", "0", "--data-batches", "1", "--resolution", "30",
                      "--workdir", str(tmp_path)])
    assert res["data"][0]["samples_per_s"] > 0 and res["data"][0]["resolution"] == 30
    assert {p.name for p in tmp_path.iterdir()} == {"shards-30"}


def test_an_explicit_peak_gives_the_mfu_on_cpu_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """QA: --peak_tflops was dropped without a word on a machine without a GPU (MFU n/a); the help offers it as the peak
    for the MFU, and a CPU's peak is the user's to know."""
    res = bench_main(["--reference-like", "--steps", "1", "--warmup", "0", "--split-steps", "0", "--batch_size", "2", "--threads", "1",
                      "--peak_tflops", "0.5", "--workdir", str(tmp_path)])
    ref = res["runs"][0]["modes"]["reference-like"]
    assert res["peak_tflops"] == 0.5 and res["peak_source"] == "--peak_tflops"
    assert ref["mfu"] == pytest.approx(ref["achieved_tflops"] / 0.5)
    assert f"{100 * ref['mfu']:.1f}%" in capsys.readouterr().out


def test_a_set_clip_skip_gets_a_cache_of_its_clip_skip(tmp_path: Path) -> None:
    """QA review: `--set clip_skip=1` trained the optimised mode on the bench's own cache, made without it, and stopped
    ("the cache's prompt states were made with clip skip unset; ... re-run `tcdistill cache --clip_skip 1`")."""
    res = bench_main(["--preset", "tiny", "--variant", "lora", "--set", "clip_skip=1", "--steps", "1", "--warmup", "0",
                      "--split-steps", "0", "--batch_size", "1", "--resolution", "16", "--threads", "1", "--workdir", str(tmp_path)])
    assert res["cache"]["clip_skip"] == 1 and _finite(res["runs"][0]["modes"]["optimised"]["samples_per_s"])
