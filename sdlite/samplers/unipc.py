"""UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
of order 1-3. Each step first corrects the previous step's result with the new model output (UniC), then predicts
the next sample (UniP), both in data prediction with B(h) = e^h - 1 ("bh2") or B(h) = h ("bh1"). Reference:
diffusers' UniPCMultistepScheduler (predict_x0)."""
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import MultistepSampler
from .conversions import alpha_sigma, log_snr, multistep_sigmas, x0_from
from .training_schedule import TrainingSchedule


@dataclass
class UniPCConfig(TrainingSchedule):
    timestep_spacing: str = "linspace"
    solver_order: int = 2  # 1, 2 or 3
    solver_type: str = "bh2"  # B(h): "bh2" e^h - 1, "bh1" h (the DPM-Solver types are the reference's aliases of bh2)
    lower_order_final: bool = True  # lower the order at the last steps, to the number of steps left
    disable_corrector: tuple = ()  # the steps (indices in the schedule) whose result is not corrected
    use_karras_sigmas: bool = False  # space the sigmas by Karras et al. eq. 5
    final_sigmas_type: str = "zero"  # the last step goes to sigma 0 ("zero") or to sigma at t = 0 ("sigma_min")
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023)
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"solver_order": (1, 2, 3), "predict_x0": (True,),
                            "solver_type": ("bh1", "bh2", "midpoint", "heun", "logrho"),
                            "final_sigmas_type": ("zero", "sigma_min"), "thresholding": (False,),
                            "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
                            "use_flow_sigmas": (False,), "sigma_min": (None,), "sigma_max": (None,),
                            "solver_p": (None,), "use_dynamic_shifting": (False,), "shift_terminal": (None,)}


class UniPC(MultistepSampler):
    def plan(self, n: int) -> None:
        self.timesteps, self.sigmas = multistep_sigmas(
            self.cfg, self.alphas_cumprod, n, "karras" if self.cfg.use_karras_sigmas else None,
            self.cfg.final_sigmas_type)
        self.x0s = []  # the x_0 estimates of the last (up to solver_order) steps, oldest first
        self.last_x = None  # the sample the last prediction started from
        self.last_order = 0  # the order of the last prediction

    def update(self, model_output: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Correct x with this step's x_0 estimate (UniC), then predict the next sample (UniP). The order is
        solver_order but at the first steps (too little history) and, with lower_order_final, the last ones (at most
        the number of steps left)."""
        alpha, sigma = alpha_sigma(self.sigmas[self.i])
        x0 = x0_from(self.cfg.prediction_type, model_output, x, alpha, sigma)
        if self.last_x is not None and self.i - 1 not in self.cfg.disable_corrector:
            x = self.correct(x0)
        self.x0s = (self.x0s + [x0])[-self.cfg.solver_order:]
        order = self.cfg.solver_order
        if self.cfg.lower_order_final:
            order = min(order, len(self.timesteps) - self.i)
        self.last_order = min(order, len(self.x0s))
        self.last_x = x
        return self.predict(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """UniP-p from step i to i + 1 with the p - 1 earlier x_0 estimates: the first-order step minus
        alpha_{i+1} B(h) sum_k rho_k D_k, rho = 1/2 at order 2 and the solution of R rho = g (see rho) at order 3."""
        x_next, h, alpha_b = self.first_order_step(self.i, x)
        if self.last_order == 1:
            return x_next
        r, d = self.history(self.i, h, self.last_order - 1)
        rho = torch.tensor([0.5]) if self.last_order == 2 else self.rho(r[:-1], h)
        return x_next - alpha_b * sum(rho_k * d_k for rho_k, d_k in zip(rho, d))

    def correct(self, x0: torch.Tensor) -> torch.Tensor:
        """UniC-p redoes the last prediction, step i - 1 to i, with the x_0 estimate just made at i as one more node:
        the first-order step minus alpha_i B(h) (sum_k rho_k D_k + rho_p (x0 - x0_{i-1})), rho_1 = 1/2 at order 1."""
        x_next, h, alpha_b = self.first_order_step(self.i - 1, self.last_x)
        d_new = x0 - self.x0s[-1]
        r, d = self.history(self.i - 1, h, self.last_order - 1)
        rho = torch.tensor([0.5]) if self.last_order == 1 else self.rho(r, h)
        return x_next - alpha_b * (sum(rho_k * d_k for rho_k, d_k in zip(rho[:-1], d)) + rho[-1] * d_new)

    def rho(self, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Solve R rho = g, R_jk = r_k^(j-1) (r: the nodes' lambda offsets over h), g_j = j! hh phi_{j+1}(hh) / B(hh),
        hh = -h, with the exponential integrators' phi functions: hh phi_1(hh) = e^hh - 1,
        phi_{k+1}(z) = (phi_k(z) - 1/k!) / z."""
        hh = -h
        b = torch.expm1(hh) if self.cfg.solver_type != "bh1" else hh
        g, hh_phi, factorial = [], torch.expm1(hh) / hh - 1, 1  # hh_phi: hh phi_2(hh)
        for j in range(1, len(r) + 1):
            g.append(hh_phi * factorial / b)
            factorial *= j + 1
            hh_phi = hh_phi / hh - 1 / factorial
        R = torch.stack([r ** (j - 1) for j in range(1, len(r) + 1)])
        return torch.linalg.solve(R, torch.stack(g))

    def first_order_step(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step i -> i + 1 of DPM-Solver++ 1 (DDIM) with the latest x_0 estimate, x0s[-1]:
        (sigma_{i+1} / sigma_i) x - alpha_{i+1} (e^-h - 1) x0. Returns it, h = lambda_{i+1} - lambda_i and
        alpha_{i+1} B(-h)."""
        _, sigma = alpha_sigma(self.sigmas[i])
        alpha_next, sigma_next = alpha_sigma(self.sigmas[i + 1])
        h = log_snr(self.sigmas[i + 1]) - log_snr(self.sigmas[i])
        alpha_b = alpha_next * (torch.expm1(-h) if self.cfg.solver_type != "bh1" else -h)
        return sigma_next / sigma * x - alpha_next * torch.expm1(-h) * self.x0s[-1], h, alpha_b

    def history(self, i: int, h: torch.Tensor, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The nodes of the step from i: r_j = (lambda_{i-j} - lambda_i) / h for the k earlier estimates and 1 for the
        step's end, and the differences D_j = (x0_{i-j} - x0_i) / r_j, j = 1..k (x0_i is x0s[-1])."""
        lam = log_snr(self.sigmas[i])
        r = [(log_snr(self.sigmas[i - j]) - lam) / h for j in range(1, k + 1)]
        d = [(self.x0s[-1 - j] - self.x0s[-1]) / r_j for j, r_j in enumerate(r, 1)]
        return torch.stack(r + [torch.ones(())]), d
