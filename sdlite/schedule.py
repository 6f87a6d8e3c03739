"""What a model's training schedule looks like, and where each sampler steps on it: `sdlite schedule`.

Over the T training timesteps: alpha_bar_t (the signal kept, Ho et al. eq. 4), the noise level
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (Karras et al.'s, the k-diffusion samplers' variable) and the
signal-to-noise ratio SNR_t = alpha_bar_t / (1 - alpha_bar_t) = 1 / sigma_t^2 (Kingma et al. 2021); with the
timesteps that n steps of each sampler run, as the pipeline builds that sampler (the SD pipelines' rewrite of the
config for latent models, the config as it is for pixel models).
"""
import io
from dataclasses import fields

import numpy as np
import torch
from PIL import Image

from . import samplers
from .errors import UserError
from .image import save_png
from .pixel import as_pixel_pipelines_see_it
from .samplers.ddim import DDIMConfig
from .samplers.training_schedule import alphas_cumprod


def training_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """alpha_bar_t of the config's training schedule (zero terminal SNR too: DDIM's config reads every key of it)."""
    known = {f.name for f in fields(DDIMConfig)}
    return alphas_cumprod(DDIMConfig(**{k: v for k, v in scheduler_config.items() if k in known}))


def curves(alphas_cumprod: torch.Tensor) -> dict[str, np.ndarray]:
    """alpha_bar, sigma and SNR at each training timestep t = 0 .. T-1 (float64 from the fp32 alpha_bar)."""
    alpha_bar = alphas_cumprod.double().numpy()
    return {"alpha_bar": alpha_bar, "sigma": ((1 - alpha_bar) / alpha_bar) ** 0.5, "SNR": alpha_bar / (1 - alpha_bar)}


def sampler_timesteps(scheduler_config: dict, names: list[str], steps: int, pixel: bool) -> dict[str, np.ndarray]:
    """The timesteps (in the order run) of `steps` steps of each sampler in `names`; a sampler the config cannot
    build is left out with the reason as its value."""
    timesteps = {}
    for name in names:
        see_it = as_pixel_pipelines_see_it if pixel else samplers.as_pipelines_see_it
        config = see_it(name, scheduler_config)
        try:
            timesteps[name] = samplers.make(name, config).set_timesteps(steps).numpy()
        except (NotImplementedError, ValueError) as e:
            timesteps[name] = str(e).splitlines()[0]
    return timesteps


def listing(timesteps: dict[str, np.ndarray | str]) -> str:
    """One line per sampler: its timesteps, integers as integers (PNDM's repeats included: one per UNet call)."""
    lines = []
    for name, ts in timesteps.items():
        if isinstance(ts, str):
            lines.append(f"{name}: not available ({ts})")
            continue
        shown = [str(int(t)) if float(t).is_integer() else f"{t:.2f}" for t in ts]
        lines.append(f"{name} ({len(ts)}): {', '.join(shown)}")
    return "\n".join(lines)


def plot(alphas_cumprod: torch.Tensor, timesteps: dict[str, np.ndarray | str], title: str, path, overwrite: bool):
    """Three panels over the training timesteps (alpha_bar; sigma and SNR on log scales), each sampler's timesteps
    marked on every curve, and a fourth with one row of timesteps per sampler, written as a PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'sdlite[plot]' (or pip install matplotlib)") from None
    values = curves(alphas_cumprod)
    t = np.arange(len(alphas_cumprod))
    figure, axes = pyplot.subplots(1, 4, figsize=(20, 4.5))
    for row, (sampler, ts) in enumerate(timesteps.items()):   # the fourth panel: one row of timesteps per sampler
        if not isinstance(ts, str):
            axes[3].plot(ts, [row] * len(ts), "|", markersize=10, color=f"C{row}")
    axes[3].set(title="timesteps run", xlabel="timestep t", xlim=(-10, len(t) + 10),
                yticks=range(len(timesteps)), yticklabels=list(timesteps))
    axes[3].invert_yaxis()
    for axis, (name, curve) in zip(axes, values.items()):
        axis.plot(t, curve, color="black", linewidth=1, label="training")
        for row, (sampler, ts) in enumerate(timesteps.items()):
            if not isinstance(ts, str):
                axis.plot(ts, np.interp(ts, t, curve), "o", markersize=3, color=f"C{row}", label=sampler)
        axis.set(title=name, xlabel="timestep t", yscale="linear" if name == "alpha_bar" else "log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    save_png(Image.open(buffer), path, overwrite=overwrite)
