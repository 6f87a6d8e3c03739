"""Euler's method on the probability-flow ODE dx/dsigma = (x - x_0(x, sigma)) / sigma: Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", algorithm 1 without its second-order
correction (k-diffusion's sample_euler). Reference: diffusers' EulerDiscreteScheduler."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import SigmaSampler
from .conversions import denoised
from .training_schedule import TrainingSchedule


@dataclass
class EulerConfig(TrainingSchedule):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False  # space the sigmas by Karras et al. eq. 5
    final_sigmas_type: str = "zero"  # the last step goes to sigma 0 ("zero") or to sigma at t = 0 ("sigma_min")
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"interpolation_type": ("linear",), "use_exponential_sigmas": (False,),
                            "use_beta_sigmas": (False,), "sigma_min": (None,), "sigma_max": (None,),
                            "timestep_type": ("discrete",), "final_sigmas_type": ("zero", "sigma_min")}


class Euler(SigmaSampler):
    def update(self, model_output: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        """x <- x + (sigma_next - sigma) d, d = (x - x_0) / sigma."""
        sigma, sigma_next = self.sigmas[self.i], self.sigmas[self.i + 1]
        x0 = denoised(self.cfg.prediction_type, model_output, x, sigma)
        derivative = (x - x0) / sigma
        return x + derivative * (sigma_next - sigma)
