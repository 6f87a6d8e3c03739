"""DDIM, deterministic (eta = 0): Song et al. 2021, "Denoising Diffusion Implicit Models". Reference: diffusers'
DDIMScheduler."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from . import schedule


@dataclass
class DDIMConfig(schedule.TrainingSchedule):
    clip_sample: bool = True  # clamp the x_0 estimate to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # alpha_bar "before" t = 0: 1, or alpha_bar_0
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"thresholding": (False,)}


class DDIM(schedule.Sampler):
    def __init__(self, cfg: DDIMConfig):
        super().__init__(cfg)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, n: int, strength: float = 1.0) -> torch.Tensor:
        self.step_size = self.cfg.num_train_timesteps // n
        self.timesteps = torch.from_numpy(schedule.spaced_timesteps(self.cfg, n).round().astype(np.int64))
        return self.timesteps[schedule.img2img_start(n, strength):]

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None) -> torch.Tensor:
        """x_{t-1} = sqrt(alpha_bar_prev) x_0 + sqrt(1 - alpha_bar_prev) eps (Song et al. eq. 12 with sigma_t = 0).

        The previous timestep is t - T // n, whatever the spacing (as in the reference).
        """
        t = int(t)
        prev_t = t - self.step_size
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        alpha, sigma = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
        x0 = schedule.x0_from(self.cfg.prediction_type, model_output, x, alpha, sigma)
        eps = schedule.eps_from(self.cfg.prediction_type, model_output, x, alpha, sigma)
        if self.cfg.clip_sample:
            x0 = x0.clamp(-self.cfg.clip_sample_range, self.cfg.clip_sample_range)
        return alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps
