"""The training noise schedule that every sampler is driven by, and the conversions they share.

Stable Diffusion is trained on a discrete forward process of T steps (Ho et al. 2020, eq. 4):
    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,    alpha_bar_t = prod_{s <= t} (1 - beta_s).
Written as x_t = alpha_t x_0 + sigma_t eps (alpha_t^2 + sigma_t^2 = 1), the samplers that work on the scaled-out
latent x_t / alpha_t = x_0 + s_t eps (k-diffusion's LMS and Euler) use the noise level s_t = sigma_t / alpha_t,
Karras et al.'s "sigma". Timesteps and sigmas are computed in numpy float64 from the fp32 alpha_bar, as in the
reference; the sampling steps then work in fp32.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError


class NotImplementedOption(UserError, NotImplementedError):
    """A config value of the reference that sdlite does not implement: the CLI reports it in one line."""


@dataclass
class TrainingSchedule:
    """The keys of a diffusers scheduler_config.json that describe the training schedule (every sampler has them).

    The defaults are diffusers' own; a sampler's config subclasses this and may change them (timestep_spacing).
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # or "scaled_linear" (SD), "squaredcos_cap_v2"
    trained_betas: list[float] | None = None  # overrides beta_schedule
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon", "v_prediction" or "sample" (x_0)
    timestep_spacing: str = "leading"  # how n inference timesteps are picked among the T: see spaced_timesteps
    steps_offset: int = 0  # added to "leading" timesteps (SD uses 1, so that they end at t = 1, not 0)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The "squaredcos_cap_v2" schedule: alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2) (Nichol & Dhariwal 2021,
    eq. 17), betas = 1 - alpha_bar(t + 1/T) / alpha_bar(t) clipped at max_beta, in float64 then fp32."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
             for i in range(num_train_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def alphas_cumprod(cfg: TrainingSchedule) -> torch.Tensor:
    """alpha_bar_t for t = 0 .. T-1, fp32."""
    T = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":  # linear in sqrt(beta): the latent diffusion models' schedule
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        betas = cosine_betas(T)
    else:
        raise NotImplementedOption(f"beta_schedule {cfg.beta_schedule!r} is not implemented: use 'linear', "
                                   f"'scaled_linear' or 'squaredcos_cap_v2'")
    if getattr(cfg, "rescale_betas_zero_snr", False):  # only the samplers whose reference has the option have it
        betas = zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """The betas rescaled so that the last timestep is pure noise (Lin et al. 2023, "Common Diffusion Noise Schedules
    and Sample Steps are Flawed", algorithm 1): sqrt(alpha_bar) shifted to end at 0 and scaled to keep its start."""
    root = torch.cumprod(1.0 - betas, dim=0) ** 0.5
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root ** 2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def spaced_timesteps(cfg: TrainingSchedule, n: int) -> np.ndarray:
    """n of the T training timesteps, descending, float64 (rounded by the samplers that want integers).

    "linspace": evenly from T-1 down to 0 (not rounded here); "leading": 0, T//n, 2T//n, ... plus steps_offset;
    "trailing": T-1, T-1 - T/n, ... rounded (Lin et al. 2023, table 2).
    """
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1]
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return np.arange(T, 0, -T / n).round() - 1
    raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r}: use 'linspace', 'leading' or 'trailing'")


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Karras et al.'s sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of every training timestep (ascending), fp32."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each sigma: log sigma interpolated linearly between training steps."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = (np.searchsorted(log_train_sigmas, log_sigma, side="right") - 1).clip(0, len(log_train_sigmas) - 2)
    w = (log_train_sigmas[low] - log_sigma) / (log_train_sigmas[low] - log_train_sigmas[low + 1])
    w = np.clip(w, 0, 1)
    return (1 - w) * low + w * (low + 1)


def img2img_start(n: int, strength: float) -> int:
    """Index of the first of n timesteps that img2img runs: it skips the noisiest (1 - strength) of the schedule
    (diffusers' StableDiffusionImg2ImgPipeline.get_timesteps)."""
    init_timestep = min(int(n * strength), n)
    return max(n - init_timestep, 0)


def x0_from(prediction_type: str, model_output: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The model's estimate of x_0, for x = alpha x_0 + sigma eps (v = alpha eps - sigma x_0, Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type {prediction_type!r}")


def eps_from(prediction_type: str, model_output: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The model's estimate of eps, for x = alpha x_0 + sigma eps."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x
    if prediction_type == "sample":
        return (x - alpha * model_output) / sigma
    raise ValueError(f"prediction_type {prediction_type!r}")


def denoised(prediction_type: str, model_output: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """The x_0 estimate for k-diffusion's x = x_0 + sigma eps, the model having seen x / sqrt(sigma^2 + 1)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type {prediction_type!r}")


def k_diffusion_sigmas(cfg: TrainingSchedule, alphas_cumprod: torch.Tensor, n: int, karras: bool = False,
                       final_sigma: str = "zero") -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of the k-diffusion samplers (LMS, Euler): n fp32 timesteps, possibly fractional, and the
    n + 1 fp32 sigmas at them, interpolated linearly in t, ending with 0 (final_sigma "zero") or with sigma at t = 0
    ("sigma_min").

    With karras, the n sigmas are re-spaced by Karras et al. eq. 5 between the first and last, and the timesteps
    follow them.
    """
    timesteps = spaced_timesteps(cfg, n).astype(np.float32)
    train = train_sigmas(alphas_cumprod)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
        timesteps = sigma_to_t(sigmas, np.log(train)).astype(np.float32)
    sigmas = np.append(sigmas, final(final_sigma, train)).astype(np.float32)
    return torch.from_numpy(timesteps), torch.from_numpy(sigmas)


def final(final_sigma: str, train: np.ndarray) -> float:
    """The noise level the last step goes to: 0, or the training schedule's smallest (at t = 0)."""
    if final_sigma not in ("zero", "sigma_min"):
        raise NotImplementedOption(f"final_sigmas_type {final_sigma!r} is not implemented: use 'zero' or 'sigma_min'")
    return 0.0 if final_sigma == "zero" else train[0].item()


def k_diffusion_init_sigma(cfg: TrainingSchedule, sigmas: torch.Tensor) -> float:
    """Standard deviation of the starting noise of the k-diffusion samplers: sigma_max, or sqrt(sigma_max^2 + 1)
    with "leading" spacing (as the reference has it)."""
    if cfg.timestep_spacing in ("linspace", "trailing"):
        return sigmas.max().item()
    return ((sigmas.max() ** 2 + 1) ** 0.5).item()


def multistep_sigmas(cfg: TrainingSchedule, alphas_cumprod: torch.Tensor, n: int, spacing: str | None = None,
                     final_sigma: str = "zero", round_timesteps: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) of the multistep solvers (DPM-Solver++, UniPC): n int64 timesteps and the n + 1 fp32
    sigmas at them, ending with 0 (final_sigma "zero") or with sigma at t = 0 ("sigma_min").

    By default the timesteps are spaced as cfg says: "linspace" and "leading" take the n largest of n + 1 spaced
    timesteps, so that none is 0. Otherwise the sigmas are spaced over the whole training range, and the timesteps
    follow them (rounded unless round_timesteps is False, then truncated): spacing "karras" by Karras et al. eq. 5,
    "lu" evenly in lambda = -log sigma (Lu et al. 2022, DPM-Solver++, sec. 5's "uniform logSNR" steps).
    """
    train = train_sigmas(alphas_cumprod)
    if spacing is None:
        if cfg.timestep_spacing == "trailing":
            timesteps = spaced_timesteps(cfg, n)
        else:
            timesteps = spaced_timesteps(cfg, n + 1)[:-1]
        timesteps = timesteps.round().astype(np.int64)
        sigmas = train[timesteps]
    else:
        if spacing == "karras":
            sigmas = karras_sigmas(train[0].item(), train[-1].item(), n)
        else:
            sigmas = np.exp(np.linspace(np.log(train[-1]).item(), np.log(train[0]).item(), n))
        timesteps = sigma_to_t(sigmas, np.log(train))
        if round_timesteps:
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    sigmas = np.append(sigmas, final(final_sigma, train)).astype(np.float32)
    return torch.from_numpy(timesteps), torch.from_numpy(sigmas)


def alpha_sigma(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps from the k-diffusion noise level s = sigma_t / alpha_t."""
    alpha = 1 / (s ** 2 + 1) ** 0.5
    return alpha, s * alpha


def log_snr(s: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t), the time variable of the exponential integrators (Lu et al. 2022)."""
    alpha, sigma = alpha_sigma(s)
    return torch.log(alpha) - torch.log(sigma)


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fresh N(0, I) noise of x's shape and dtype, drawn on the generator's device (as diffusers' randn_tensor)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class Sampler:
    """Base of every sampler: the config and its alpha_bar. Its x is x_t itself, which the UNet takes as it is and
    which starts as N(0, I); its add_noise samples q(x_t | x_0). DDPM, DDIM and PNDM use these as they are."""
    init_sigma = 1.0
    steps_through_sigmas = False  # the k-diffusion samplers and the multistep solvers do

    def __init__(self, cfg: TrainingSchedule):
        self.cfg = cfg
        self.alphas_cumprod = alphas_cumprod(cfg)
        if self.steps_through_sigmas and getattr(cfg, "rescale_betas_zero_snr", False):
            # alpha_bar_T = 0 would make sigma_T infinite; the reference sets fp16's smallest subnormal instead
            self.alphas_cumprod[-1] = 2.0 ** -24

    def scale_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. eq. 4), t: one per item."""
        alpha_bar = self.alphas_cumprod.to(x0.dtype)[t.long()].view(-1, *[1] * (x0.ndim - 1))
        return alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


class SigmaSampler(Sampler):
    """Base of the k-diffusion samplers (LMS, Euler, Euler ancestral): their x is x_0 + sigma eps, i.e. x_t / alpha_t,
    and they step through the sigmas of k_diffusion_sigmas, self.i being the index of the current step."""
    steps_through_sigmas = True

    def set_timesteps(self, n: int, strength: float = 1.0) -> torch.Tensor:
        karras = getattr(self.cfg, "use_karras_sigmas", False)  # Euler ancestral has no such option
        final_sigma = getattr(self.cfg, "final_sigmas_type", "zero")  # only Euler has this one
        self.timesteps, self.sigmas = k_diffusion_sigmas(self.cfg, self.alphas_cumprod, n, karras, final_sigma)
        self.init_sigma = k_diffusion_init_sigma(self.cfg, self.sigmas)
        self.i = img2img_start(n, strength)
        return self.timesteps[self.i:]

    def scale_input(self, x: torch.Tensor, t) -> torch.Tensor:
        """The UNet takes x_t = x / sqrt(sigma^2 + 1), at unit variance."""
        return x / (self.sigmas[self.i] ** 2 + 1) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 + sigma noise at the current step (the img2img start); like the reference, t is not looked at."""
        return x0 + noise * self.sigmas[self.i].to(x0.dtype)


class MultistepSampler(Sampler):
    """Base of the multistep solvers (DPM-Solver++, UniPC): they step through the sigmas of multistep_sigmas,
    self.i being the index of the current step."""
    steps_through_sigmas = True

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """alpha x_0 + sigma noise at the current step (the img2img start); like the reference, t is not looked at."""
        alpha, sigma = alpha_sigma(self.sigmas[self.i].to(x0.dtype))
        return alpha * x0 + sigma * noise
