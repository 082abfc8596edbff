"""TCD's strategic stochastic sampler as a pure function (the contract of diffusers' `TCDScheduler`).

`net(x_t, t) -> model_output` closes over the prompt conditioning; the RNG is injected, and `callback`
sees every step, as in k-diffusion's samplers.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .schedule import NoiseSchedule, ddim_grid
from .tcd import lcm_consistency, tcf

StepCallback = Callable[[int, Tensor, Tensor, Tensor], None]


def tcd_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000, original_steps: int = 50) -> Tensor:
    """`num_inference_steps` evenly indexed points of the training grid, descending (TCDScheduler.set_timesteps)."""
    if not 1 <= num_inference_steps <= original_steps:
        raise ValueError(f"num_inference_steps must be in [1, {original_steps}], got {num_inference_steps}")
    grid = ddim_grid(num_train_timesteps, original_steps).flip(0)
    idx = np.floor(np.linspace(0, original_steps, num=num_inference_steps, endpoint=False)).astype(np.int64)
    return grid[torch.from_numpy(idx)]


@torch.no_grad()
def sample_tcd(
    net: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    gamma: float = 0.3,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run TCD sampling from noise `x_T` (TCD paper Alg. 4): jump to `s = floor((1 - gamma) prev_t)`, re-noise to `prev_t`."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    x = x_T
    ts = [int(t) for t in timesteps]
    for i, t_cur in enumerate(ts):
        prev_t = ts[i + 1] if i + 1 < len(ts) else 0
        # The product in float32, as TCDScheduler.step takes it: where (1 - gamma) prev_t is not exact, float64 can floor
        # to the timestep next to TCDScheduler's (gamma 0.3, prev_t 340: 237 against 238), and the samples differ.
        s = int(torch.floor((1.0 - gamma) * torch.tensor(prev_t)))
        t = torch.full((x.shape[0],), t_cur, dtype=torch.long, device=x.device)
        x0_hat, eps_hat = schedule.to_x0_eps(net(x, t), x, t)
        x_s = tcf(x0_hat, eps_hat, schedule, torch.full_like(t, s))
        if gamma > 0 and i + 1 < len(ts):
            # Re-noise from s up to prev_t along the forward process (ab_prev / ab_s is the s -> prev_t transition).
            ab = schedule.alphas_cumprod
            ratio = (ab[prev_t] / ab[s]).item()
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x_s.dtype)
            x = ratio**0.5 * x_s + (1.0 - ratio) ** 0.5 * noise
        else:
            x = x_s
        if callback is not None:
            callback(i, t, x0_hat, x)
    return x


@torch.no_grad()
def sample_lcm(
    net: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,
    schedule: NoiseSchedule,
    timesteps: Tensor,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    timestep_scaling: float = 10.0,
) -> Tensor:
    """LCM multistep sampling (LCM paper Alg. 3): boundary-scaled `x0` then full re-noise to the next timestep.

    `timestep_scaling`: the run's --timestep_scaling_factor (diffusers' LCMScheduler `timestep_scaling`).
    """
    x = x_T
    ts = [int(t) for t in timesteps]
    denoised = x
    for i, t_cur in enumerate(ts):
        t = torch.full((x.shape[0],), t_cur, dtype=torch.long, device=x.device)
        x0_hat, _ = schedule.to_x0_eps(net(x, t), x, t)
        denoised = lcm_consistency(x, x0_hat, t, timestep_scaling)
        if i + 1 < len(ts):
            prev = torch.full_like(t, ts[i + 1])
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=denoised.dtype)
            x = schedule.add_noise(denoised, noise, prev)
        if callback is not None:
            callback(i, t, x0_hat, denoised)
    return denoised
