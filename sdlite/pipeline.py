"""The Stable Diffusion loop (Rombach et al. 2022), with classifier-free guidance (Ho & Salimans 2022, eq. 6):

    context = text_encoder(tokenizer(prompt))                       (B, 77, D)
    x = noise * init_sigma                                          (B, 4, H/8, W/8)
    for t in timesteps:
        eps = unet(scale(x, t), t, [uncond, cond])                  one call on the doubled batch
        eps = eps_uncond + g * (eps_cond - eps_uncond)
        x = sampler.step(eps, t, x)
    image = vae.decode(vae.unscale_latents(x))                     x / scaling_factor in SD

All randomness comes from one torch.Generator seeded once, drawn in the reference's order, so a seed means the same
image as in diffusers. Each stage runs its network within `runtime.running` (runtime.py), which applies the CPU
fast paths from outside the model: packed convolutions, channels-last memory, weights streamed from the mapped file.
"""
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from . import lora, runtime, samplers
from .clip import CLIPTextModel
from .embeddings import add_embedding
from .errors import UserError
from .image import generation_parameters, model_hash, open_rgb, paste_unmasked, to_tensor
from .prompts import encode_prompts
from .tiling import tiled_decode, tiled_encode
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import AutoencoderKL

GB = 2**30

Progress = Callable[[int, int], None]  # called with (steps done, steps in all)
ImageInput = Image.Image | str | Path


@dataclass
class Run:
    """What one call sets up before its loop."""
    sampler: samplers.Sampler       # from sdlite.samplers.make
    generator: torch.Generator      # seeded once; every random draw of the call comes from it
    context: torch.Tensor           # (2B or B, 77, D) text-encoder output: negative prompt first when guided
    parameters: str                 # the PNG "parameters" text
    guidance_rescale: float = 0.0   # see rescale_guidance


class Pipeline:
    def __init__(self, tokenizer: Tokenizer, text_encoder: CLIPTextModel, unet: UNet, vae: AutoencoderKL,
                 scheduler_config: dict, family: str, default_size: int, name: str):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler_config = scheduler_config  # the checkpoint's training schedule, in diffusers' terms
        self.family = family                      # "sd1" or "sd2"
        self.default_size = default_size          # the image side the model was trained at, in pixels
        self.name = name
        self.model_file: Path | None = None       # the weights file whose hash the PNGs carry (checkpoint.load sets it)
        self.vae_scale = vae.config.downscale
        # The sampling loop runs the UNet's convolutions on weights packed for oneDNN (runtime.py); False runs plain
        # nn.Conv2d, whose fp32 results are bit-identical to diffusers' UNet instead of equal to float rounding.
        self.packed_convolutions = True
        # Images larger than the VAE's sample_size go through it in tiles (tiling.py): memory bounded by one tile
        # instead of growing with the image, at the price of results that differ from the untiled ones.
        self.vae_tiling = False

    def to(self, device=None, dtype=None) -> "Pipeline":
        for module in (self.text_encoder, self.unet):
            module.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype and self.vae.upcast_for(dtype))   # float32 if force_upcast
        return self

    def load_embedding(self, path: str | Path, token: str | None = None) -> str:
        """Add a textual-inversion embedding (embeddings.py); -> the token that calls it in prompts."""
        return add_embedding(self.tokenizer, self.text_encoder, Path(path), token)

    def load_lora(self, path: str | Path, weight: float = 1.0) -> None:
        """Merge a LoRA into the UNet's and the text encoder's weights (lora.py); unload_loras takes all out."""
        lora.merge({"unet": self.unet, "text_encoder": self.text_encoder}, Path(path), weight)

    def unload_loras(self) -> None:
        """The weights as they were before the first load_lora, exactly (the very tensors, on their device)."""
        lora.unmerge({"unet": self.unet, "text_encoder": self.text_encoder})

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def default_sampler(self) -> str:
        """The sampler of the checkpoint's own scheduler config."""
        class_name = self.scheduler_config.get("_class_name", "PNDMScheduler")
        if class_name not in samplers.CLASS_NAMES:
            raise UserError(f"the checkpoint's scheduler {class_name} is not implemented: choose one with --scheduler")
        return samplers.CLASS_NAMES[class_name]

    @torch.no_grad()
    def txt2img(self, prompt: str, negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5,
                width: int | None = None, height: int | None = None, seed: int | None = None,
                scheduler: str | None = None, batch_size: int = 1, progress: Progress | None = None,
                guidance_rescale: float = 0.0, prompt_syntax: str = "plain", clip_skip: int = 1) -> list[Image.Image]:
        """Images from pure noise (as diffusers' StableDiffusionPipeline)."""
        if self.unet.config.in_channels != 4:
            raise UserError("this is an inpainting checkpoint (9 input channels): use inpaint")
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
        run = self.start(prompt, negative_prompt, steps, guidance_scale, width, height, seed, scheduler, batch_size,
                         guidance_rescale=guidance_rescale, prompt_syntax=prompt_syntax, clip_skip=clip_skip)
        timesteps = run.sampler.set_timesteps(steps)
        noise = torch.randn(self.latent_shape(batch_size, width, height), generator=run.generator, dtype=self.dtype)
        x = noise.to(self.device) * run.sampler.init_sigma
        x = self.denoise(x, run, timesteps, guidance_scale, progress)
        return self.decode(x, run.parameters)

    @torch.no_grad()
    def img2img(self, prompt: str, image: ImageInput, strength: float = 0.8, negative_prompt: str = "",
                steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None, scheduler: str | None = None,
                batch_size: int = 1, progress: Progress | None = None, guidance_rescale: float = 0.0,
                prompt_syntax: str = "plain", clip_skip: int = 1) -> list[Image.Image]:
        """Images that start from `image` noised to the timestep `strength` picks (SDEdit, Meng et al. 2022): the
        last strength * steps steps of the schedule are run (as diffusers' StableDiffusionImg2ImgPipeline)."""
        if self.unet.config.in_channels != 4:
            raise UserError("this is an inpainting checkpoint (9 input channels): use inpaint")
        image = self.fit(open_rgb(image))
        run = self.start(prompt, negative_prompt, steps, guidance_scale, *image.size, seed, scheduler, batch_size,
                         strength, guidance_rescale, prompt_syntax=prompt_syntax, clip_skip=clip_skip)
        timesteps = self.partial_timesteps(run.sampler, steps, strength)
        x0 = self.encode_image(to_tensor(image), run.generator).repeat(batch_size, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=run.generator, dtype=self.dtype).to(self.device)
        x = run.sampler.add_noise(x0, noise, timesteps[:1].repeat(batch_size))
        x = self.denoise(x, run, timesteps, guidance_scale, progress)
        return self.decode(x, run.parameters)

    @torch.no_grad()
    def inpaint(self, prompt: str, image: ImageInput, mask: ImageInput, strength: float = 1.0,
                negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None,
                scheduler: str | None = None, batch_size: int = 1, mask_blur: float = 0,
                keep_unmasked: bool = False, progress: Progress | None = None, guidance_rescale: float = 0.0,
                prompt_syntax: str = "plain", clip_skip: int = 1) -> list[Image.Image]:
        """Repaint the white part of `mask`, keep the black part (as diffusers' StableDiffusionInpaintPipeline).

        A 9-channel inpainting UNet sees the mask and the masked image's latents beside x at every step; a
        4-channel UNet does not, so after every step the known region of x is replaced by the image's latents
        noised to the next timestep (RePaint-style blending, Lugmayr et al. 2022). `mask_blur` is a Gaussian blur
        radius in pixels applied to the mask first; `keep_unmasked` pastes the input back over the output wherever
        the (blurred) mask is not white, so that pixels outside the mask are exactly the input's.
        """
        image, mask = open_rgb(image), open_rgb(mask, what="mask").convert("L")
        if mask.size != image.size:
            raise UserError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is "
                            f"{image.size[0]}x{image.size[1]}: give a mask of the image's size")
        if not (isinstance(mask_blur, (int, float)) and 0 <= mask_blur <= max(mask.size)):
            raise UserError(f"mask blur must be a radius from 0 to the image's larger side ({max(mask.size)} "
                            f"pixels), not {mask_blur}")
        if mask_blur > 0:
            mask = mask.filter(ImageFilter.GaussianBlur(mask_blur))
        image, mask = self.fit(image), self.fit(mask)
        pixels = to_tensor(image)                                                  # (1, 3, H, W) in [-1, 1]
        m = (torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255) >= 0.5).float()[None, None]  # (1, 1, H, W)
        if not m.any():
            raise UserError("the mask is all black: nothing to repaint (white marks the region to repaint)")
        run = self.start(prompt, negative_prompt, steps, guidance_scale, *image.size, seed, scheduler, batch_size,
                         strength, guidance_rescale, inpainting=True, prompt_syntax=prompt_syntax,
                         clip_skip=clip_skip)
        timesteps = self.partial_timesteps(run.sampler, steps, strength)
        nine_channels = self.unet.config.in_channels == 9

        # The generator is drawn in the reference's order: image latents (when needed), noise, masked-image latents.
        known = None
        if not nine_channels or strength < 1:
            known = self.encode_image(pixels, run.generator).repeat(batch_size, 1, 1, 1)
        noise = torch.randn(self.latent_shape(batch_size, *image.size), generator=run.generator, dtype=self.dtype)
        noise = noise.to(self.device)
        if strength < 1:
            x = run.sampler.add_noise(known, noise, timesteps[:1].repeat(batch_size))
        else:
            x = noise * run.sampler.init_sigma
        masked_latents = self.encode_image(pixels * (m < 0.5), run.generator).repeat(batch_size, 1, 1, 1)
        latent_mask = F.interpolate(m, size=x.shape[-2:]).to(self.device, self.dtype).repeat(batch_size, 1, 1, 1)

        if nine_channels:
            x = self.denoise(x, run, timesteps, guidance_scale, progress,
                             extra_channels=torch.cat([latent_mask, masked_latents], dim=1))
        else:
            x = self.denoise(x, run, timesteps, guidance_scale, progress, keep=(known, noise, latent_mask))
        images = self.decode(x, run.parameters)
        if keep_unmasked:
            images = [paste_unmasked(generated, image, mask) for generated in images]
        return images

    def start(self, prompt: str, negative_prompt: str, steps: int, guidance_scale: float, width: int, height: int,
              seed: int | None, scheduler: str | None, batch_size: int, strength: float | None = None,
              guidance_rescale: float = 0.0, inpainting: bool = False, prompt_syntax: str = "plain",
              clip_skip: int = 1) -> "Run":
        """Check the settings, seed the generator, build the sampler and encode the prompts (prompts.py)."""
        sampler = scheduler or self.default_sampler
        self.check(steps=steps, width=width, height=height, sampler=sampler, batch_size=batch_size)
        if strength is not None and not 0 <= strength <= 1:
            raise UserError(f"strength must be between 0 and 1, not {strength}")
        check_settings(prompt, negative_prompt, guidance_scale, seed)
        if not 0 <= guidance_rescale <= 1:
            raise UserError(f"guidance rescale must be between 0 and 1, not {guidance_rescale}")
        seed = random.randrange(2**32) if seed is None else seed
        fields = {"Steps": steps, "Sampler": sampler, "CFG scale": guidance_scale, "Seed": seed,
                  "Size": f"{width}x{height}", "Model hash": model_hash(self.model_file), "Model": self.name,
                  "Denoising strength": strength, "Clip skip": clip_skip if clip_skip > 1 else None,
                  "Guidance rescale": guidance_rescale or None}
        return Run(sampler=self.build_sampler(sampler, steps, inpainting), guidance_rescale=guidance_rescale,
                   generator=torch.Generator("cpu").manual_seed(seed),
                   context=self.encode_prompt(prompt, negative_prompt, batch_size, guidance_scale,
                                              prompt_syntax, clip_skip),
                   parameters=generation_parameters(prompt, negative_prompt if guidance_scale > 1 else "", fields))

    def check(self, steps: int, width: int, height: int, sampler: str, batch_size: int) -> None:
        if sampler not in samplers.NAMES:
            raise UserError(f"unknown scheduler {sampler!r}: choose one of {', '.join(samplers.NAMES)}")
        if steps < 1:
            raise UserError(f"steps must be at least 1, not {steps}")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, not {batch_size}")
        for side, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value < self.vae_scale or value % self.vae_scale:
                raise UserError(f"{side} must be a positive multiple of {self.vae_scale}, not {value}")
        needed, available = self.working_memory(batch_size, width, height), available_memory()
        if available is not None and needed > available:
            raise UserError(f"{width}x{height} with batch size {batch_size} in {str(self.dtype).removeprefix('torch.')} "
                            f"needs about {needed / GB:.1f} GB of working memory, and {available / GB:.1f} GB are "
                            f"available: choose a smaller size or batch" + ("" if self.vae_tiling else
                                                                            ", or use VAE tiling (--vae-tiling)"))

    def working_memory(self, batch_size: int, width: int, height: int) -> int:
        """Bytes that the largest activations of a call take, roughly (the weights are memory-mapped, not counted):
        the VAE decoder at full resolution holds about six (B, 2 C0, H, W) tensors at once (C0 its first width; the
        upsampled input of its last level is twice as wide), the UNet at its first level about three (2B, 8 C0,
        h, w) ones (its feed-forward's inner width; attention runs in tiles, never as the h w x h w matrix). With
        tiling the VAE's side is its tile's."""
        item = self.dtype.itemsize
        vae_side = self.vae.config.sample_size
        vae_pixels = min(width, vae_side) * min(height, vae_side) if self.vae_tiling else width * height
        vae = 6 * batch_size * 2 * self.vae.config.block_out_channels[0] * vae_pixels * item
        latents = (width // self.vae_scale) * (height // self.vae_scale)
        unet = 3 * 2 * batch_size * 8 * self.unet.config.block_out_channels[0] * latents * item
        return max(vae, unet)

    def build_sampler(self, name: str, steps: int, inpainting: bool) -> samplers.Sampler:
        """The sampler `name` on the checkpoint's training schedule, as diffusers' pipelines configure it; a schedule
        it cannot build, or more steps than the schedule has timesteps, is refused."""
        try:
            config = samplers.as_pipelines_see_it(name, self.scheduler_config, inpainting)
            sampler = samplers.make(name, config)
        except UserError:
            raise
        except (NotImplementedError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"the model's scheduler config cannot be used: {str(e)[:160]}") from None
        trained, offset = config.get("num_train_timesteps", 1000), config.get("steps_offset", 0)
        if isinstance(trained, int) and isinstance(offset, int) and steps > trained - offset:
            raise UserError(f"steps must be at most {trained - offset} (the model's {trained} training timesteps"
                            f"{f' less its steps_offset {offset}' if offset else ''}), not {steps}")
        return sampler

    @staticmethod
    def partial_timesteps(sampler, steps: int, strength: float) -> torch.Tensor:
        timesteps = sampler.set_timesteps(steps, strength)
        if len(timesteps) == 0:
            raise UserError(f"strength {strength} with {steps} steps leaves no step to run: raise either")
        return timesteps

    def fit(self, image: Image.Image) -> Image.Image:
        """The image cut down to a multiple of the VAE's factor (8) on each side, resized with Lanczos as the
        reference does."""
        w, h = (side - side % self.vae_scale for side in image.size)
        if w == 0 or h == 0:
            raise UserError(f"the image is {image.size[0]}x{image.size[1]}: it must be at least "
                            f"{self.vae_scale} pixels on each side")
        return image if (w, h) == image.size else image.resize((w, h), Image.LANCZOS)

    def latent_shape(self, batch_size: int, width: int, height: int) -> tuple[int, int, int, int]:
        return batch_size, self.vae.config.latent_channels, height // self.vae_scale, width // self.vae_scale

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(1, 3, H, W) pixels in [-1, 1] -> (1, 4, H/8, W/8) latents: a sample of the VAE's posterior, scaled."""
        vae_dtype = self.vae.upcast_for(self.dtype)
        with runtime.running(self.vae):
            pixels = pixels.to(self.device, vae_dtype)
            posterior = tiled_encode(self.vae, pixels) if self.vae_tiling else self.vae.encode(pixels)
        return self.vae.scale_latents(posterior.sample(generator)).to(self.dtype)

    def encode_prompt(self, prompt: str, negative_prompt: str, batch_size: int, guidance_scale: float,
                      prompt_syntax: str = "plain", clip_skip: int = 1) -> torch.Tensor:
        """(2B, 77*k, D): B copies of the negative prompt's context, then B of the prompt's; (B, 77*k, D) without
        guidance (prompts.py; k > 1 for long a1111 prompts)."""
        negative = (negative_prompt or "") if guidance_scale > 1 else None
        with runtime.running(self.text_encoder):
            return encode_prompts(self.tokenizer, self.text_encoder, prompt, negative, batch_size, prompt_syntax,
                                  clip_skip)

    def denoise(self, x: torch.Tensor, run: "Run", timesteps: torch.Tensor, guidance_scale: float,
                progress: Progress | None, extra_channels: torch.Tensor | None = None,
                keep: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The loop: x_t -> x_0 in latent space.

        extra_channels  (B, 5, h, w) mask and masked-image latents, put beside x for a 9-channel inpainting UNet
        keep            (image latents, noise, mask) of 4-channel inpainting: outside the mask, x is set back to
                        the image's latents noised to the next timestep after each step
        """
        guided = guidance_scale > 1
        with runtime.running(self.unet, self.packed_convolutions):
            for i, t in enumerate(timesteps):
                x_in = run.sampler.scale_input(torch.cat([x, x]) if guided else x, t)
                if extra_channels is not None:
                    x_in = torch.cat([x_in, torch.cat([extra_channels] * 2) if guided else extra_channels], dim=1)
                out = self.unet(x_in, t, run.context)
                if guided:
                    uncond, cond = out.chunk(2)
                    out = uncond + guidance_scale * (cond - uncond)
                    if run.guidance_rescale > 0:
                        out = rescale_guidance(out, cond, run.guidance_rescale)
                x = run.sampler.step(out, t, x, run.generator)
                if keep is not None:
                    known, noise, mask = keep
                    if i < len(timesteps) - 1:
                        known = run.sampler.add_noise(known, noise, timesteps[i + 1:i + 2])
                    x = (1 - mask) * known + mask * x
                self.check_finite(x, f"the latents after step {i + 1} of {len(timesteps)}")
                if progress:
                    progress(i + 1, len(timesteps))
        return x

    def decode(self, x: torch.Tensor, parameters: str) -> list[Image.Image]:
        """Latents -> uint8 RGB images, rounded as the reference rounds them."""
        with runtime.running(self.vae):
            z = self.vae.unscale_latents(x).to(self.vae.upcast_for(self.dtype))
            pixels = tiled_decode(self.vae, z) if self.vae_tiling else self.vae.decode(z)   # (B, 3, H, W) in [-1, 1]
        self.check_finite(pixels, "the decoded image")
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        images = []
        for i, array in enumerate((pixels * 255).round().astype(np.uint8)):
            image = Image.fromarray(array)
            batch = f", Batch size: {len(pixels)}, Batch pos: {i}" if len(pixels) > 1 else ""
            image.info["parameters"] = parameters + batch
            images.append(image)
        return images

    def check_finite(self, x: torch.Tensor, what: str) -> None:
        """Stop at the first NaN or infinity, which would otherwise end as a black image."""
        if not torch.isfinite(x).all():
            cause = ("the weights hold NaN or infinite values, or the guidance scale is too large" if self.dtype ==
                     torch.float32 else f"{str(self.dtype).removeprefix('torch.')} overflowed: try --dtype fp32")
            raise UserError(f"{what} hold NaN or infinite values: {cause}")


def check_settings(prompt: str, negative_prompt: str, guidance_scale: float, seed: int | None) -> None:
    """Refuse what the loop would silently replace or turn into garbage."""
    check_text("prompt", prompt)
    check_text("negative prompt", negative_prompt)
    if not (isinstance(guidance_scale, (int, float)) and 0 <= guidance_scale < math.inf):
        raise UserError(f"guidance scale must be a finite number of 0 or more (1 or less: unguided), "
                        f"not {guidance_scale}")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
        raise UserError(f"seed must be an integer from 0 to 2**64 - 1, not {seed}")


def check_text(what: str, text: str) -> None:
    if not isinstance(text, str):
        raise UserError(f"the {what} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # bytes that were not UTF-8 in argv arrive as lone surrogates
        raise UserError(f"the {what} is not valid UTF-8 text: {text.encode('utf-8', 'replace')[:60]!r}") from None


def available_memory() -> int | None:
    """Bytes this process can still use: the system's MemAvailable, or less under a cgroup memory limit; None where
    neither can be read (not Linux)."""
    limits = []
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(limits, default=None)

def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4: scale the guided
    prediction to the per-image standard deviation of the conditional one (guidance inflates it, which over-exposes
    zero-terminal-SNR models), and mix: phi * rescaled + (1 - phi) * guided."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided
