"""Watching the denoising: every k-th step's current x_t and the x_0 the model predicts from it, decoded, written as
an animated GIF (--preview) and a grid (--preview-grid).

    preview = Preview(pipe.decode, every=5)                 # a latent model's VAE; pixel models: image.to_images
    pipe.generate(request, on_step=preview)                 # or pipe.sample(..., on_step=preview)
    preview.save_gif("denoising.gif"); preview.save_grid("denoising.png")

A Preview consumes the Steps the pipelines' denoise generators yield (pipeline.Step: x, and x0 = the model's estimate
of the clean image at that step, eq. 15 of Ho et al. 2020 solved for x_0). Each frame holds the batch's current
images in its first row and their predicted x_0 in the second; the grid puts the frames side by side, in step order.
Decoding a latent model's frames with its VAE costs a decoder call per frame; approximate_rgb is the cheap way.
"""
import math
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .errors import UserError
from .image import grid, to_images
from .pipeline import Step

# SD 1.x latents (scaled, as the UNet sees them) -> RGB in about [-1, 1], one linear map per pixel: the least-squares
# fit posted in "Decoding latents to RGB without upscaling" (discuss.huggingface.co/t/23204, 2022), the coefficients
# of A1111's live preview "Approx cheap" (modules/sd_vae_approx.py, cheap_approximation) and of ComfyUI's SD15
# latent_rgb_factors. Rows: latent channels 0-3; columns: R, G, B.
SD1_LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208],
                               [0.187, 0.286, 0.173],
                               [-0.158, 0.189, 0.264],
                               [-0.184, -0.271, -0.473]])
VAE_SCALE = 8   # SD's VAE: one latent pixel for 8 x 8 image pixels


def approximate_rgb(latents: torch.Tensor) -> list[Image.Image]:
    """(B, 4, h, w) SD 1.x latents -> RGB images of (8w, 8h), each latent pixel's colour by SD1_LATENT_RGB (no VAE)."""
    if latents.shape[1] != SD1_LATENT_RGB.shape[0]:
        raise UserError(f"--preview-fast knows 4-channel SD latents, not {latents.shape[1]} channels: drop it to "
                        "preview with the VAE")
    rgb = torch.einsum("bchw,cr->brhw", latents.float().cpu(), SD1_LATENT_RGB)
    return [image.resize((image.width * VAE_SCALE, image.height * VAE_SCALE), Image.Resampling.NEAREST)
            for image in to_images(rgb)]


class Preview:
    """Called with each Step: keeps a frame at every `every`-th step and the last (every None: about 10 frames)."""

    def __init__(self, decode: Callable[[torch.Tensor], list[Image.Image]], every: int | None = None):
        if every is not None and every < 1:
            raise UserError(f"--preview-every must be at least 1, not {every}")
        self.decode, self.every = decode, every
        self.frames: list[Image.Image] = []

    def __call__(self, step: Step) -> None:
        every = self.every or max(1, math.ceil(step.total / 10))
        if (step.i + 1) % every == 0 or step.i + 1 == step.total:
            self.frames.append(grid(self.decode(step.x) + self.decode(step.x0), columns=len(step.x)))

    def save_gif(self, path: Path, overwrite: bool = False) -> None:
        """The frames as an animated GIF, 0.2 s each, the last held 2 s, looping."""
        durations = [200] * (len(self.frames) - 1) + [2000]
        with open(path, "wb" if overwrite else "xb") as f:
            self.frames[0].save(f, format="GIF", save_all=True, append_images=self.frames[1:], duration=durations,
                                loop=0)

    def save_grid(self, path: Path, overwrite: bool = False) -> None:
        """The frames side by side, the first step's on the left."""
        with open(path, "wb" if overwrite else "xb") as f:
            grid(self.frames, columns=len(self.frames)).save(f, format="PNG")
