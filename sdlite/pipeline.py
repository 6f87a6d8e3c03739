"""The Stable Diffusion loop (Rombach et al. 2022), with classifier-free guidance (Ho & Salimans 2022, eq. 6):

    context = text_encoder(tokenizer(prompt))                       (B, 77, D)
    x = noise * init_sigma                                          (B, 4, H/8, W/8)
    for t in timesteps:
        eps = unet(scale(x, t), t, [uncond, cond])                  one call on the doubled batch
        eps = eps_uncond + g * (eps_cond - eps_uncond)
        x = sampler.step(eps, t, x)
    image = vae.decode(vae.unscale_latents(x))                     x / scaling_factor in SD

`denoise` is that loop, a generator that yields a Step (index, t, x, predicted x_0) after each step: progress bars,
previews and early stops are the caller's. What a request adds to the text is a list of Conditionings: the
inpainting variants, the depth map of depth-to-image, ControlNets. The settings are a Request (request.py), checked
when it is made.

All randomness comes from one torch.Generator seeded once, drawn in the reference's order, so a seed means the same
image as in diffusers. Each stage runs its network within `runtime.running` (runtime.py), which applies the CPU
fast paths from outside the model: packed convolutions, channels-last memory, weights streamed from the mapped file.
"""
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from . import lora, runtime, samplers
from .clip import CLIPTextModel
from .controlnet import Control, control_parameters, control_residuals, prepare_control_image
from .dpt import depth_to_condition, load_depth_estimator, read_depth_map
from .embeddings import add_embedding
from .errors import UserError
from .image import embedding_hash, lora_hash, model_hash, open_rgb, paste_unmasked, to_tensor
from .prompts import encode_prompts
from .request import Request
from .samplers.conversions import alpha_sigma, x0_from
from .tiling import tiled_decode, tiled_encode
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import AutoencoderKL

GB = 2**30

Progress = Callable[[int, int], None]  # called with (steps done, steps in all)
ImageInput = Image.Image | str | Path
DepthInput = Image.Image | str | Path | torch.Tensor


@dataclass
class Step:
    """The loop's state after one step."""
    i: int                # the step's index: i + 1 of `total` are done
    total: int
    t: torch.Tensor       # the timestep the UNet was run at
    x: torch.Tensor       # (B, 4, h, w) the latents after the step: the next step's input
    x0: torch.Tensor      # the clean latents the model predicted at t (a preview: vae.decode(unscale_latents(x0)))


class Conditioning:
    """What an image adds to the text in the loop, beside x: channels the UNet reads (9-channel inpainting, the
    depth map), residuals added inside the UNet (ControlNet), or a change of x after each step (4-channel
    inpainting)."""

    def extra_channels(self) -> torch.Tensor | None:
        """(B, c, h, w) put beside x as the UNet's further input channels, or None."""
        return None

    def residuals(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor, i: int, total: int
                  ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """At step i of `total`, for the UNet's input x_in (scaled, without extra channels): the residuals to add
        to its skips and to its mid block's output, or None."""
        return None

    def after_step(self, x: torch.Tensor, i: int, timesteps: torch.Tensor, sampler: samplers.Sampler) -> torch.Tensor:
        """x after step i, changed as this conditioning needs."""
        return x


@dataclass
class MaskedImage(Conditioning):
    """9-channel inpainting UNets: the mask and the masked image's latents beside x at every step."""
    mask: torch.Tensor             # (B, 1, h, w) 1 where the image is repainted
    masked_latents: torch.Tensor   # (B, 4, h, w) latents of the image with the repainted region black

    def extra_channels(self) -> torch.Tensor:
        return torch.cat([self.mask, self.masked_latents], dim=1)


@dataclass
class KnownRegion(Conditioning):
    """4-channel UNets inpaint by blending (RePaint-style, Lugmayr et al. 2022): after every step, x outside the mask
    is set back to the image's latents noised to the next timestep (to none after the last)."""
    latents: torch.Tensor   # (B, 4, h, w) the image's latents
    noise: torch.Tensor     # (B, 4, h, w) the noise that x started from
    mask: torch.Tensor      # (B, 1, h, w) 1 where the image is repainted

    def after_step(self, x, i, timesteps, sampler):
        known = self.latents
        if i < len(timesteps) - 1:
            known = sampler.add_noise(known, self.noise, timesteps[i + 1:i + 2])
        return (1 - self.mask) * known + self.mask * x


@dataclass
class DepthMap(Conditioning):
    """SD 2 depth's 5-channel UNet: the depth map, resized to the latents and scaled to [-1, 1], beside x."""
    depth: torch.Tensor   # (B, 1, h, w)

    def extra_channels(self) -> torch.Tensor:
        return self.depth


@dataclass
class ControlNets(Conditioning):
    """ControlNets (controlnet.py): at every step each one's residuals, summed (diffusers' MultiControlNetModel)."""
    controls: list[Control]
    hints: list[torch.Tensor]   # the control images, prepare_control_image's
    guided: bool
    guess_mode: bool

    def residuals(self, x_in, t, context, i, total):
        return control_residuals(self.controls, self.hints, x_in, t, context, i, total, self.guided, self.guess_mode)


class Pipeline:
    def __init__(self, tokenizer: Tokenizer, text_encoder: CLIPTextModel, unet: UNet, vae: AutoencoderKL,
                 scheduler_config: dict, default_size: int, name: str):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.scheduler_config = scheduler_config  # the checkpoint's training schedule, in diffusers' terms
        self.default_size = default_size          # the image side the model was trained at, in pixels
        self.name = name
        self.model_file: Path | None = None       # the weights file whose hash the PNGs carry (checkpoint.load sets it)
        self.loras: list[Path] = []               # the LoRA files merged, and the embeddings loaded (token -> file):
        self.embeddings: dict[str, Path] = {}     # the PNGs carry their hashes
        self.depth_model: Path | None = None       # depth2img's estimator when no depth map is given: a DPT folder
                                                   # (SD 2 depth's own folder, whose depth_estimator/ load sets)
        self.vae_scale = vae.config.downscale
        # The stages run their layers on oneDNN (runtime.py): the UNet's convolutions on weights packed once, linear
        # layers as oneDNN's inner product, the bf16 UNet's attention in blocks. False runs plain nn.Conv2d, nn.Linear
        # and Attention, whose fp32 results are bit-identical to diffusers' text encoder and UNet instead of equal to
        # float rounding.
        self.onednn = True
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
        token = add_embedding(self.tokenizer, self.text_encoder, Path(path), token)
        self.embeddings[token] = Path(path)
        return token

    def load_lora(self, path: str | Path, weight: float = 1.0) -> None:
        """Merge a LoRA into the UNet's and the text encoder's weights (lora.py); unload_loras takes all out."""
        lora.merge({"unet": self.unet, "text_encoder": self.text_encoder}, Path(path), weight)
        self.loras.append(Path(path))

    def unload_loras(self) -> None:
        """The weights as they were before the first load_lora, exactly (the very tensors, on their device)."""
        lora.unmerge({"unet": self.unet, "text_encoder": self.text_encoder})
        self.loras.clear()

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def default_sampler(self) -> str:
        """The sampler of the checkpoint's own scheduler config (a config without a class: SD's PNDM)."""
        return samplers.own(self.scheduler_config, "PNDMScheduler")

    @torch.no_grad()
    def txt2img(self, prompt: str, negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5,
                width: int | None = None, height: int | None = None, seed: int | None = None,
                scheduler: str | None = None, batch_size: int = 1, progress: Progress | None = None,
                guidance_rescale: float = 0.0, prompt_syntax: str = "plain", clip_skip: int = 1,
                control: list[Control] = (), guess_mode: bool = False) -> list[Image.Image]:
        """Images from pure noise (as diffusers' StableDiffusionPipeline; with `control`, its ControlNet pipeline:
        every img2img / inpaint takes `control` and `guess_mode` too)."""
        return self.generate(Request(prompt, negative_prompt, steps, guidance_scale, guidance_rescale, width, height,
                                     seed, scheduler, batch_size, prompt_syntax, clip_skip, controls=list(control),
                                     guess_mode=guess_mode), progress=progress)

    @torch.no_grad()
    def img2img(self, prompt: str, image: ImageInput, strength: float = 0.8, negative_prompt: str = "",
                steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None, scheduler: str | None = None,
                batch_size: int = 1, progress: Progress | None = None, guidance_rescale: float = 0.0,
                prompt_syntax: str = "plain", clip_skip: int = 1, control: list[Control] = (),
                guess_mode: bool = False) -> list[Image.Image]:
        """Images that start from `image` noised to the timestep `strength` picks (SDEdit, Meng et al. 2022): the
        last strength * steps steps of the schedule are run (as diffusers' StableDiffusionImg2ImgPipeline)."""
        request = Request(prompt, negative_prompt, steps, guidance_scale, guidance_rescale, seed=seed,
                          sampler=scheduler, batch_size=batch_size, prompt_syntax=prompt_syntax, clip_skip=clip_skip,
                          strength=strength, controls=list(control), guess_mode=guess_mode)
        return self.generate(request, image, progress=progress)

    @torch.no_grad()
    def inpaint(self, prompt: str, image: ImageInput, mask: ImageInput, strength: float = 1.0,
                negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None,
                scheduler: str | None = None, batch_size: int = 1, mask_blur: float = 0,
                keep_unmasked: bool = False, progress: Progress | None = None, guidance_rescale: float = 0.0,
                prompt_syntax: str = "plain", clip_skip: int = 1, control: list[Control] = (),
                guess_mode: bool = False) -> list[Image.Image]:
        """Repaint the white part of `mask`, keep the black part (as diffusers' StableDiffusionInpaintPipeline).

        A 9-channel inpainting UNet sees the mask and the masked image's latents beside x at every step; a
        4-channel UNet does not, so after every step the known region of x is replaced by the image's latents
        noised to the next timestep (RePaint-style blending, Lugmayr et al. 2022). `mask_blur` is a Gaussian blur
        radius in pixels applied to the mask first; `keep_unmasked` pastes the input back over the output wherever
        the (blurred) mask is not white, so that pixels outside the mask are exactly the input's.
        """
        request = Request(prompt, negative_prompt, steps, guidance_scale, guidance_rescale, seed=seed,
                          sampler=scheduler, batch_size=batch_size, prompt_syntax=prompt_syntax, clip_skip=clip_skip,
                          strength=strength, controls=list(control), guess_mode=guess_mode)
        return self.generate(request, image, mask, mask_blur, keep_unmasked, progress)

    @torch.no_grad()
    def depth2img(self, prompt: str, image: ImageInput, depth_map: DepthInput | None = None, strength: float = 0.8,
                  negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5, seed: int | None = None,
                  scheduler: str | None = None, batch_size: int = 1, progress: Progress | None = None,
                  guidance_rescale: float = 0.0, prompt_syntax: str = "plain", clip_skip: int = 1,
                  depth_model: str | Path | None = None) -> list[Image.Image]:
        """img2img for SD 2 depth's 5-channel UNet, which also reads the image's depth (as diffusers'
        StableDiffusionDepth2ImgPipeline): `depth_map` (an image, near = bright, or a (1, H, W) tensor of inverse
        depth), else the estimate of the DPT in `depth_model` (a DPT folder; default: the model folder's own)."""
        request = Request(prompt, negative_prompt, steps, guidance_scale, guidance_rescale, seed=seed,
                          sampler=scheduler, batch_size=batch_size, prompt_syntax=prompt_syntax, clip_skip=clip_skip,
                          strength=strength)
        return self.generate(request, image, progress=progress, depth=True, depth_map=depth_map,
                             depth_model=depth_model)

    @torch.no_grad()
    def generate(self, request: Request, image: ImageInput | None = None, mask: ImageInput | None = None,
                 mask_blur: float = 0, keep_unmasked: bool = False, progress: Progress | None = None,
                 depth: bool = False, depth_map: DepthInput | None = None, depth_model: str | Path | None = None,
                 on_step: Callable[[Step], None] | None = None) -> list[Image.Image]:
        """txt2img, or img2img from `image`, or inpainting of `image` where `mask` is white, or with `depth`
        depth-to-image of `image` (depth2img); each image carries its PNG parameters in info["parameters"].
        `on_step` sees each Step of the loop (previews: preview.py)."""
        self.check_inputs(mask is not None, depth)
        if (slow := runtime.slow_precision(self.dtype, self.device)) is not None:
            warnings.warn(slow, RuntimeWarning, stacklevel=3)   # (at the call of generate, past no_grad)
        for i, control in enumerate(request.controls):
            control.controlnet.check_fits(self.unet.config, f"ControlNet {i} ({control.controlnet.name})")
        original = None
        if depth:
            original = open_rgb(image)
            image = self.fit(original)
        elif mask is not None:
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
        elif image is not None:
            image = self.fit(open_rgb(image))
        request = self.complete(request, image.size if image is not None else None)
        generator = torch.Generator("cpu").manual_seed(request.seed)   # every random draw of the call comes from it
        sampler = self.build_sampler(request.sampler, request.steps, inpainting=mask is not None)
        context = self.encode_prompt(request)
        if depth:
            condition = self.depth_condition(original, image.size, depth_map, depth_model)
        if mask is not None:
            x, timesteps, conditioning = self.start_inpainting(request, image, mask, sampler, generator)
        elif image is not None:
            x, timesteps, conditioning = self.start_img2img(request, image, sampler, generator)
        else:
            x, timesteps, conditioning = self.start_txt2img(request, sampler, generator)
        conditionings = [conditioning] if conditioning else []
        if depth:
            conditionings.append(DepthMap(condition.to(self.device, self.dtype).repeat(request.batch_size, 1, 1, 1)))
        if request.controls:
            hints = [prepare_control_image(c.image, request.width, request.height, request.batch_size,
                                           request.guided, request.guess_mode).to(self.device) for c in request.controls]
            conditionings.append(ControlNets(request.controls, hints, request.guided, request.guess_mode))
        for step in self.denoise(x, timesteps, sampler, context, request, generator, conditionings):
            x = step.x
            if progress:
                progress(step.i + 1, step.total)
            if on_step:
                on_step(step)
        images = self.decode(x)
        if keep_unmasked:
            images = [paste_unmasked(generated, image, mask) for generated in images]
        for i, generated in enumerate(images):
            generated.info["parameters"] = self.parameters(request, i)
        return images

    def check_inputs(self, inpainting: bool, depth: bool) -> None:
        """Refuse a call that the UNet's inputs do not fit: a 9-channel UNet inpaints only, a 5-channel one (SD 2
        depth) runs depth2img only, and depth2img needs one."""
        channels = self.unet.config.in_channels
        if depth and channels != 5:
            raise UserError(f"depth2img needs a depth-to-image checkpoint (5 input channels, as SD 2 depth's); this "
                            f"one has {channels}")
        if channels == 5 and not depth:
            raise UserError("this is a depth-to-image checkpoint (5 input channels): use depth2img")
        if channels == 9 and not inpainting:
            raise UserError("this is an inpainting checkpoint (9 input channels): use inpaint")

    def depth_condition(self, image: Image.Image, size: tuple[int, int], depth_map: DepthInput | None,
                        depth_model: str | Path | None) -> torch.Tensor:
        """(1, 1, h, w) the depth the 5-channel UNet reads, from `depth_map` or estimated from `image` (the image as
        given, before it is cut to a multiple of 8) by the DPT in `depth_model` or the model's own."""
        if depth_map is not None:
            depth = read_depth_map(depth_map)
        else:
            folder = depth_model or self.depth_model
            if folder is None:
                raise UserError("no depth map and no depth estimator: give a depth map (--depth-map DEPTH.png) or a "
                                "DPT folder (--depth-model; SD 2 depth's own folder has one in depth_estimator/)")
            depth = load_depth_estimator(folder, device=self.device).estimate(image)
        return depth_to_condition(depth, (size[1] // self.vae_scale, size[0] // self.vae_scale))

    def complete(self, request: Request, image_size: tuple[int, int] | None) -> Request:
        """The request with what depends on the model filled in (the sampler, the size: the image's, or the model's
        own) and checked against it."""
        own = (self.default_size if request.width is None else request.width,
               self.default_size if request.height is None else request.height)
        width, height = image_size or own
        request = replace(request, sampler=request.sampler or self.default_sampler, width=width, height=height)
        for side, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value < self.vae_scale or value % self.vae_scale:
                raise UserError(f"{side} must be a positive multiple of {self.vae_scale}, not {value}")
        needed, available = self.working_memory(request.batch_size, width, height), available_memory()
        if available is not None and needed > available:
            raise UserError(f"{width}x{height} with batch size {request.batch_size} in "
                            f"{str(self.dtype).removeprefix('torch.')} needs about {needed / GB:.1f} GB of working "
                            f"memory, and {available / GB:.1f} GB are available: choose a smaller size or batch"
                            + ("" if self.vae_tiling else ", or use VAE tiling (--vae-tiling)"))
        return request
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
        with runtime.running(self.vae, self.onednn):
            pixels = pixels.to(self.device, vae_dtype)
            posterior = tiled_encode(self.vae, pixels) if self.vae_tiling else self.vae.encode(pixels)
        return self.vae.scale_latents(posterior.sample(generator)).to(self.dtype)

    # Each start_ gives x at the first timestep to run, the timesteps to run, and the conditioning beside the text.

    def start_txt2img(self, request: Request, sampler: samplers.Sampler, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Pure noise at the first of all timesteps."""
        timesteps = sampler.set_timesteps(request.steps)
        noise = torch.randn(self.latent_shape(request.batch_size, request.width, request.height),
                            generator=generator, dtype=self.dtype)
        return noise.to(self.device) * sampler.init_sigma, timesteps, None

    def start_img2img(self, request: Request, image: Image.Image, sampler: samplers.Sampler,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, None]:
        """The image's latents noised to the first of the last strength * steps timesteps."""
        timesteps = self.partial_timesteps(sampler, request.steps, request.strength)
        x0 = self.encode_image(to_tensor(image), generator).repeat(request.batch_size, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=generator, dtype=self.dtype).to(self.device)
        return sampler.add_noise(x0, noise, timesteps[:1].repeat(request.batch_size)), timesteps, None

    def start_inpainting(self, request: Request, image: Image.Image, mask: Image.Image, sampler: samplers.Sampler,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """Noise (strength 1) or the image's latents noised, and the conditioning of the UNet's kind."""
        pixels = to_tensor(image)                                                  # (1, 3, H, W) in [-1, 1]
        m = (torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255) >= 0.5).float()[None, None]  # (1, 1, H, W)
        if not m.any():
            raise UserError("the mask is all black: nothing to repaint (white marks the region to repaint)")
        batch, strength = request.batch_size, request.strength
        timesteps = self.partial_timesteps(sampler, request.steps, strength)
        nine_channels = self.unet.config.in_channels == 9
        # The generator is drawn in the reference's order: image latents (when needed), noise, masked-image latents.
        known = None
        if not nine_channels or strength < 1:
            known = self.encode_image(pixels, generator).repeat(batch, 1, 1, 1)
        noise = torch.randn(self.latent_shape(batch, *image.size), generator=generator, dtype=self.dtype)
        noise = noise.to(self.device)
        if strength < 1:
            x = sampler.add_noise(known, noise, timesteps[:1].repeat(batch))
        else:
            x = noise * sampler.init_sigma
        masked_latents = self.encode_image(pixels * (m < 0.5), generator).repeat(batch, 1, 1, 1)
        latent_mask = F.interpolate(m, size=x.shape[-2:]).to(self.device, self.dtype).repeat(batch, 1, 1, 1)
        if nine_channels:
            return x, timesteps, MaskedImage(latent_mask, masked_latents)
        return x, timesteps, KnownRegion(known, noise, latent_mask)

    def encode_prompt(self, request: Request) -> torch.Tensor:
        """(2B, 77*k, D): B copies of the negative prompt's context, then B of the prompt's; (B, 77*k, D) without
        guidance (prompts.py; k > 1 for long a1111 prompts)."""
        negative = request.negative_prompt if request.guided else None
        with runtime.running(self.text_encoder, self.onednn):
            return encode_prompts(self.tokenizer, self.text_encoder, request.text, negative, request.batch_size,
                                  request.prompt_syntax, request.clip_skip)

    def denoise(self, x: torch.Tensor, timesteps: torch.Tensor, sampler: samplers.Sampler, context: torch.Tensor,
                request: Request, generator: torch.Generator, conditionings: list[Conditioning] = ()
                ) -> Iterator[Step]:
        """The loop, x_t -> x_0 in latent space, yielding after each step (the caller may stop at any)."""
        extras = [extra for c in conditionings if (extra := c.extra_channels()) is not None]
        extra = torch.cat(extras, dim=1) if extras else None
        if extra is not None and request.guided:
            extra = torch.cat([extra, extra])
        with runtime.running(self.unet, self.onednn):
            for i, t in enumerate(timesteps):
                x_in = sampler.scale_input(torch.cat([x, x]) if request.guided else x, t)
                residuals = [r for c in conditionings
                             if (r := c.residuals(x_in, t, context, i, len(timesteps))) is not None]
                down, mid = residuals[0] if residuals else (None, None)   # one ControlNets conditioning at most
                out = self.unet(x_in if extra is None else torch.cat([x_in, extra], dim=1), t, context,
                                down_residuals=down, mid_residual=mid)
                if request.guided:
                    uncond, cond = out.chunk(2)
                    out = uncond + request.guidance_scale * (cond - uncond)
                    if request.guidance_rescale > 0:
                        out = rescale_guidance(out, cond, request.guidance_rescale)
                x0 = predicted_x0(sampler, out, x_in[:len(x)], t)
                x = sampler.step(out, t, x, generator)
                for conditioning in conditionings:
                    x = conditioning.after_step(x, i, timesteps, sampler)
                self.check_finite(x, f"the latents after step {i + 1} of {len(timesteps)}")
                yield Step(i, len(timesteps), t, x, x0)

    def decode(self, x: torch.Tensor) -> list[Image.Image]:
        """Latents -> uint8 RGB images, rounded as the reference rounds them."""
        with runtime.running(self.vae, self.onednn):
            z = self.vae.unscale_latents(x).to(self.vae.upcast_for(self.dtype))
            pixels = tiled_decode(self.vae, z) if self.vae_tiling else self.vae.decode(z)   # (B, 3, H, W) in [-1, 1]
        self.check_finite(pixels, "the decoded image")
        pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return [Image.fromarray(array) for array in (pixels * 255).round().astype(np.uint8)]

    def parameters(self, request: Request, i: int = 0) -> str:
        """The PNG "parameters" text of the i-th image of a completed request, as A1111 writes it: the request's
        settings, then the model's file hash and name, and the hashes of the LoRAs merged and of the embeddings the
        prompts call."""
        model = {"Model hash": model_hash(self.model_file), "Model": self.name,
                 "Lora hashes": hash_list({path.stem: lora_hash(path) for path in self.loras}),
                 "TI hashes": hash_list({token: embedding_hash(path) for token, path in self.embeddings.items()
                                         if calls(token, request)})}
        batch = f", Batch size: {request.batch_size}, Batch pos: {i}" if request.batch_size > 1 else ""
        return request.parameters(model, control_parameters(request.controls, request.guess_mode)) + batch

    def check_finite(self, x: torch.Tensor, what: str) -> None:
        """Stop at the first NaN or infinity, which would otherwise end as a black image."""
        if not torch.isfinite(x).all():
            cause = ("the weights hold NaN or infinite values, or the guidance scale is too large" if self.dtype ==
                     torch.float32 else f"{str(self.dtype).removeprefix('torch.')} overflowed: try --dtype fp32")
            raise UserError(f"{what} hold NaN or infinite values: {cause}")


def predicted_x0(sampler: samplers.Sampler, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """The clean latents that the model's output at the sampler's current step implies, for x_t (the UNet's input)
    = alpha x_0 + sigma eps: the samplers that step through sigmas hold them, the others alpha_bar at t."""
    if sampler.steps_through_sigmas:
        alpha, sigma = alpha_sigma(sampler.sigmas[sampler.i])
    else:
        alpha_bar = sampler.alphas_cumprod[int(t)]
        alpha, sigma = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    return x0_from(sampler.cfg.prediction_type, model_output, x_t, alpha.to(x_t), sigma.to(x_t))


def calls(token: str, request: Request) -> bool:
    """Whether the prompt or the (used) negative prompt names the embedding's token (case-insensitive, as matched)."""
    texts = [request.text] + ([request.negative_prompt] if request.guided else [])
    return any(re.search(rf"(?<![\w-]){re.escape(token.lower())}(?![\w-])", text.lower()) for text in texts)


def hash_list(hashes: dict[str, str | None]) -> str | None:
    """A1111's "Lora hashes" / "TI hashes" value: `name: hash, name: hash`, the names without `:` and `,`."""
    entries = [f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in hashes.items() if digest]
    return ", ".join(entries) or None


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
