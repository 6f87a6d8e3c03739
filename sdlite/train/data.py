"""What the stages train on: a folder of images with a caption beside each (read_folder), or sdlite's generated
shapes (scenes.py). Either gives uint8 (N, size, size, 3) images and their captions (with_channels: 1 channel for a
grey pixel model); image.to_tensor makes the images the (N, C, size, size) tensor in [-1, 1] that the VAE and the
pixel UNet take."""
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from ..image import open_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_folder(folder: Path, size: int, caption: str | None) -> tuple[np.ndarray, list[str]]:
    """Images of `folder` as uint8 (N, size, size, 3), centre-cropped to a square and resized, and their captions:
    the text of NAME.txt beside each NAME.png, or `caption` for all."""
    if not folder.is_dir():
        raise UserError(f"--data: {folder} is not a folder (give a folder of images, or 'scenes')")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"--data: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    images, captions = np.empty((len(paths), size, size, 3), dtype=np.uint8), []
    for i, path in enumerate(paths):
        image = open_rgb(path)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        images[i] = np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS))
        text = path.with_suffix(".txt")
        if caption is None and not text.exists():
            raise UserError(f"{path.name} has no caption: write {text.name} beside it, or pass --caption")
        try:
            captions.append(caption if caption is not None else text.read_text(encoding="utf-8").strip())
        except (UnicodeDecodeError, OSError) as e:
            raise UserError(f"{text}: not a readable UTF-8 caption ({e})") from None
    return images, captions


def with_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB images as (N, H, W, channels): 1 keeps the first channel of images that are grey
    (R = G = B), which a one-channel model (MNIST's) is trained on; None: 1 if every image is grey, else 3."""
    grey = bool((images == images[..., :1]).all())
    if channels is None:
        channels = 1 if grey else 3
    if channels == 1 and not grey:
        raise UserError("--channels 1: the images are not all grey (R = G = B); convert them, or use --channels 3")
    return images[..., :channels]
