"""The contract every sampler keeps, in code: Sampler, and the bases of the two families that step through sigmas.

A sampler ("scheduler" in diffusers) runs the training schedule (training_schedule.py) backwards: given the UNet's
output at a step, it moves x to the next step. The denoising loop drives every sampler the same way, so it never
asks which one it has:

    timesteps = sampler.set_timesteps(n, strength)      # the timesteps to run; strength < 1 (img2img) skips the first
    x = noise * sampler.init_sigma                      # txt2img; img2img: x = sampler.add_noise(x0, noise,
                                                        #   timesteps[:1].repeat(batch))
    for t in timesteps:
        model_output = unet(sampler.scale_input(x, t), t)   # eps, v or x_0, as the config's prediction_type says
        x = sampler.step(model_output, t, x, generator)     # DDPM and Euler ancestral draw noise from generator

A sampler has state, and says so: it walks one schedule at a time, in order. set_timesteps plans the schedule
(self.timesteps), forgets the last run (the multistep methods' history) and puts the cursor self.i, an index into
self.timesteps, on the first step to run; step does the step at the cursor and moves the cursor on by one, in
Sampler.step and nowhere else. Every sampler reads its place from self.i; the t the caller passes is checked
against it. A sampler implements two methods: plan (its schedule for n steps) and update (the arithmetic of the
step at self.i); Sampler's set_timesteps and step wrap them.
"""
from abc import ABC, abstractmethod

import torch

from . import training_schedule
from .conversions import alpha_sigma, k_diffusion_init_sigma, k_diffusion_sigmas
from .training_schedule import TrainingSchedule, alphas_cumprod


def img2img_start(n: int, strength: float) -> int:
    """Index of the first of n timesteps that img2img runs: it skips the noisiest (1 - strength) of the schedule
    (diffusers' StableDiffusionImg2ImgPipeline.get_timesteps)."""
    init_timestep = min(int(n * strength), n)
    return max(n - init_timestep, 0)


class Sampler(ABC):
    """Base of every sampler: its config (a TrainingSchedule with the sampler's own options), alpha_bar, the cursor.

    The defaults here are those of the samplers whose x is x_t itself (DDPM, DDIM, PNDM): the UNet takes x as it is,
    x starts as N(0, I), and add_noise samples q(x_t | x_0).
    """
    init_sigma = 1.0  # standard deviation of the starting noise x_T (the k-diffusion samplers set theirs in plan)
    steps_through_sigmas = False  # the k-diffusion samplers and the multistep solvers do

    def __init__(self, cfg: TrainingSchedule):
        self.cfg = cfg
        self.alphas_cumprod = alphas_cumprod(cfg)
        if self.steps_through_sigmas and getattr(cfg, "rescale_betas_zero_snr", False):
            # alpha_bar_T = 0 would make sigma_T infinite; the reference sets fp16's smallest subnormal instead
            self.alphas_cumprod[-1] = 2.0 ** -24

    def set_timesteps(self, n: int, strength: float = 1.0) -> torch.Tensor:
        """Plan a run of n steps and put the cursor on its first step: the first of all, or with strength < 1
        (img2img) the first of the last strength * n. Returns the timesteps to run, in order."""
        self.plan(n)
        self.i = img2img_start(n, strength)
        return self.timesteps[self.i:]

    @abstractmethod
    def plan(self, n: int) -> None:
        """Set self.timesteps, the timesteps of n steps (descending; PNDM's: of each model evaluation), with what
        the steps read besides (sigmas, init_sigma), and clear the history of the last run."""

    def scale_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """The UNet's input at the current step, whose timestep t is: x itself."""
        return x

    def step(self, model_output: torch.Tensor, t, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """x at the current step -> x at the next, and the cursor on to the next step.

        model_output  the UNet's output at scale_input(x, t) and t: eps, v or x_0, as cfg.prediction_type says
        t             the current timestep, self.timesteps[self.i], as the UNet was given it
        x             the sample at the current step (not scaled by scale_input)
        generator     where the ancestral samplers (DDPM, Euler ancestral) draw their fresh noise; the others draw none
        """
        if self.i >= len(self.timesteps) or float(t) != self.timesteps[self.i].item():
            raise ValueError(f"step at t={float(t)}, but the sampler is at step {self.i} of {len(self.timesteps)}: "
                             f"call step once per timestep that set_timesteps returned, in order")
        x = self.update(model_output, x, generator)
        self.i += 1
        return x

    @abstractmethod
    def update(self, model_output: torch.Tensor, x: torch.Tensor,
               generator: torch.Generator | None) -> torch.Tensor:
        """The sampler's step from self.timesteps[self.i] to the next (to the end after the last)."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 noised to the timesteps t, one per batch item: img2img's start (t: the first timestep to run), and
        inpainting's known part after each step (t: the next). Here q(x_t | x_0), at any t."""
        return training_schedule.add_noise(self.alphas_cumprod, x0, noise, t)


class SigmaSampler(Sampler):
    """Base of the k-diffusion samplers (LMS, Euler, Euler ancestral): their x is x_0 + sigma eps, i.e. x_t / alpha_t,
    and they step through the sigmas of k_diffusion_sigmas, from sigmas[i] to sigmas[i + 1] at step i."""
    steps_through_sigmas = True

    def plan(self, n: int) -> None:
        karras = getattr(self.cfg, "use_karras_sigmas", False)  # Euler ancestral has no such option
        final_sigma = getattr(self.cfg, "final_sigmas_type", "zero")  # only Euler has this one
        self.timesteps, self.sigmas = k_diffusion_sigmas(self.cfg, self.alphas_cumprod, n, karras, final_sigma)
        self.init_sigma = k_diffusion_init_sigma(self.cfg, self.sigmas)

    def scale_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """The UNet takes x_t = x / sqrt(sigma^2 + 1), at unit variance."""
        return x / (self.sigmas[self.i] ** 2 + 1) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 + sigma noise at the current step; like the reference, t is not looked at (the same when t is the
        current timestep, as in img2img and inpainting)."""
        return x0 + noise * self.sigmas[self.i].to(x0.dtype)


class MultistepSampler(Sampler):
    """Base of the multistep solvers (DPM-Solver++, UniPC): they step through the sigmas of multistep_sigmas, from
    sigmas[i] to sigmas[i + 1] at step i, remembering the x_0 estimates of the last steps."""
    steps_through_sigmas = True

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """alpha x_0 + sigma noise at the current step; like the reference, t is not looked at (the same when t is
        the current timestep, as in img2img and inpainting)."""
        alpha, sigma = alpha_sigma(self.sigmas[self.i].to(x0.dtype))
        return alpha * x0 + sigma * noise
