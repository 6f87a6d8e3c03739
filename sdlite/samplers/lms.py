"""Linear multistep (LMS): k-diffusion's sample_lms, which integrates the probability-flow ODE
dx/dsigma = (x - x_0(x, sigma)) / sigma (Karras et al. 2022) by Adams-Bashforth-type formulas on the uneven sigma grid.
Reference: diffusers' LMSDiscreteScheduler."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import SigmaSampler
from .conversions import denoised
from .training_schedule import TrainingSchedule

ORDER = 4


@dataclass
class LMSConfig(TrainingSchedule):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False  # space the sigmas by Karras et al. eq. 5
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"use_exponential_sigmas": (False,), "use_beta_sigmas": (False,)}


class LMS(SigmaSampler):
    def plan(self, n: int) -> None:
        super().plan(n)
        self.derivatives = []  # the last (up to ORDER) dx/dsigma, oldest first

    def update(self, model_output: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        """x <- x + sum_j c_j d_{i-j}: the integral from sigma_i to sigma_{i+1} of the polynomial through the last
        derivatives d = (x - x_0) / sigma.

        The order is min(i + 1, 4) with i the index in the whole schedule, as in the reference: after an img2img
        start, the first steps use the leading coefficients of a higher-order fit over the derivatives there are.
        """
        sigma = self.sigmas[self.i]
        x0 = denoised(self.cfg.prediction_type, model_output, x, sigma)
        self.derivatives = (self.derivatives + [(x - x0) / sigma])[-ORDER:]
        order = min(self.i + 1, ORDER)
        coeffs = [self.coefficient(order, j) for j in range(order)]
        return x + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))

    def coefficient(self, order: int, j: int) -> float:
        """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through the nodes sigma_i,
        sigma_{i-1}, ..., sigma_{i-order+1} that is 1 at sigma_{i-j}: exact, in float64."""
        nodes = [self.sigmas[self.i - k].item() for k in range(order)]
        basis = np.polynomial.Polynomial([1.0])
        for k, node in enumerate(nodes):
            if k != j:
                basis *= np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
        integral = basis.integ()
        return float(integral(self.sigmas[self.i + 1].item()) - integral(nodes[0]))
