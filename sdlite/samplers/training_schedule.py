"""The training schedule: the forward process Stable Diffusion was trained on, which every sampler runs backwards.
Read this first, then conversions.py (the quantities the samplers derive from it), then base.py (the samplers'
contract).

Stable Diffusion is trained on a discrete forward process of T steps (Ho et al. 2020, eq. 4):
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,    alpha_bar_t = prod_{s <= t} (1 - beta_s).
A diffusers scheduler_config.json describes it (TrainingSchedule); alphas_cumprod computes alpha_bar_t in fp32, as the
reference does, add_noise samples it, and spaced_timesteps picks the n of the T timesteps that a sampler runs.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError


class NotImplementedOption(UserError, NotImplementedError):
    """A config value of the reference that sdlite does not implement: the CLI reports it in one line."""


@dataclass
class TrainingSchedule:
    """The keys of a diffusers scheduler_config.json that describe the training schedule (every sampler has them).

    The defaults are diffusers' own; a sampler's config subclasses this and may change them (timestep_spacing).
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # or "scaled_linear" (SD), "squaredcos_cap_v2"
    trained_betas: list[float] | None = None  # overrides beta_schedule
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon", "v_prediction" or "sample" (x_0)
    timestep_spacing: str = "leading"  # how n inference timesteps are picked among the T: see spaced_timesteps
    steps_offset: int = 0  # added to "leading" timesteps (SD uses 1, so that they end at t = 1, not 0)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The "squaredcos_cap_v2" schedule: alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2) (Nichol & Dhariwal 2021,
    eq. 17), betas = 1 - alpha_bar(t + 1/T) / alpha_bar(t) clipped at max_beta, in float64 then fp32."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def alphas_cumprod(cfg: TrainingSchedule) -> torch.Tensor:
    """alpha_bar_t for t = 0 .. T-1, fp32."""
    T = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":  # linear in sqrt(beta): the latent diffusion models' schedule
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(T)
    else:
        raise NotImplementedOption(f"beta_schedule {cfg.beta_schedule!r} is not implemented: use 'linear', "
                                   f"'scaled_linear' or 'squaredcos_cap_v2'")
    if getattr(cfg, "rescale_betas_zero_snr", False):  # only the samplers whose reference has the option have it
        betas = zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """The betas rescaled so that the last timestep is pure noise (Lin et al. 2023, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", algorithm 1): sqrt(alpha_bar) shifted to end at 0 and scaled to keep its start."""
    root = torch.cumprod(1.0 - betas, dim=0) ** 0.5
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root ** 2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def spaced_timesteps(cfg: TrainingSchedule, n: int) -> np.ndarray:
    """n of the T training timesteps, descending, float64 (rounded by the samplers that want integers).

    "linspace": evenly from T-1 down to 0 (not rounded here); "leading": 0, T//n, 2T//n, ... plus steps_offset;
    "trailing": T-1, T-1 - T/n, ... rounded (Lin et al. 2023, table 2).
    """
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1]
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return np.arange(T, 0, -T / n).round() - 1
    raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r}: use 'linspace', 'leading' or 'trailing'")


def add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. eq. 4), t: one per item."""
    alpha_bar = alphas_cumprod.to(x0.dtype)[t.long()].view(-1, *[1] * (x0.ndim - 1))
    return alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise
