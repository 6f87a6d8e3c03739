"""Euler ancestral: k-diffusion's sample_euler_ancestral. Each step is an Euler step of the probability-flow ODE
(as in euler.py) to below the next noise level, plus fresh noise back up to it: the noise of DDIM with eta = 1
(Song et al. 2021, eq. 16), in sigma terms. Reference: diffusers' EulerAncestralDiscreteScheduler."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import SigmaSampler
from .conversions import denoised, noise_like
from .training_schedule import TrainingSchedule


@dataclass
class EulerAncestralConfig(TrainingSchedule):
    timestep_spacing: str = "linspace"
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"prediction_type": ("epsilon", "v_prediction")}


class EulerAncestral(SigmaSampler):
    def update(self, model_output: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Euler step from sigma to sigma_down, then noise of std sigma_up, where sigma_down^2 + sigma_up^2 =
        sigma_next^2 and sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2. The noise is drawn from
        generator at every step, the last included (as in the reference)."""
        sigma = self.sigmas[self.i]
        sigma_next = self.sigmas[self.i + 1]
        x0 = denoised(self.cfg.prediction_type, model_output, x, sigma)
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        derivative = (x - x0) / sigma
        x = x + derivative * (sigma_down - sigma)
        return x + noise_like(model_output, generator) * sigma_up
