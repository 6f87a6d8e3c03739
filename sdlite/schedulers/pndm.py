"""PLMS, the pseudo linear multi-step method: Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
Manifolds". Reference: diffusers' PNDMScheduler with skip_prk_steps=True, as Stable Diffusion uses it (its
Runge-Kutta warm-up is replaced by one pseudo improved Euler step)."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from . import schedule


@dataclass
class PNDMConfig(schedule.TrainingSchedule):
    set_alpha_to_one: bool = False  # alpha_bar "before" t = 0: 1, or alpha_bar_0
    # Options of the reference that we do not implement: the only values accepted.
    only: ClassVar[dict] = {"prediction_type": ("epsilon", "v_prediction")}


class PNDM(schedule.Sampler):
    def __init__(self, cfg: PNDMConfig):
        super().__init__(cfg)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, n: int, strength: float = 1.0) -> torch.Tensor:
        """n + 1 timesteps: the second is repeated, for the second model evaluation of the warm-up step."""
        self.step_size = self.cfg.num_train_timesteps // n
        t = schedule.spaced_timesteps(self.cfg, n).round().astype(np.int64)
        self.timesteps = torch.from_numpy(np.concatenate([t[:1], t[1:2], t[1:]]))
        self.outputs = []  # the last (up to 4) model outputs, oldest first
        self.counter = 0  # model evaluations so far
        self.warmup_x = None  # the sample the warm-up step starts from
        return self.timesteps[schedule.img2img_start(n, strength):]

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor, generator=None) -> torch.Tensor:
        """One transfer step t -> t - T // n with a combination of the model's outputs (Liu et al. eq. 12-13).

        Warm-up: the first output e_0 moves x to t - T // n; the second, e_1 at that point, redoes the same step
        from the same x with (e_0 + e_1) / 2. Then the model is evaluated once per step and its outputs are combined
        by the Adams-Bashforth formulas of order 2, 3 and 4. (With v-prediction the v's are combined, and the
        result turned into eps, as in the reference.)
        """
        t = int(t)
        if self.counter == 1:
            output = (model_output + self.outputs[-1]) / 2
            x, self.warmup_x = self.warmup_x, None
            t_from, t_to = t + self.step_size, t
        else:
            self.outputs = self.outputs[-3:] + [model_output]
            if self.counter == 0:
                self.warmup_x = x
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
        eps = schedule.eps_from(self.cfg.prediction_type, model_output, x, alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5)
        denominator = alpha_bar * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5
        return (alpha_bar_prev / alpha_bar) ** 0.5 * x - (alpha_bar_prev - alpha_bar) * eps / denominator
