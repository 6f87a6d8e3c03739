"""DDPM ancestral sampling: Ho et al. 2020, "Denoising Diffusion Probabilistic Models". Reference: diffusers'
DDPMScheduler (variance_type "fixed_small")."""
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
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"variance_type": ("fixed_small", None), "thresholding": (False,)}


class DDPM(Sampler):
    def plan(self, n: int) -> None:
        self.timesteps = torch.from_numpy(spaced_timesteps(self.cfg, n).round().astype(np.int64))

    def update(self, model_output: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Sample the posterior q(x_prev | x_t, x_0) at the model's x_0 (Ho et al. eq. 6-7), prev the next timestep
        of the schedule. Its variance is beta~ = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta; no noise is added
        at t = 0."""
        i = self.i
        t = int(self.timesteps[i])
        prev_t = self.timesteps[i + 1].item() if i + 1 < len(self.timesteps) else -1
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        alpha = alpha_bar / alpha_bar_prev  # of the (possibly multi-step) jump prev -> t
        beta = 1 - alpha
        x0 = x0_from(self.cfg.prediction_type, model_output, x, alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5)
        if self.cfg.clip_sample:
            x0 = x0.clamp(-self.cfg.clip_sample_range, self.cfg.clip_sample_range)
        x0_coeff = alpha_bar_prev ** 0.5 * beta / (1 - alpha_bar)
        x_coeff = alpha ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        mean = x0_coeff * x0 + x_coeff * x
        if t == 0:
            return mean
        variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)
        return mean + variance ** 0.5 * noise_like(model_output, generator)
