"""The Stable Diffusion loop (Rombach et al. 2022), with classifier-free guidance (Ho & Salimans 2022, eq. 6):

    context = text_encoder(tokenizer(prompt))                       (B, 77, D)
    x = noise * init_sigma                                          (B, 4, H/8, W/8)
    for t in timesteps:
        eps = unet(scale(x, t), t, [uncond, cond])                  one call on the doubled batch
        eps = eps_uncond + g * (eps_cond - eps_uncond)
        x = scheduler.step(eps, t, x)
    image = vae.decode(x / scaling_factor)

All randomness comes from one torch.Generator seeded once, drawn in the reference's order, so a seed means the same
image as in diffusers.
"""
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import schedulers
from .clip import CLIPTextModel
from .errors import UserError
from .image import generation_parameters
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import AutoencoderKL

Progress = Callable[[int, int], None]  # called with (steps done, steps in all)


class Pipeline:
    def __init__(self, tokenizer: Tokenizer, text_encoder: CLIPTextModel, unet: UNet, vae: AutoencoderKL,
                 scheduler_config: dict, family: str, default_size: int, name: str):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler_config = scheduler_config  # the checkpoint's training schedule, in diffusers' terms
        self.family = family                      # "sd1" or "sd2"
        self.default_size = default_size          # the image side the model was trained at, in pixels
        self.name = name
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> "Pipeline":
        for module in (self.text_encoder, self.unet, self.vae):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def default_scheduler(self) -> str:
        """The sampler of the checkpoint's own scheduler config."""
        class_name = self.scheduler_config.get("_class_name", "PNDMScheduler")
        if class_name not in schedulers.CLASS_NAMES:
            raise UserError(f"the checkpoint's scheduler {class_name} is not implemented: choose one with --scheduler")
        return schedulers.CLASS_NAMES[class_name]

    @torch.no_grad()
    def txt2img(self, prompt: str, negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5,
                width: int | None = None, height: int | None = None, seed: int | None = None,
                scheduler: str | None = None, batch_size: int = 1, progress: Progress | None = None) -> list[Image.Image]:
        width, height = width or self.default_size, height or self.default_size
        scheduler = scheduler or self.default_scheduler
        self.check(steps=steps, width=width, height=height, scheduler=scheduler, batch_size=batch_size)
        seed = random.randrange(2**32) if seed is None else seed
        generator = torch.Generator("cpu").manual_seed(seed)
        sampler = schedulers.make(scheduler, self.scheduler_config)

        context = self.encode_prompt(prompt, negative_prompt, batch_size, guidance_scale)
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale)
        x = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device) * sampler.init_sigma
        x = self.denoise(x, sampler, sampler.set_timesteps(steps), context, guidance_scale, generator, progress)

        return self.decode(x, generation_parameters(prompt, negative_prompt, {
            "Steps": steps, "Sampler": scheduler, "CFG scale": guidance_scale, "Seed": seed,
            "Size": f"{width}x{height}", "Model": self.name}))

    def check(self, steps: int, width: int, height: int, scheduler: str, batch_size: int) -> None:
        if scheduler not in schedulers.NAMES:
            raise UserError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(schedulers.NAMES)}")
        if steps < 1:
            raise UserError(f"steps must be at least 1, not {steps}")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, not {batch_size}")
        for side, value in (("width", width), ("height", height)):
            if value < self.vae_scale or value % self.vae_scale:
                raise UserError(f"{side} must be a positive multiple of {self.vae_scale}, not {value}")

    def encode_prompt(self, prompt: str, negative_prompt: str, batch_size: int, guidance_scale: float) -> torch.Tensor:
        """(2B, 77, D): B copies of the negative prompt's context, then B of the prompt's; (B, 77, D) without guidance."""
        prompts = [negative_prompt or "", prompt] if guidance_scale > 1 else [prompt]
        # one text-encoder call per prompt, as the reference makes them
        contexts = [self.text_encoder(self.tokenizer([p]).to(self.device)) for p in prompts]
        return torch.cat([c.repeat(batch_size, 1, 1) for c in contexts])

    def denoise(self, x: torch.Tensor, sampler, timesteps: torch.Tensor, context: torch.Tensor,
                guidance_scale: float, generator: torch.Generator, progress: Progress | None) -> torch.Tensor:
        """The loop: x_T -> x_0 in latent space."""
        guided = guidance_scale > 1
        for i, t in enumerate(timesteps):
            x_in = torch.cat([x, x]) if guided else x
            out = self.unet(sampler.scale_input(x_in, t), t, context)
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = sampler.step(out, t, x, generator)
            if progress:
                progress(i + 1, len(timesteps))
        return x

    def decode(self, x: torch.Tensor, parameters: str) -> list[Image.Image]:
        """Latents -> uint8 RGB images, rounded as the reference rounds them."""
        pixels = self.vae.decode(x / self.vae.config.scaling_factor)          # (B, 3, H, W) in [-1, 1]
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        images = []
        for i, array in enumerate((pixels * 255).round().astype(np.uint8)):
            image = Image.fromarray(array)
            batch = f", Batch size: {len(pixels)}, Batch pos: {i}" if len(pixels) > 1 else ""
            image.info["parameters"] = parameters + batch
            images.append(image)
        return images
