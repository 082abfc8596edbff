"""Unit tests of `tcdistill eval`'s metrics and samplers (offline, CPU, a few seconds)."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from conftest import full_output

from tcdistill.evaluate import (
    EvalSettings,
    Evaluator,
    format_table,
    frechet_distance,
    guided_net,
    latent_rmse,
    sample_ddim,
    torchmetrics_scorers,
)
from tcdistill.sampler import tcd_timesteps
from tcdistill.schedule import NoiseSchedule, scaled_linear_alphas_cumprod


def test_latent_rmse_identical_is_zero_and_known_value() -> None:
    x = torch.randn(3, 4, 8, 8)
    assert torch.equal(latent_rmse(x, x), torch.zeros(3, dtype=torch.float64))
    d = latent_rmse(torch.zeros(2, 4, 2, 2), torch.full((2, 4, 2, 2), 0.5))
    assert torch.allclose(d, torch.full((2,), 0.5, dtype=torch.float64))
    # Per sample: only the second sample differs.
    y = x.clone()
    y[1] += 2.0
    assert latent_rmse(x, y).tolist() == pytest.approx([0.0, 2.0, 0.0])


def test_frechet_distance_identical_zero_and_affine_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 6, generator=g) @ torch.randn(6, 6, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6 * float(torch.cov(a.T).trace())
    # b = 2 a + c: C_b = 4 C_a, (C_a C_b)^(1/2) = 2 C_a, so FD = |mu_a - mu_b|^2 + tr(C_a).
    c = torch.arange(6.0)
    b = 2 * a + c
    expected = float((a.mean(0) - b.mean(0)).pow(2).sum() + torch.cov(a.T.double()).trace())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a.numpy(), b.numpy()) == pytest.approx(expected, rel=1e-6)  # numpy in, same answer


@pytest.mark.parametrize("k", [2, 5])
def test_sample_ddim_matches_diffusers_ddim_with_cfg(k: int) -> None:
    """Where the TCD grid equals DDIM's trailing spacing (k | 50 and 20 k | 1000), our guided DDIM is diffusers' DDIM."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, timestep_spacing="trailing")
    sched.set_timesteps(k)
    assert sched.timesteps.tolist() == tcd_timesteps(k).tolist()
    schedule = NoiseSchedule(scaled_linear_alphas_cumprod())
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    unet = lambda x, t, encoder_hidden_states: type("O", (), {"sample": torch.tanh(conv(x) + encoder_hidden_states.mean() + t.float().view(-1, 1, 1, 1) / 1000)})()  # noqa: E731
    cond, uncond = torch.ones(2, 3, 5), torch.zeros(2, 3, 5)
    net = guided_net(unet, cond, uncond, guidance_scale=3.0)
    x_T = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ours = sample_ddim(net, x_T, schedule, tcd_timesteps(k))
        x = x_T
        for t in sched.timesteps:
            x = sched.step(net(x, t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)


def test_evaluator_reference_row_is_zero_and_same_net_matches_ddim(tmp_path) -> None:
    """The 50-step reference has RMSE 0; a 'student' that is the teacher sampled by TCD at gamma 0 (no CFG) is DDIM."""
    from tcdistill.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(block_out_channels=(16, 32), vae_block_out_channels=(8, 16), sample_size=8)
    settings = EvalSettings(guidance_scale=1.0, steps=(1, 2), gammas=(0.0, 0.3), reference_steps=4, batch_size=2)
    ev = Evaluator(pipe, ["a red circle", "a blue square", ""], settings)
    rows = ev.teacher_rows()
    assert rows[0]["steps"] == 4 and rows[0]["rmse"] == 0.0
    assert all(r["rmse"] > 0 for r in rows[1:])
    student = ev.student_rows("same", pipe.unet, "tcd")
    assert [(r["gamma"], r["steps"]) for r in student] == [(0.0, 1), (0.0, 2), (0.3, 1), (0.3, 2)]
    by_k = {r["steps"]: r["rmse"] for r in rows[1:]}
    for r in student:
        if r["gamma"] == 0.0 or r["steps"] == 1:  # gamma only acts between steps
            assert r["rmse"] == pytest.approx(by_k[r["steps"]], rel=1e-5)
    assert student[3]["rmse"] != pytest.approx(by_k[2], rel=1e-3)  # re-noising changed the 2-step sample
    assert rows[0]["_images"].shape == (3, 16, 16, 3)
    table = format_table(rows + student)
    assert table.count("\n") == 1 + len(rows) + len(student) and "| same | tcd | 0.3 | 2 |" in table


def test_missing_torchmetrics_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # import now raises ImportError
    assert torchmetrics_scorers(["a"], torch.zeros(1, 8, 8, 3, dtype=torch.uint8).numpy(), None, fid=True) == {}
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "torchmetrics" in out[0] and "pip install" in out[0]


def test_eval_cli_refusals_are_one_line(tiny_teacher, tmp_path) -> None:
    """QA: an empty prompt file, --batch_size 0 and a grid finer than the teacher's 1000 timesteps (skip 0: every
    timestep -1, silently sampled) gave tracebacks or garbage rows; each is one error line now."""
    from tcdistill.evaluate import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    (tmp_path / "empty.txt").write_text("\n")
    base = ["--teacher", str(tiny_teacher), "--unet", str(tiny_teacher / "unet"), "--steps", "1"]
    run = tmp_path / "run"  # a training output trained on a 20-point grid
    run.mkdir()
    (run / "tcdistill_config.json").write_text('{"num_ddim_timesteps": 20}')
    for extra, needle in ((["--prompts", str(tmp_path / "empty.txt")], "no prompts"),
                          (["--prompts", str(prompts), "--batch_size", "0"], "--batch_size must be >= 1"),
                          (["--prompts", str(prompts), "--reference_steps", "1001"], "exceeds the teacher's 1000"),
                          # the grid defaults to the run's own --num_ddim_timesteps (it was always 50)
                          (["--prompts", str(prompts), "--unet", str(run), "--steps", "30"], r"--steps 30 not in \[1, 20\]")):
        with pytest.raises(SystemExit, match=needle):
            main(base + extra)


def test_eval_refuses_an_sdxl_teacher_in_one_line(sdxl_teacher, tmp_path) -> None:
    """QA: an SDXL teacher was refused with no word on what to do instead (and the README did not say eval is SD-only)."""
    from tcdistill.evaluate import main

    (tmp_path / "p.txt").write_text("a red circle\n")
    for extra in ([], ["--clip_skip", "5"]):  # the family first: SDXL's clip-skip range is no help to its user
        with pytest.raises(SystemExit, match=r"--teacher .* StableDiffusionXLPipeline; .*SD 1.x/2.x .*teachers only; .*tcdistill generate"):
            main(["--teacher", str(sdxl_teacher), "--unet", str(sdxl_teacher / "unet"), "--prompts", str(tmp_path / "p.txt"),
                  "--steps", "1", *extra])
    # QA: an SDXL run's own teacher (no --teacher given) was named as "--teacher ...", a flag the user had not passed.
    run = full_output(sdxl_teacher, tmp_path / "run")
    with pytest.raises(SystemExit, match=rf"^tcdistill eval: error: the run's teacher {re.escape(str(sdxl_teacher))} is a "
                                         "StableDiffusionXLPipeline; .*tcdistill generate"):
        main(["--unet", str(run), "--prompts", str(tmp_path / "p.txt"), "--steps", "1"])


def test_eval_samples_an_lcm_run_with_lcm(tiny_teacher, tmp_path) -> None:
    """An LCM-mode run is evaluated with the LCM sampler by default (it was always TCD unless --sampler lcm was given)."""
    import json

    from tcdistill.evaluate import main

    (tmp_path / "p.txt").write_text("a red circle\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "unet_target").symlink_to(tiny_teacher / "unet")
    (run / "tcdistill_config.json").write_text('{"num_ddim_timesteps": 20, "distill_mode": "lcm", "timestep_scaling_factor": 0.05}')
    main(["--teacher", str(tiny_teacher), "--unet", str(run), "--prompts", str(tmp_path / "p.txt"), "--steps", "1",
          "--reference_steps", "2", "--output", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["sampler"], r["gamma"]) for r in rows if r["model"] == "unet"] == [("lcm", None)]


def test_evaluator_takes_a_non_square_sample_size() -> None:
    """QA: a UNet config with sample_size [h, w] (diffusers' UNet takes it) crashed `tcdistill eval` building x_T
    (torch.randn with a list inside the shape): the noise, samples and images now take the UNet's own h x w."""
    from tcdistill.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(block_out_channels=(16, 32), vae_block_out_channels=(8, 16), sample_size=8)
    pipe.unet.register_to_config(sample_size=[8, 12])
    ev = Evaluator(pipe, ["a red circle"], EvalSettings(guidance_scale=1.0, steps=(1,), gammas=(0.0,), reference_steps=2, batch_size=1))
    assert ev.x_T.shape == (1, 4, 8, 12)
    assert ev.student_rows("same", pipe.unet)[0]["_images"].shape == (1, 16, 24, 3)


def test_evaluator_uses_the_training_schedule() -> None:
    """eval's schedule is training's (DDPMScheduler from the teacher's config), not the pipeline class's: zero-SNR
    Euler puts 2**-24 at t=999 where DDPM (training) and TCDScheduler put 0."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    from tcdistill.tiny import build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(block_out_channels=(16, 32), vae_block_out_channels=(8, 16), sample_size=8)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ev = Evaluator(pipe, ["a red circle"], EvalSettings(guidance_scale=1.0, steps=(1,), gammas=(0.0,), reference_steps=2, batch_size=1))
    train = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    assert float(pipe.scheduler.alphas_cumprod[-1]) > 0 and float(ev.schedule.alphas_cumprod[-1]) == 0.0
    torch.testing.assert_close(ev.schedule.alphas_cumprod, train.float())


def test_eval_samples_at_the_runs_resolution(tiny_teacher, tmp_path, monkeypatch) -> None:
    """QA: `tcdistill eval` drew its noise at the teacher UNet's sample_size (16 latents: 32 px for the tiny teacher), not at
    the run's --resolution (44 px, sampled at 40, the multiple of 8 below it: 20 latents through the VAE's factor 2) that
    the student trained at."""
    import tcdistill.evaluate as evaluate

    built = []

    class Recording(Evaluator):
        def __post_init__(self) -> None:
            super().__post_init__()
            built.append(self)

    monkeypatch.setattr(evaluate, "Evaluator", Recording)
    (tmp_path / "p.txt").write_text("a red circle\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "unet_target").symlink_to(tiny_teacher / "unet")
    (run / "tcdistill_config.json").write_text('{"num_ddim_timesteps": 20, "resolution": 44}')
    evaluate.main(["--teacher", str(tiny_teacher), "--unet", str(run), "--prompts", str(tmp_path / "p.txt"), "--steps", "1",
                   "--gamma", "0", "--reference_steps", "2"])
    assert [tuple(ev.x_T.shape) for ev in built] == [(1, 4, 20, 20)]


def test_eval_refuses_a_grid_reaching_zero_snr_under_epsilon(tiny_teacher, tmp_path) -> None:
    """QA: a zero-SNR epsilon teacher trains on a grid that stops short of t=999 (--num_ddim_timesteps 30), but eval's
    50-step reference grid reached t=999, where x0 = (x_t - eps) / 0: every row of the table was NaN, exit 0. The grid
    that reaches it is refused in one line, as training refuses it; a grid that stops short still samples."""
    import json
    import shutil

    from tcdistill.evaluate import main

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    sched = teacher / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "rescale_betas_zero_snr": True, "prediction_type": "epsilon"}))
    (tmp_path / "p.txt").write_text("a red circle\n")
    base = ["--teacher", str(teacher), "--unet", str(teacher / "unet"), "--prompts", str(tmp_path / "p.txt"), "--steps", "1",
            "--gamma", "0", "--original_steps", "30"]
    with pytest.raises(SystemExit, match=r"--reference_steps 50: .*zero SNR at t=999"):
        main(base)
    with pytest.raises(SystemExit, match=r"--original_steps 20: .*zero SNR at t=999"):
        main(base + ["--reference_steps", "30", "--original_steps", "20"])
    out = tmp_path / "rows.json"
    main(base + ["--reference_steps", "30", "--output", str(out)])
    assert all(r["rmse"] == r["rmse"] for r in json.loads(out.read_text())["rows"])  # no NaN
