"""The teacher's noise schedule, the skipping-step DDIM grid and the (t, t_n, s) draw of TCD.

Pure torch, no I/O. Notation follows the TCD paper (arXiv 2402.19159):
`ab_t = alphas_cumprod[t]`, `alpha_t = sqrt(ab_t)`, `sigma_t = sqrt(1 - ab_t)`, `lambda_t = log(alpha_t / sigma_t)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """SD's `scaled_linear` schedule: betas linear in sqrt-space, `ab_t = prod_{i<=t} (1 - beta_i)`."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector [B] so it broadcasts over a batch like `like` [B, ...]."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete VP schedule of the teacher and the conversions between its parameterisations."""

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "NoiseSchedule":
        """Take `alphas_cumprod` and `prediction_type` from any diffusers scheduler object."""
        return cls(scheduler.alphas_cumprod.detach().float().clone(), scheduler.config.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        """`T`, the number of discrete training timesteps."""
        return int(self.alphas_cumprod.shape[0])

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """The same schedule with `alphas_cumprod` on `device`."""
        return NoiseSchedule(self.alphas_cumprod.to(device), self.prediction_type)

    def alpha_sigma(self, t: Tensor, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`(alpha_t, sigma_t)` for integer timesteps `t`, broadcast to `like` when given (fp32)."""
        ab = self.alphas_cumprod.to(t.device)[t.long()]
        a, s = ab.sqrt(), (1.0 - ab).sqrt()
        if like is not None:
            a, s = _bcast(a, like), _bcast(s, like)
        return a, s

    def to_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Network output in the teacher's parameterisation -> `(x0_hat, eps_hat)` consistent with `x_t`."""
        a, s = self.alpha_sigma(t, like=x_t)
        out = model_output.float()
        x_t = x_t.float()
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x_t - s * eps) / a
        elif self.prediction_type == "v_prediction":
            # v = alpha * eps - sigma * x0 (Salimans & Ho), with alpha^2 + sigma^2 = 1.
            x0 = a * x_t - s * out
            eps = s * x_t + a * out
        else:
            x0 = out
            eps = (x_t - a * x0) / s
        return x0, eps

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward diffusion `x_t = alpha_t * x0 + sigma_t * eps`."""
        a, s = self.alpha_sigma(t, like=x0)
        return a * x0 + s * eps


def ddim_grid(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> Tensor:
    """Skipping-step grid `grid[i] = (i + 1) * k - 1`, `k = T // N` (the TCDScheduler training grid)."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}")
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * k - 1


def zero_snr_top(schedule: NoiseSchedule, num_ddim_timesteps: int) -> int | None:
    """The top timestep of the `num_ddim_timesteps`-point grid when an epsilon-prediction model cannot give x0 there (zero
    SNR, `rescale_betas_zero_snr`: `x0 = (x_t - sigma_t eps) / alpha_t` divides by alpha_t = 0, NaN), else None."""
    top = int(ddim_grid(schedule.num_train_timesteps, num_ddim_timesteps)[-1])
    return top if schedule.prediction_type == "epsilon" and float(schedule.alphas_cumprod[top]) <= 0.0 else None


@dataclass
class TimestepDraw:
    """One draw of the per-sample TCD variables: `t` (= t_{n+k}), `t_n = t - k`, and the target time `s`."""

    t: Tensor
    t_n: Tensor
    s: Tensor


def draw_timesteps(
    batch_size: int,
    grid: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    mode: str = "tcd",
) -> TimestepDraw:
    """Draw `i ~ U{0..N-1}`, `t = grid[i]`, `t_n = max(t - k, 0)` and `j ~ U{0..i}`, `s = max(grid[j] - k, 0)`.

    `mode="lcm"` fixes `s = 0` (LCM is the s = 0 special case of TCD).
    """
    n = grid.shape[0]
    i = torch.randint(0, n, (batch_size,), generator=generator, device=grid.device)
    t = grid[i]
    t_n = (t - k).clamp(min=0)
    if mode == "lcm":
        return TimestepDraw(t=t, t_n=t_n, s=torch.zeros_like(t))
    if mode != "tcd":
        raise ValueError(f"mode must be 'tcd' or 'lcm', got {mode!r}")
    # j ~ U{0..i} inclusive: floor(u * (i + 1)) with u ~ U[0, 1) is exact and vectorised.
    u = torch.rand(batch_size, generator=generator, device=grid.device, dtype=torch.float64)
    j = torch.minimum((u * (i + 1).double()).floor().long(), i)
    s = (grid[j] - k).clamp(min=0)
    return TimestepDraw(t=t, t_n=t_n, s=s)
