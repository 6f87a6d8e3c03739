"""DPM-Solver++ multistep: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", algorithm 2 (multistep, data prediction), of order 1 (DDIM), 2 or 3. Reference: diffusers'
DPMSolverMultistepScheduler (algorithm_type "dpmsolver++"), optionally with Karras sigmas or uniform-lambda steps."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import MultistepSampler
from .conversions import alpha_sigma, log_snr, multistep_sigmas, x0_from
from .training_schedule import TrainingSchedule


@dataclass
class DPMSolverConfig(TrainingSchedule):
    timestep_spacing: str = "linspace"
    solver_order: int = 2  # 1, 2 or 3
    solver_type: str = "midpoint"  # the second-order formula: "midpoint" or "heun" (the aliases are "midpoint")
    lower_order_final: bool = True  # with fewer than 15 steps, lower the order for the last two steps
    euler_at_final: bool = False  # first order at the last step, whatever the number of steps
    use_karras_sigmas: bool = False  # space the sigmas by Karras et al. eq. 5
    use_lu_lambdas: bool = False  # space the steps evenly in lambda (log SNR / 2)
    final_sigmas_type: str = "zero"  # the last step goes to sigma 0 ("zero") or to sigma at t = 0 ("sigma_min")
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)
    # Options of the reference that we do not implement: the only values accepted ("deis" and the UniPC solver
    # types are the reference's aliases of these).
    only: ClassVar[dict] = {"solver_order": (1, 2, 3), "algorithm_type": ("dpmsolver++", "deis"),
                            "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
                            "final_sigmas_type": ("zero", "sigma_min"),
                            "lambda_min_clipped": (-float("inf"),), "variance_type": (None,),
                            "thresholding": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
                            "use_flow_sigmas": (False,), "use_dynamic_shifting": (False,)}


class DPMSolver(MultistepSampler):
    def plan(self, n: int) -> None:
        cfg = self.cfg
        spacing = "karras" if cfg.use_karras_sigmas else "lu" if cfg.use_lu_lambdas else None
        # The reference truncates (does not round) the re-spaced timesteps of the cosine schedule.
        self.timesteps, self.sigmas = multistep_sigmas(
            cfg, self.alphas_cumprod, n, spacing, cfg.final_sigmas_type,
            round_timesteps=cfg.beta_schedule != "squaredcos_cap_v2")
        self.x0s = []  # the x_0 estimates of the last (up to solver_order) steps, oldest first

    def order(self) -> int:
        """The order of this step: solver_order, lower while there is too little history, and at the end: first
        order at the last step if it goes to sigma 0 (or euler_at_final, or lower_order_final with fewer than 15
        steps), at most second order at the second last (lower_order_final with fewer than 15 steps)."""
        n, cfg = len(self.timesteps), self.cfg
        short = cfg.lower_order_final and n < 15
        if self.i == n - 1 and (cfg.euler_at_final or short or cfg.final_sigmas_type == "zero"):
            return 1
        if self.i == n - 2 and short:
            return min(cfg.solver_order, len(self.x0s), 2)
        return min(cfg.solver_order, len(self.x0s))

    def update(self, model_output: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Exact integration of the linear part, and of the x_0 estimate extrapolated in lambda from this step's
        (D0) and the previous ones' (Lu et al. 2022, eq. 9 and algorithm 2):
        x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D0 + [order 2 and 3 terms], h = lambda_next - lambda.
        """
        s, s_next = self.sigmas[self.i], self.sigmas[self.i + 1]
        alpha, sigma = alpha_sigma(s)
        alpha_next, sigma_next = alpha_sigma(s_next)
        x0 = x0_from(self.cfg.prediction_type, model_output, x, alpha, sigma)
        self.x0s = (self.x0s + [x0])[-self.cfg.solver_order:]
        order = self.order()
        h = log_snr(s_next) - log_snr(s)
        phi = torch.exp(-h) - 1.0
        x = sigma_next / sigma * x - alpha_next * phi * self.x0s[-1]
        if order >= 2:
            # D1 = (D0 - x0_prev) / r0, r0 = h_prev / h: the slope in lambda, times h
            h0 = log_snr(s) - log_snr(self.sigmas[self.i - 1])
            d1_0 = (self.x0s[-1] - self.x0s[-2]) / (h0 / h)
        if order == 2:
            if self.cfg.solver_type == "heun":  # the exact integral of the linear extrapolation
                x = x + alpha_next * (phi / h + 1.0) * d1_0
            else:  # the midpoint rule: the extrapolation at lambda + h/2
                x = x - 0.5 * alpha_next * phi * d1_0
        elif order == 3:
            # quadratic extrapolation through the last three x_0 estimates: first and second divided differences
            h1 = log_snr(self.sigmas[self.i - 1]) - log_snr(self.sigmas[self.i - 2])
            r0, r1 = h0 / h, h1 / h
            d1_1 = (self.x0s[-2] - self.x0s[-3]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + alpha_next * (phi / h + 1.0) * d1 - alpha_next * ((phi + h) / h ** 2 - 0.5) * d2
        return x
