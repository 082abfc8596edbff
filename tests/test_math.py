"""Millisecond tests of the pure TCD math: schedule, grid, (t, t_n, s) draw, TCF, guided step, losses, EMA, sampler."""

import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler, TCDScheduler

from tcdistill.sampler import sample_lcm, sample_tcd, tcd_timesteps
from tcdistill.schedule import NoiseSchedule, ddim_grid, draw_timesteps, scaled_linear_alphas_cumprod
from tcdistill.tcd import (
    TCDLoss,
    draw_tcd,
    ema_update,
    guidance_embedding,
    guided_ddim_step,
    pseudo_huber_loss,
    tcf,
)

SD_KW = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def sched(pred="epsilon") -> NoiseSchedule:
    return NoiseSchedule(scaled_linear_alphas_cumprod(), pred)


def test_alphas_cumprod_matches_diffusers():
    ref = DDPMScheduler(**SD_KW).alphas_cumprod
    torch.testing.assert_close(scaled_linear_alphas_cumprod(), ref.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [2, 4, 8, 1, 3, 50])
def test_timesteps_match_tcd_scheduler(n):
    s = TCDScheduler(**SD_KW)
    s.set_timesteps(n)
    assert tcd_timesteps(n).tolist() == s.timesteps.tolist()


@pytest.mark.parametrize("n_ddim", [50, 20])
def test_sampling_scheduler_samples_on_the_runs_grid(n_ddim):
    """The contract: TCDScheduler's original_inference_steps equals the run's N. Validation and `generate` build their
    TCDScheduler with it (N = 20: [999, 749, 499, 249], not the default 50's [999, 759, 499, 259])."""
    from tcdistill.validation import sampling_scheduler

    s = sampling_scheduler(TCDScheduler(**SD_KW).config, "tcd", original_steps=n_ddim)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == tcd_timesteps(4, original_steps=n_ddim).tolist()
    assert tcd_timesteps(4, original_steps=20).tolist() == [999, 749, 499, 249]


def test_grid_is_tcd_training_grid():
    g = ddim_grid(1000, 50)
    assert g[0] == 19 and g[-1] == 999 and len(g) == 50
    s = TCDScheduler(**SD_KW)
    s.set_timesteps(50)
    assert sorted(s.timesteps.tolist()) == g.tolist()
    # tcd-reference.md, "Sampling": the contract's grids, spelled out.
    assert tcd_timesteps(2).tolist() == [999, 499]
    assert tcd_timesteps(4).tolist() == [999, 759, 499, 259]
    assert tcd_timesteps(8).tolist() == [999, 879, 759, 639, 499, 379, 259, 139]


def test_draw_s_range_and_distribution():
    grid, k = ddim_grid(1000, 50), 20
    gen = torch.Generator().manual_seed(0)
    d = draw_timesteps(200_000, grid, k, generator=gen)
    assert torch.all(d.t_n == (d.t - k).clamp(min=0))
    assert torch.all((d.s >= 0) & (d.s <= d.t_n) & (d.t_n < d.t))
    assert set(d.s.tolist()) <= set([0] + (grid - k).clamp(min=0).tolist())
    # P(s == t_n | i) = 1 / (i + 1); check the top of the grid (i = 49) and i = 1 (t = 39).
    for t_val, i in [(999, 49), (39, 1)]:
        m = d.t == t_val
        frac = (d.s[m] == d.t_n[m]).float().mean().item()
        assert abs(frac - 1 / (i + 1)) < 0.02, (t_val, frac)
    # Given i, s is uniform over the i+1 values grid[j] - k (j in 0..i).
    m = d.t == 999
    counts = torch.bincount((d.s[m] + 1) // k, minlength=50).float()  # s = 20j - 1 -> bin j (s = 0 -> 0)
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    lcm = draw_timesteps(100, grid, k, generator=gen, mode="lcm")
    assert torch.all(lcm.s == 0)


def from_x0_eps(sc: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Oracle: the network output that encodes `(x0, eps)` at `t` in the schedule's parameterisation."""
    a, s = sc.alpha_sigma(t, like=x0)
    return {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[sc.prediction_type]


def tcf_exponential_integrator(x_t, x0_hat, sc: NoiseSchedule, t, s):
    """Oracle, the TCF in the paper's exponential-integrator form: `(sigma_s/sigma_t) x_t - alpha_s (exp(-h) - 1) x0_hat`,
    `h = lambda_s - lambda_t` with the half log-SNR `lambda = log(alpha / sigma)`."""
    (a_t, sigma_t), (a_s, sigma_s) = sc.alpha_sigma(t, like=x_t), sc.alpha_sigma(s, like=x_t)
    h = torch.log(a_s / sigma_s) - torch.log(a_t / sigma_t)
    return (sigma_s / sigma_t) * x_t - a_s * torch.expm1(-h) * x0_hat


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_conversions_round_trip(pred):
    sc = sched(pred)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 19, 500, 999])
    x_t = sc.add_noise(x0, eps, t)
    out = from_x0_eps(sc, x0, eps, t)
    x0_hat, eps_hat = sc.to_x0_eps(out, x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, eps, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_tcf_identity_ddim_and_exponential_integrator(pred):
    sc = sched(pred)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 499, 259])
    out = torch.randn(3, 4, 8, 8, generator=g)
    x0_hat, eps_hat = sc.to_x0_eps(out, x_t, t)
    # t -> t is the identity.
    torch.testing.assert_close(tcf(x0_hat, eps_hat, sc, t), x_t, atol=1e-4, rtol=1e-4)
    s = torch.tensor([0, 239, 259])
    ddim = tcf(x0_hat, eps_hat, sc, s)
    a_s, sig_s = sc.alpha_sigma(s, like=x_t)
    torch.testing.assert_close(ddim, a_s * x0_hat + sig_s * eps_hat)
    torch.testing.assert_close(tcf_exponential_integrator(x_t, x0_hat, sc, t, s), ddim, atol=1e-4, rtol=1e-4)


def test_guided_step_is_cfg_with_scale_w_plus_one():
    sc = sched()
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 4, 4, 4, generator=g)
    t, t_n = torch.tensor([999, 519]), torch.tensor([979, 499])
    e_c, e_u = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    w = torch.tensor([5.0, 12.0])
    x0_c, eps_c = sc.to_x0_eps(e_c, x_t, t)
    x0_u, eps_u = sc.to_x0_eps(e_u, x_t, t)
    got = guided_ddim_step(x0_c, eps_c, x0_u, eps_u, w, sc, t_n)
    # Classic CFG on eps with scale w + 1, then a DDIM step, must agree (the LCM form is linear).
    e_cfg = e_u + (w + 1).view(-1, 1, 1, 1) * (e_c - e_u)
    x0, eps = sc.to_x0_eps(e_cfg, x_t, t)
    torch.testing.assert_close(got, tcf(x0, eps, sc, t_n), atol=1e-4, rtol=1e-4)


def test_guidance_embedding_matches_pipeline():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 4.0, 14.5])
    ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_embedding(w, 256), ref)


def test_huber_and_l2():
    p, q = torch.tensor([0.0, 3.0]), torch.tensor([4.0, 3.0])
    assert TCDLoss(sched(), "l2")._loss_fn(p, q).item() == pytest.approx(8.0)
    c = 0.001
    assert pseudo_huber_loss(p, q, c).item() == pytest.approx(((16 + c * c) ** 0.5 - c) / 2)


def test_ema_update_exact():
    tgt = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    on = [torch.tensor([0.0, 4.0]), torch.tensor([[5.0]])]
    ema_update(tgt, on, 0.95)
    torch.testing.assert_close(tgt[0], torch.tensor([0.95, 0.95 * 2 + 0.05 * 4]))
    torch.testing.assert_close(tgt[1], torch.tensor([[0.95 * 3 + 0.05 * 5]]))


class GaussianTeacher:
    """Exact denoiser of data concentrated at a per-sample point `mu` (its PF-ODE is linear); eps-prediction."""

    def __init__(self, sc):
        self.sc = sc

    def eps(self, x_t, t, mu):
        a, s = self.sc.alpha_sigma(t, like=x_t)
        # E[x0 | x_t] = mu for every x_t, so eps = (x_t - a mu) / s and DDIM solves the ODE exactly.
        return (x_t - a * mu) / s

    def __call__(self, x_t, t, cond, w=None):
        return self.eps(x_t, t, cond["mu"].view(-1, 1, 1, 1))


class ExactODEStudent:
    """The teacher's guided PF-ODE solved exactly: for this Gaussian the guided mean is mu_w = mu_c + w (mu_c - mu_u)."""

    def __init__(self, sc):
        self.teacher = GaussianTeacher(sc)

    def __call__(self, x_t, t, cond, w=None):
        mu = cond["mu"].view(-1, 1, 1, 1)
        mu_u = cond["mu_u"].view(-1, 1, 1, 1)
        return self.teacher.eps(x_t, t, mu + w.view(-1, 1, 1, 1) * (mu - mu_u))


def test_exact_student_has_near_zero_loss_and_batched_teacher_agrees():
    sc = sched()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(64, 1, 4, 4, generator=g) + 2.0
    cond = {"mu": torch.full((64,), 2.0), "mu_u": torch.zeros(64)}
    uncond = {"mu": torch.zeros(64), "mu_u": torch.zeros(64)}
    draw = draw_tcd(x0, ddim_grid(), 20, 5.0, 15.0, generator=g)
    student = ExactODEStudent(sc)
    teacher = GaussianTeacher(sc)
    loss, stats = TCDLoss(sc, "l2")(student, student, teacher, x0, cond, uncond, draw)
    # The guided teacher's DDIM step is exact on this ODE, so the exact-ODE student equals its own target.
    assert loss.item() < 1e-8
    wrong = lambda x, t, c, w=None: teacher(x, t, c)  # ignores w: clearly not the guided ODE
    bad, _ = TCDLoss(sc, "l2")(wrong, wrong, teacher, x0, cond, uncond, draw)
    assert bad.item() > 1e-3
    # Batched cond+uncond and skipping the identity targets change nothing but speed.
    ref, ref_stats = TCDLoss(sc, "l2", batched_teacher=False, skip_identity_target=False)(wrong, wrong, teacher, x0, cond, uncond, draw)
    torch.testing.assert_close(bad, ref)
    assert stats["target_forwards"] < 64 and ref_stats["target_forwards"] == 64
    # The compile-friendly form runs the target on every row (one shape) and puts the identity rows in after.
    shapes = []
    seen = lambda x, t, c, w=None: shapes.append(x.shape[0]) or wrong(x, t, c, w)
    static, static_stats = TCDLoss(sc, "l2", static_shapes=True)(wrong, seen, teacher, x0, cond, uncond, draw)
    torch.testing.assert_close(static, ref)
    assert shapes == [64] and static_stats["target_forwards"] == 64


def test_gradients_reach_only_the_student():
    sc = sched()
    stu = torch.nn.Conv2d(4, 4, 1)
    tgt = torch.nn.Conv2d(4, 4, 1)
    tea = torch.nn.Conv2d(4, 4, 1)
    wrap = lambda m: (lambda x, t, c, w=None: m(x))
    x0 = torch.randn(8, 4, 4, 4)
    c = {"e": torch.zeros(8, 1)}
    draw = draw_tcd(x0, ddim_grid(), 20, 5.0, 15.0)
    loss, _ = TCDLoss(sc)(wrap(stu), wrap(tgt), wrap(tea), x0, c, c, draw)
    loss.backward()
    assert stu.weight.grad is not None and stu.weight.grad.abs().sum() > 0
    assert tgt.weight.grad is None and tea.weight.grad is None


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_sampler_matches_tcd_scheduler(pred, gamma):
    sc = sched(pred)
    net = lambda x, t: torch.tanh(x) * 0.5 + 0.01 * t.float().view(-1, 1, 1, 1) / 1000
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = sample_tcd(net, x_T, sc, tcd_timesteps(4), gamma=gamma, generator=torch.Generator().manual_seed(9))
    ref_s = TCDScheduler(**SD_KW, prediction_type=pred)
    ref_s.set_timesteps(4)
    x, gen = x_T.clone(), torch.Generator().manual_seed(9)
    for t in ref_s.timesteps:
        x = ref_s.step(net(x, t.repeat(2)), t, x, eta=gamma, generator=gen).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scaling", [10.0, 0.05])
def test_lcm_sampler_matches_lcm_scheduler(pred, scaling):
    """sample_lcm (eval, demo) and diffusers' LCMScheduler (generate, validation of --distill_mode lcm) agree, the run's
    --timestep_scaling_factor included (at 0.05 c_skip is far from 0 at every step, so dropping it would show)."""
    sc = sched(pred)
    net = lambda x, t: torch.tanh(x) * 0.5 + 0.01 * t.float().view(-1, 1, 1, 1) / 1000
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = sample_lcm(net, x_T, sc, tcd_timesteps(4, original_steps=20), generator=torch.Generator().manual_seed(9),
                      timestep_scaling=scaling)
    ref_s = LCMScheduler(**SD_KW, prediction_type=pred, timestep_scaling=scaling, original_inference_steps=20)
    ref_s.set_timesteps(4)
    assert ref_s.timesteps.tolist() == tcd_timesteps(4, original_steps=20).tolist()
    x, gen = x_T.clone(), torch.Generator().manual_seed(9)
    for t in ref_s.timesteps:
        x = ref_s.step(net(x, t.repeat(2)), t, x, generator=gen).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("gamma, n_ddim, n, custom", [(0.8, 3, 2, None), (0.48, 7, 3, None), (0.3, 50, None, [999, 340, 180])])
def test_sampler_target_time_rounds_as_tcd_scheduler(gamma, n_ddim, n, custom):
    """`s = floor((1 - gamma) prev_t)` where the product is not exact: TCDScheduler takes it in float32 (gamma 0.8,
    prev_t 665: s = 133, where float64 gives 132; gamma 0.48, prev_t 425: 220, not 221; gamma 0.3, prev_t 340: 238, not
    237), and so must the sampler, or its samples leave TCDScheduler's on these grids and custom timesteps."""
    sc = sched("v_prediction")
    net = lambda x, t: torch.tanh(x) * 0.5 + 0.01 * t.float().view(-1, 1, 1, 1) / 1000
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ref_s = TCDScheduler(**SD_KW, prediction_type="v_prediction", original_inference_steps=n_ddim)
    ref_s.set_timesteps(n, timesteps=custom)
    ts = torch.tensor(custom) if custom else tcd_timesteps(n, original_steps=n_ddim)
    assert ts.tolist() == ref_s.timesteps.tolist()
    ours = sample_tcd(net, x_T, sc, ts, gamma=gamma, generator=torch.Generator().manual_seed(9))
    x, gen = x_T.clone(), torch.Generator().manual_seed(9)
    for t in ref_s.timesteps:
        x = ref_s.step(net(x, t.repeat(2)), t, x, eta=gamma, generator=gen).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


# Teacher schedules other than SD's, from a property fuzz against diffusers: non-divisible T // N grids, the cosine schedule
# with zero terminal SNR (alpha_999 = 0, v-prediction), sample prediction, N > T / 2 (k = 1, grid from t = 0).
OTHER_SCHEDULES = [
    (dict(num_train_timesteps=1200, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon"), 30),
    (dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
          rescale_betas_zero_snr=True), 7),
    (dict(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.015, prediction_type="sample"), 64),
    (dict(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          prediction_type="v_prediction"), 64),
]


@pytest.mark.parametrize("kw, n_ddim", OTHER_SCHEDULES)
def test_grid_draw_and_sampler_match_tcd_scheduler_on_other_schedules(kw, n_ddim):
    ref_s = TCDScheduler(**kw, original_inference_steps=n_ddim)
    sc = NoiseSchedule.from_scheduler(DDPMScheduler(**kw))
    torch.testing.assert_close(sc.alphas_cumprod, ref_s.alphas_cumprod.float())
    T, k = kw["num_train_timesteps"], kw["num_train_timesteps"] // n_ddim
    grid = ddim_grid(T, n_ddim)
    ref_s.set_timesteps(n_ddim)
    assert ref_s.timesteps.flip(0).tolist() == grid.tolist()  # the training grid is TCDScheduler's
    # The draw's rules on this grid: t on it, t_n = max(t - k, 0), s = max(grid[j] - k, 0) with j <= i.
    d = draw_timesteps(2000, grid, k, generator=torch.Generator().manual_seed(0))
    i, j = torch.searchsorted(grid, d.t), torch.searchsorted(grid, d.s + k)
    assert torch.equal(grid[i], d.t) and torch.equal(d.t_n, (d.t - k).clamp(min=0))
    assert torch.all(((d.s == 0) | (grid[j.clamp(max=n_ddim - 1)] == d.s + k)) & (d.s <= d.t_n) & ((d.s == 0) | (j <= i)))
    net = lambda x, t: torch.tanh(x) * 0.5 + 0.3 * torch.sin(t.float().view(-1, 1, 1, 1) / 137.0)
    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    for n, gamma in [(1, 0.3), (3, 0.0), (min(8, n_ddim), 0.55), (4, 1.0)]:
        ref_s.set_timesteps(n)
        assert tcd_timesteps(n, T, n_ddim).tolist() == ref_s.timesteps.tolist()
        ours = sample_tcd(net, x_T, sc, tcd_timesteps(n, T, n_ddim), gamma=gamma, generator=torch.Generator().manual_seed(9))
        x, gen = x_T.clone(), torch.Generator().manual_seed(9)
        for t in ref_s.timesteps:
            x = ref_s.step(net(x, t.repeat(2)), t, x, eta=gamma, generator=gen).prev_sample
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)
