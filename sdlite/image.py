"""Images in and out: PIL <-> tensors, and PNG files that carry their generation parameters in the text chunk
AUTOMATIC1111's "PNG Info" reads (key "parameters"):

    a castle
    Negative prompt: blurry
    Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly
"""
import errno
import os
import secrets
import stat
import tempfile
import warnings
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
    """Write `image` with its `info["parameters"]` as a PNG text chunk. The file appears whole or not at all: it is
    written beside the target, then linked to the target's name, which fails if a file of that name appeared
    meanwhile (so of two runs writing the same name, exactly one wins), or with `overwrite` renamed over it, keeping
    the replaced file's permissions. A new file gets the permissions the umask gives (0644 with the usual 022)."""
    path = Path(path)
    meta = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        meta.add_text("parameters", image.info["parameters"])
    tmp = path.with_name(f".sdlite-{os.getpid()}-{secrets.token_hex(4)}.png.part")
    try:
        if path.is_dir():
            raise UserError(f"{path} is a folder: --out must name a .png file")
        if path.exists() and not overwrite:
            raise UserError(f"{path} exists: choose another --out or pass --overwrite")
        with open(tmp, "xb") as f:              # mode 0666 less the umask, as any new file
            image.save(f, format="PNG", pnginfo=meta)
            f.flush()
            os.fsync(f.fileno())
        if overwrite and path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
            os.replace(tmp, path)
        else:
            link_exclusively(tmp, path)
    except FileExistsError:
        raise UserError(f"{path} exists (written meanwhile by another run?): choose another --out or pass "
                        "--overwrite") from None
    except OSError as e:                        # a full disk, a folder one may not write to, ...
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def link_exclusively(tmp: Path, path: Path) -> None:
    """Give the written file `tmp` the name `path` unless that name exists (FileExistsError), atomically: a hard link.
    Where the file system has none (FAT, some network shares), the bytes are copied into `path` created exclusively,
    which is removed again if the copy fails."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    with open(path, "xb") as f:
        try:
            f.write(tmp.read_bytes())
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise


def check_writable(folder: Path) -> None:
    """Refuse a folder where no file can be created, before spending a generation on the image."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"--out: cannot write to {folder}: {e.strerror or e}") from None


def open_rgb(image: str | Path | Image.Image, what: str = "image") -> Image.Image:
    """A PIL image or a path to one, as RGB (RGBA, palette and greyscale images are converted, not refused; 16-bit
    greyscale is scaled to 8 bits, 65535 -> 255, where Pillow's own conversion would clip it to white)."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)   # over the limit: refused, not warned
            with Image.open(image) as im:
                return to_rgb(im)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {image}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{image}: too many pixels to open safely ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{image}: not an image file ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """16-bit greyscale ("I;16", or "I" with values above 255, as older Pillow opens 16-bit PNGs) is scaled to 8 bits
    first; everything else is Pillow's own conversion."""
    if image.mode.startswith("I"):
        levels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or levels.max(initial=0) > 255:
            levels = levels / 257                                                 # 0 .. 65535 -> 0 .. 255
        image = Image.fromarray(levels.round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


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
