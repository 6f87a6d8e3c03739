"""Images in and out: PIL <-> tensors, and PNG files that carry their generation parameters in the text chunk
AUTOMATIC1111's "PNG Info" reads (key "parameters"):

    a castle
    Negative prompt: blurry
    Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly
"""
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import UserError

# sdlite's scheduler names as AUTOMATIC1111 writes them
SAMPLER_NAMES = {"pndm": "PLMS", "lms": "LMS", "ddim": "DDIM", "unipc": "UniPC", "euler": "Euler",
                 "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras", "ddpm": "DDPM"}


def generation_parameters(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The "parameters" text: the prompt, the negative prompt, then `Key: value` pairs on one line."""
    fields = {k: SAMPLER_NAMES.get(v, v) if k == "Sampler" else v for k, v in fields.items()}
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, overwrite: bool = False) -> None:
    """Write `image` with its `info["parameters"]` as a PNG text chunk. The file appears whole or not at all
    (written beside the target, then renamed); an existing file is replaced only when `overwrite` is set."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists: choose another --out or pass --overwrite")
    meta = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        meta.add_text("parameters", image.info["parameters"])
    fd, tmp = tempfile.mkstemp(suffix=".png.part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=meta)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def open_rgb(image: str | Path | Image.Image, what: str = "image") -> Image.Image:
    """A PIL image or a path to one, as RGB (RGBA, palette and greyscale images are converted, not refused)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {image}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{image}: not an image file ({e})") from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], as the VAE takes it."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)       # (H, W, 3) in [0, 1]
    return (pixels.permute(2, 0, 1)[None] * 2 - 1).contiguous()


def paste_unmasked(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """The original wherever the mask ("L", white = repainted) is black, the generated image where it is white,
    and a blend of the two where a blurred mask is grey. Keeps the generated image's metadata."""
    out = Image.composite(generated, original, mask)
    out.info = dict(generated.info)
    return out
