"""DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", deterministic (eta = 0) or with noise (eta > 0;
eta = 1 is DDPM's posterior variance). Reference: diffusers' DDIMScheduler (eta is its step's argument)."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import Sampler
from .conversions import eps_from, noise_like, x0_from
from .training_schedule import TrainingSchedule, spaced_timesteps


@dataclass
class DDIMConfig(TrainingSchedule):
    clip_sample: bool = True  # clamp the x_0 estimate to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # alpha_bar "before" t = 0: 1, or alpha_bar_0
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)
    eta: float = 0.0  # the noise of each step, Song et al.'s eta (not a scheduler_config.json key: the caller's)
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"thresholding": (False,)}


class DDIM(Sampler):
    def __init__(self, cfg: DDIMConfig):
        super().__init__(cfg)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def plan(self, n: int) -> None:
        self.step_size = self.cfg.num_train_timesteps // n
        self.timesteps = torch.from_numpy(spaced_timesteps(self.cfg, n).round().astype(np.int64))

    def update(self, model_output: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        """x_{t-1} = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev - sigma_t^2) eps + sigma_t z (Song et al.
        eq. 12), sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) (1 - alpha_bar / alpha_bar_prev)) (eq. 16),
        z fresh noise from generator when eta > 0 (at every step, the last too, as in the reference).

        The previous timestep is t - T // n, whatever the spacing (as in the reference).
        """
        t = int(self.timesteps[self.i])
        prev_t = t - self.step_size
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        alpha, sigma = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
        x0 = x0_from(self.cfg.prediction_type, model_output, x, alpha, sigma)
        eps = eps_from(self.cfg.prediction_type, model_output, x, alpha, sigma)
        if self.cfg.clip_sample:
            x0 = x0.clamp(-self.cfg.clip_sample_range, self.cfg.clip_sample_range)
        if self.cfg.eta == 0:
            return alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        std = self.cfg.eta * variance ** 0.5
        x_prev = alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev - std ** 2) ** 0.5 * eps
        return x_prev + std * noise_like(model_output, generator)
