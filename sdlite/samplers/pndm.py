"""PNDM, the pseudo numerical methods of Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds": a pseudo Runge-Kutta warm-up of three steps (PRK), then the pseudo linear multi-step method (PLMS).
Reference: diffusers' PNDMScheduler. With skip_prk_steps (as Stable Diffusion's configs have it) the warm-up is one
pseudo improved Euler step instead (crowsonkb's PLMS for latent diffusion)."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import UserError
from .base import Sampler
from .conversions import eps_from
from .training_schedule import TrainingSchedule, spaced_timesteps

PRK_STEPS = 3  # Runge-Kutta warm-up steps: enough model outputs for the fourth-order linear multi-step formula


@dataclass
class PNDMConfig(TrainingSchedule):
    set_alpha_to_one: bool = False  # alpha_bar "before" t = 0: 1, or alpha_bar_0
    skip_prk_steps: bool = False  # warm up with one pseudo improved Euler step instead of three pseudo RK4 steps
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"prediction_type": ("epsilon", "v_prediction")}


class PNDM(Sampler):
    def __init__(self, cfg: PNDMConfig):
        super().__init__(cfg)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def plan(self, n: int) -> None:
        """The timesteps at which the model is evaluated, in the reference's order.

        skip_prk_steps: n + 1, the second repeated for the second evaluation of the warm-up step. Otherwise the three
        RK4 steps from each of the three largest timesteps s to the next, s', evaluate at s, s' + h/2 (twice) and s'
        (h = T // n, h/2 rounded down), then PLMS runs from the fourth largest on: 4 * 3 + n - 3 in all.
        """
        self.step_size = self.cfg.num_train_timesteps // n
        t = spaced_timesteps(self.cfg, n).round().astype(np.int64)
        if self.cfg.skip_prk_steps:
            self.prk_timesteps = t[:0]
            plms_timesteps = np.concatenate([t[:1], t[1:2], t[1:]])
        else:
            if n < PRK_STEPS + 1:
                raise UserError(f"pndm with skip_prk_steps false (Runge-Kutta warm-up) needs at least "
                                f"{PRK_STEPS + 1} steps, not {n}")
            half = self.cfg.num_train_timesteps // n // 2
            self.prk_timesteps = np.array([u for s, s_next in zip(t[:PRK_STEPS], t[1:PRK_STEPS + 1])
                                           for u in (s, s_next + half, s_next + half, s_next)])
            plms_timesteps = t[PRK_STEPS:]
        self.timesteps = torch.from_numpy(np.concatenate([self.prk_timesteps, plms_timesteps]).astype(np.int64))
        self.outputs = []  # the last (up to 4) model outputs at the steps' starts, oldest first
        self.counter = 0  # model evaluations so far in this run: the place in the warm-up (from the img2img start)
        self.start_x = None  # the sample the current warm-up step starts from
        self.rk_sum = 0  # the RK4 step's weighted sum of model outputs so far

    def update(self, model_output: torch.Tensor, x: torch.Tensor, generator=None) -> torch.Tensor:
        t = int(self.timesteps[self.i])
        if self.counter < len(self.prk_timesteps):
            return self.step_prk(model_output, t, x)
        return self.step_plms(model_output, t, x)

    def step_prk(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """One of the four evaluations of a pseudo RK4 step from s to s - h (Liu et al. eq. 10): e_1 at s moves the
        start x to s - h/2, e_2 there moves x to s - h/2 again, e_3 there moves x to s - h, and e_4 there gives the
        step's transfer from x with (e_1 + 2 e_2 + 2 e_3 + e_4) / 6. As in the reference, each transfer's target is
        the timestep passed, less h/2 at the first and third evaluation (h/2 rounded down)."""
        stage = self.counter % 4
        s = int(self.prk_timesteps[self.counter - stage])  # the step's start
        t_to = t - self.step_size // 2 if stage in (0, 2) else t
        if stage == 0:
            self.outputs.append(model_output)  # the output at the start, for the multi-step formulas after
            self.start_x = x
        if stage < 3:
            self.rk_sum = self.rk_sum + model_output * (1 / 6 if stage == 0 else 1 / 3)
        else:
            model_output, self.rk_sum = self.rk_sum + 1 / 6 * model_output, 0
        self.counter += 1
        return self.transfer(self.start_x, s, t_to, model_output)

    def step_plms(self, model_output: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """One transfer step t -> t - T // n with a combination of the model's outputs (Liu et al. eq. 12-13).

        Without the RK4 warm-up: the first output e_0 moves x to t - T // n; the second, e_1 at that point, redoes
        the same step from the same x with (e_0 + e_1) / 2. Then the model is evaluated once per step and its outputs
        are combined by the Adams-Bashforth formulas of order 2, 3 and 4. (With v-prediction the v's are combined,
        and the result turned into eps, as in the reference.)
        """
        if self.counter == 1:
            output = (model_output + self.outputs[-1]) / 2
            x, self.start_x = self.start_x, None
            t_from, t_to = t + self.step_size, t
        else:
            self.outputs = self.outputs[-3:] + [model_output]
            if self.counter == 0:
                self.start_x = x
            e = self.outputs
            if len(e) == 1:
                output = e[-1]
            elif len(e) == 2:
                output = (3 * e[-1] - e[-2]) / 2
            elif len(e) == 3:
                output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
            else:
                output = 1 / 24 * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
            t_from, t_to = t, t - self.step_size
        self.counter += 1
        return self.transfer(x, t_from, t_to, output)

    def transfer(self, x: torch.Tensor, t: int, t_prev: int, model_output: torch.Tensor) -> torch.Tensor:
        """The transfer part phi (Liu et al. eq. 9): the DDIM step t -> t_prev for a noise estimate eps, written as
        x_prev = sqrt(a'/a) x - (a' - a) eps / (a sqrt(1 - a') + sqrt(a (1 - a) a')), a = alpha_bar_t, a' at t_prev."""
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        eps = eps_from(self.cfg.prediction_type, model_output, x, alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5)
        denominator = alpha_bar * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5
        return (alpha_bar_prev / alpha_bar) ** 0.5 * x - (alpha_bar_prev - alpha_bar) * eps / denominator
