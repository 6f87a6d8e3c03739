"""UniPC, second order: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models". Each step first corrects the previous step's result with the new model output (UniC), then
predicts the next sample (UniP), both in data prediction with B(h) = e^h - 1 ("bh2"). Reference: diffusers'
UniPCMultistepScheduler (solver_order 2, solver_type "bh2", predict_x0)."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import schedule


@dataclass
class UniPCConfig(schedule.TrainingSchedule):
    timestep_spacing: str = "linspace"
    use_karras_sigmas: bool = False  # space the sigmas by Karras et al. eq. 5
    # Options of the reference that we do not implement: the only values accepted (the DPM-Solver types are the
    # reference's aliases of bh2).
    only: ClassVar[dict] = {"solver_order": (2,), "predict_x0": (True,),
                            "solver_type": ("bh2", "midpoint", "heun", "logrho"), "lower_order_final": (True,),
                            "disable_corrector": ([],), "final_sigmas_type": ("zero",), "thresholding": (False,),
                            "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
                            "use_flow_sigmas": (False,), "sigma_min": (None,), "sigma_max": (None,),
                            "rescale_betas_zero_snr": (False,)}


class UniPC(schedule.MultistepSampler):
    def set_timesteps(self, n: int, strength: float = 1.0) -> torch.Tensor:
        self.timesteps, self.sigmas = schedule.multistep_sigmas(self.cfg, self.alphas_cumprod, n,
                                                                self.cfg.use_karras_sigmas)
        self.i = schedule.img2img_start(n, strength)  # index of the current step
        self.x0s = []  # the x_0 estimates of the last (up to 2) steps, oldest first
        self.last_x = None  # the sample the last prediction started from
        self.last_order = 0  # the order of the last prediction
        return self.timesteps[self.i:]

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Correct x with this step's x_0 estimate (UniC), then predict the next sample (UniP). Both are second order
        but at the first step (no history yet) and the last (lower_order_final)."""
        alpha, sigma = schedule.alpha_sigma(self.sigmas[self.i])
        x0 = schedule.x0_from(self.cfg.prediction_type, model_output, x, alpha, sigma)
        if self.last_x is not None:
            x = self.correct(x0)
        self.x0s = self.x0s[-1:] + [x0]
        self.last_order = min(2, len(self.timesteps) - self.i, len(self.x0s))
        self.last_x = x
        x = self.predict(x)
        self.i += 1
        return x

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """UniP-2 from step i to i + 1: the first-order step, minus alpha_{i+1} B(h) rho D1 with rho = 1/2."""
        x_next, h, alpha_b = self.first_order_step(self.i, x)
        if self.last_order == 1:
            return x_next
        _, d1 = self.history(self.i, h)
        return x_next - alpha_b * (0.5 * d1)

    def correct(self, x0: torch.Tensor) -> torch.Tensor:
        """UniC redoes the last prediction, step i - 1 to i, with the x_0 estimate just made at i as one more node:
        the first-order step minus alpha_i B(h) (rho_1 D1 + rho_2 (x0 - x0_{i-1})). At order 1, rho_2 = 1/2; at
        order 2, rho solves R rho = g with R = [[1, 1], [r, 1]], g_k = k! hh phi_{k+1}(hh) / B(hh), hh = -h, and
        phi_k the exponential integrators' phi functions: phi_1(z) = B(z) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z.
        """
        x_next, h, alpha_b = self.first_order_step(self.i - 1, self.last_x)
        d_new = x0 - self.x0s[-1]
        if self.last_order == 1:
            return x_next - alpha_b * (0.5 * d_new)
        r, d1 = self.history(self.i - 1, h)
        hh = -h
        b = torch.expm1(hh)
        hh_phi_2 = b / hh - 1
        hh_phi_3 = hh_phi_2 / hh - 1 / 2
        g = torch.stack([hh_phi_2 * 1 / b, hh_phi_3 * 2 / b])
        R = torch.stack([torch.ones(2), torch.stack([r, torch.ones(())])])
        rho = torch.linalg.solve(R, g)
        return x_next - alpha_b * (rho[0] * d1 + rho[1] * d_new)

    def first_order_step(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step i -> i + 1 of DPM-Solver++ 1 (DDIM) with the latest x_0 estimate, x0s[-1]:
        (sigma_{i+1} / sigma_i) x - alpha_{i+1} B(-h) x0, B(z) = e^z - 1 ("bh2"). Returns it, h = lambda_{i+1} -
        lambda_i and alpha_{i+1} B(-h)."""
        _, sigma = schedule.alpha_sigma(self.sigmas[i])
        alpha_next, sigma_next = schedule.alpha_sigma(self.sigmas[i + 1])
        h = schedule.log_snr(self.sigmas[i + 1]) - schedule.log_snr(self.sigmas[i])
        alpha_b = alpha_next * torch.expm1(-h)
        return sigma_next / sigma * x - alpha_b * self.x0s[-1], h, alpha_b

    def history(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, D1) of the step from i: r = (lambda_{i-1} - lambda_i) / h, D1 = (x0_{i-1} - x0_i) / r."""
        r = (schedule.log_snr(self.sigmas[i - 1]) - schedule.log_snr(self.sigmas[i])) / h
        return r, (self.x0s[-2] - self.x0s[-1]) / r
