"""The conversions every sampler shares, built on the training schedule (training_schedule.py: read it first).

Written as x_t = alpha_t x_0 + sigma_t eps (alpha_t^2 + sigma_t^2 = 1), the samplers that work on the scaled-out
latent x_t / alpha_t = x_0 + s_t eps (k-diffusion's LMS and Euler) use the noise level s_t = sigma_t / alpha_t,
Karras et al.'s "sigma". Here: the sigmas of the training timesteps and the samplers' sigma schedules (Karras
spacing, sigma -> t), the model's estimates of x_0 and eps from its output (eps, v or x_0), alpha, sigma and the log
SNR of a noise level, and fresh noise. Timesteps and sigmas are computed in numpy float64 from the fp32 alpha_bar, as
in the reference; the sampling steps then work in fp32.
"""
import numpy as np
import torch

from .training_schedule import NotImplementedOption, TrainingSchedule, spaced_timesteps


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
