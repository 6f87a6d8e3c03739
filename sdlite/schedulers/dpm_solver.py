"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", algorithm 2 (multistep, second order, data prediction). Reference: diffusers' DPMSolverMultistepScheduler
(algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint"), optionally with Karras sigmas."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import schedule


@dataclass
class DPMSolverConfig(schedule.TrainingSchedule):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False  # space the sigmas by Karras et al. eq. 5
    # Options of the reference that we do not implement: the only values accepted ("deis" and the UniPC solver
    # types are the reference's aliases of these).
    only: ClassVar[dict] = {"solver_order": (2,), "algorithm_type": ("dpmsolver++", "deis"),
                            "solver_type": ("midpoint", "logrho", "bh1", "bh2"), "final_sigmas_type": ("zero",),
                            "lambda_min_clipped": (-float("inf"),), "variance_type": (None,),
                            "thresholding": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
                            "use_lu_lambdas": (False,), "use_flow_sigmas": (False,), "rescale_betas_zero_snr": (False,)}


class DPMSolver(schedule.MultistepSampler):
    def set_timesteps(self, n: int, strength: float = 1.0) -> torch.Tensor:
        # The reference truncates (does not round) the Karras timesteps of the cosine schedule.
        self.timesteps, self.sigmas = schedule.multistep_sigmas(
            self.cfg, self.alphas_cumprod, n, self.cfg.use_karras_sigmas,
            round_karras_timesteps=self.cfg.beta_schedule != "squaredcos_cap_v2")
        self.i = schedule.img2img_start(n, strength)  # index of the current step
        self.previous_x0 = None  # the x_0 estimate of the step before, once there is one
        return self.timesteps[self.i:]

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Exact integration of the linear part, and of the x_0 estimate extrapolated linearly in lambda from this
        step's (D0) and the previous one's: x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) (D0 + D1 / 2),
        h = lambda_next - lambda, D1 = (D0 - x0_prev) h / h_prev. First order (D1 = 0: DDIM) at the first and the
        last step."""
        s, s_next = self.sigmas[self.i], self.sigmas[self.i + 1]
        alpha, sigma = schedule.alpha_sigma(s)
        alpha_next, sigma_next = schedule.alpha_sigma(s_next)
        x0 = schedule.x0_from(self.cfg.prediction_type, model_output, x, alpha, sigma)
        h = schedule.log_snr(s_next) - schedule.log_snr(s)
        phi = alpha_next * (torch.exp(-h) - 1.0)
        if self.previous_x0 is None or self.i == len(self.timesteps) - 1:
            x = sigma_next / sigma * x - phi * x0
        else:
            r = (schedule.log_snr(s) - schedule.log_snr(self.sigmas[self.i - 1])) / h
            d1 = 1.0 / r * (x0 - self.previous_x0)
            x = sigma_next / sigma * x - phi * x0 - 0.5 * phi * d1
        self.previous_x0 = x0
        self.i += 1
        return x
