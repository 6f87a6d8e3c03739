"""DDPM ancestral sampling: Ho et al. 2020, "Denoising Diffusion Probabilistic Models". Reference: diffusers'
DDPMScheduler, with its variance types fixed_small, fixed_large and learned_range."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import Sampler
from .conversions import noise_like, x0_from
from .training_schedule import TrainingSchedule, spaced_timesteps


@dataclass
class DDPMConfig(TrainingSchedule):
    clip_sample: bool = True  # clamp the x_0 estimate to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)
    variance_type: str | None = "fixed_small"  # of each step's noise: see DDPM.variance (None: fixed_small)
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"variance_type": ("fixed_small", "fixed_large", "learned_range", None),
                            "thresholding": (False,)}


class DDPM(Sampler):
    def plan(self, n: int) -> None:
        self.timesteps = torch.from_numpy(spaced_timesteps(self.cfg, n).round().astype(np.int64))

    def update(self, model_output: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Sample the posterior q(x_prev | x_t, x_0) at the model's x_0 (Ho et al. eq. 6-7), prev the next timestep
        of the schedule, with the variance of `variance`; no noise is added at t = 0. A learned_range model outputs
        eps and v stacked on the channels (2x x's channels)."""
        i = self.i
        t = int(self.timesteps[i])
        prev_t = self.timesteps[i + 1].item() if i + 1 < len(self.timesteps) else -1
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        alpha = alpha_bar / alpha_bar_prev  # of the (possibly multi-step) jump prev -> t
        beta = 1 - alpha
        v = None
        if self.cfg.variance_type == "learned_range":
            model_output, v = model_output.split(x.shape[1], dim=1)
        x0 = x0_from(self.cfg.prediction_type, model_output, x, alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5)
        if self.cfg.clip_sample:
            x0 = x0.clamp(-self.cfg.clip_sample_range, self.cfg.clip_sample_range)
        x0_coeff = alpha_bar_prev ** 0.5 * beta / (1 - alpha_bar)
        x_coeff = alpha ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        mean = x0_coeff * x0 + x_coeff * x
        if t == 0:
            return mean
        noise = noise_like(model_output, generator)
        return mean + self.variance(alpha_bar, alpha_bar_prev, beta, v) ** 0.5 * noise

    def variance(self, alpha_bar, alpha_bar_prev, beta, v: torch.Tensor | None) -> torch.Tensor:
        """The variance of the step t -> prev: the posterior's beta~ = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta
        ("fixed_small", Ho et al. eq. 7), beta itself ("fixed_large", Ho et al. sec. 3.2: both are optimal for
        extreme data), or the model's interpolation between the two in the log domain, exp(u log beta +
        (1 - u) log beta~) with u = (v + 1) / 2 ("learned_range", Nichol & Dhariwal 2021, eq. 15)."""
        small = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)
        if self.cfg.variance_type == "fixed_large":
            return beta
        if self.cfg.variance_type == "learned_range":
            u = (v + 1) / 2
            return torch.exp(u * torch.log(beta) + (1 - u) * torch.log(small))
        return small
