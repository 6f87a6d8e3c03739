"""Sampling a pixel-space DDPM: images straight from the UNet, no text, no VAE (Ho et al. 2020, algorithm 2).

    pipe = sdlite.load("ddpm-cat-256")            # a diffusers DDPMPipeline / DDIMPipeline folder: unet/, scheduler/
    images = pipe.sample(steps=50, scheduler="ddim", batch_size=4, seed=0)

As diffusers' DDPMPipeline and DDIMPipeline: x_T ~ N(0, I) of (B, in_channels, sample_size) drawn first from the
seeded generator, then each step's noise; the scheduler config as the folder has it (no rewrite: pixel models clip
the x_0 estimate to [-1, 1] as their configs say); images (x / 2 + 0.5) clamped to [0, 1], times 255, rounded.
"""
import random
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from . import runtime, samplers
from .checkpoint import build, read_state_dict
from .formats.diffusers import read_config, read_json, weights_file
from .errors import UserError
from .image import generation_parameters, model_hash, to_images
from .pipeline import Step, predicted_x0
from .unet2d import UNet2D, UNet2DConfig, renamed_old_attention_keys

PIPELINES = ("DDPMPipeline", "DDIMPipeline")   # model_index.json's _class_name of a pixel-space folder


def is_pixel_folder(path: Path, index: dict) -> bool:
    """A DDPMPipeline / DDIMPipeline folder, or one with unet/ and scheduler/ and no text encoder."""
    return index.get("_class_name") in PIPELINES or (
        (path / "unet").is_dir() and (path / "scheduler").is_dir() and not (path / "text_encoder").exists())


def as_pixel_pipelines_see_it(name: str, scheduler_config: dict) -> dict:
    """The scheduler config that the sampler `name` runs with on a pixel model: the folder's as it is (DDPMPipeline
    and DDIMPipeline rewrite nothing), less variance_type for the samplers other than DDPM, which get eps alone (see
    PixelPipeline.sample): diffusers' DPMSolverMultistepScheduler, the one other that reads the key, does the same."""
    return {k: v for k, v in scheduler_config.items() if k != "variance_type" or name == "ddpm"}


def load_folder(path: Path, dtype: torch.dtype) -> "PixelPipeline":
    """The PixelPipeline of a diffusers folder (unet/ with a UNet2DModel, scheduler/); old attention key names are
    renamed as diffusers does."""
    config = read_config(UNet2DConfig, read_json(path / "unet" / "config.json"), path / "unet" / "config.json")
    state_dict = renamed_old_attention_keys(read_state_dict(weights_file(path / "unet", "diffusion_pytorch_model"),
                                                            dtype))
    return PixelPipeline(unet=build(UNet2D, config, state_dict, path / "unet"),
                         scheduler_config=read_json(path / "scheduler" / "scheduler_config.json"), name=path.name)


class PixelPipeline:
    def __init__(self, unet: UNet2D, scheduler_config: dict, name: str):
        self.unet = unet
        self.scheduler_config = scheduler_config   # the training schedule and the default sampler, diffusers' terms
        self.name = name
        self.model_file: Path | None = None        # the weights file whose hash the PNGs carry (set by checkpoint.load)

    def to(self, device=None, dtype=None) -> "PixelPipeline":
        self.unet.to(device=device, dtype=dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def default_sampler(self) -> str:
        """The sampler of the folder's own scheduler config (DDPMPipeline's folders: ddpm)."""
        return samplers.own(self.scheduler_config, "DDPMScheduler")

    def build_sampler(self, name: str, eta: float) -> samplers.Sampler:
        """The sampler `name` on the folder's schedule, as TargetScheduler.from_config(config) builds it (what
        DDIMPipeline does with a DDPM folder); eta is DDIM's alone."""
        if name not in samplers.NAMES:
            raise UserError(f"unknown scheduler {name!r}: choose one of {', '.join(samplers.NAMES)}")
        if eta != 0 and name != "ddim":
            raise UserError(f"eta {eta} is DDIM's noise: use --scheduler ddim, or eta 0")
        if not 0 <= eta <= 1:
            raise UserError(f"eta must be between 0 and 1, not {eta}")
        config = as_pixel_pipelines_see_it(name, self.scheduler_config)
        if name == "ddim":
            config["eta"] = eta
        try:
            sampler = samplers.make(name, config)
        except UserError:
            raise
        except (NotImplementedError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"the model's scheduler config cannot be used: {str(e)[:160]}") from None
        if getattr(sampler.cfg, "variance_type", None) == "learned_range" and not self.learns_variance:
            raise UserError(f"the scheduler config's variance_type learned_range needs a UNet with 2 x "
                            f"{self.unet.config.in_channels} output channels, not {self.unet.config.out_channels}")
        return sampler

    @property
    def learns_variance(self) -> bool:
        """The UNet outputs eps and the variance interpolation v (Nichol & Dhariwal 2021): twice x's channels."""
        return self.unet.config.out_channels == 2 * self.unet.config.in_channels

    def denoise(self, x: torch.Tensor, timesteps: torch.Tensor, sampler: samplers.Sampler,
                generator: torch.Generator) -> Iterator[Step]:
        """The loop, x_T -> x_0 in pixel space (Ho et al. algorithm 2 with any sampler), yielding a Step after each
        step as Pipeline.denoise does (its x0 is the image the model predicts)."""
        whole_output = getattr(sampler.cfg, "variance_type", None) == "learned_range"   # DDPM's learned variance
        for i, t in enumerate(timesteps):
            x_in = sampler.scale_input(x, t)
            out = self.unet(x_in, t)
            eps = out[:, :x.shape[1]]   # a learned-variance UNet's other half is v, which only DDPM reads
            x0 = predicted_x0(sampler, eps, x_in, t)
            x = sampler.step(out if whole_output else eps, t, x, generator)
            if not torch.isfinite(x).all():
                raise UserError(f"the images after step {i + 1} of {len(timesteps)} hold NaN or infinite values")
            yield Step(i, len(timesteps), t, x, x0)

    @torch.no_grad()
    def sample(self, steps: int = 1000, scheduler: str | None = None, batch_size: int = 1, seed: int | None = None,
               eta: float = 0.0, progress=None, on_step: Callable[[Step], None] | None = None) -> list[Image.Image]:
        """batch_size images from pure noise in `steps` steps of the sampler `scheduler` (default: the folder's);
        `on_step` sees each Step of the loop (previews: preview.py)."""
        name = scheduler or self.default_sampler
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, not {batch_size}")
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
            raise UserError(f"seed must be an integer from 0 to 2**64 - 1, not {seed}")
        sampler = self.build_sampler(name, eta)
        if (slow := runtime.slow_precision(self.dtype, self.device)) is not None:
            warnings.warn(slow, RuntimeWarning, stacklevel=3)   # (at the call of sample, past no_grad)
        trained = sampler.cfg.num_train_timesteps - sampler.cfg.steps_offset
        if not 1 <= steps <= trained:
            raise UserError(f"steps must be between 1 and {trained} (the model's training timesteps), not {steps}")
        seed = random.randrange(2**32) if seed is None else seed
        generator = torch.Generator("cpu").manual_seed(seed)
        height, width = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        timesteps = sampler.set_timesteps(steps)
        x = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device) * sampler.init_sigma
        for step in self.denoise(x, timesteps, sampler, generator):
            x = step.x
            if progress:
                progress(step.i + 1, step.total)
            if on_step:
                on_step(step)
        fields = {"Steps": steps, "Sampler": name, "Eta": eta or None, "Seed": seed, "Size": f"{width}x{height}",
                  "Model hash": model_hash(self.model_file), "Model": self.name}
        parameters = generation_parameters("", "", fields).lstrip("\n")
        images = to_images(x)   # rounded as DDPMPipeline's numpy_to_pil rounds them
        for i, image in enumerate(images):
            batch = f", Batch size: {len(images)}, Batch pos: {i}" if len(images) > 1 else ""
            image.info["parameters"] = parameters + batch
        return images

