"""Images in and out: PIL <-> tensors, and PNG files that carry their generation parameters in the text chunk
AUTOMATIC1111's "PNG Info" reads (key "parameters"):

    a castle
    Negative prompt: blurry
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512,
    Model hash: 6ce0161689, Model: v1-5-pruned-emaonly
(the last two lines are one line in the file).
"""
import errno
import hashlib
import json
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
from .samplers import SAMPLERS

HASH_CACHE = "model-hashes.json"


def quote(value) -> str:
    """A value as A1111 writes it into the key-value line: JSON-quoted when a `,` `:` or newline would cut it."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def generation_parameters(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The "parameters" text as A1111 writes it: the prompt as typed, `Negative prompt: ...` when there is one, then
    `Key: value` pairs on one line. A "Sampler" of sdlite's is written as A1111's sampler and schedule type (as the
    samplers' registry names them); fields whose value is None are left out."""
    pairs = {}
    for key, value in fields.items():
        if key == "Sampler":
            entry = SAMPLERS.get(value)
            pairs["Sampler"], pairs["Schedule type"] = (entry.a1111, entry.schedule_type) if entry else (value, None)
        else:
            pairs[key] = value
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in pairs.items() if value is not None))
    return "\n".join(lines)


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdlite"


def model_hash(path: Path | None) -> str | None:
    """A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (file_sha256)."""
    digest = file_sha256(path)
    return digest and digest[:10]


def legacy_model_hash(path: Path | None) -> str:
    """A1111's old short hash, which its ControlNet extension writes beside a ControlNet's name: the first 8 hex digits
    of the SHA-256 of the 64 KiB at offset 1 MiB of the file (of nothing, for smaller files); "NOFILE" without one."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except (OSError, TypeError):
        return "NOFILE"


def lora_hash(path: Path) -> str | None:
    """A1111's hash of a LoRA in "Lora hashes": the first 12 hex digits of the SHA-256 of a safetensors file's data
    after its header (kohya's and sd-webui-additional-networks' hash, which metadata edits leave unchanged), of the
    whole file for other formats."""
    digest = file_sha256(path, skip_header=Path(path).suffix == ".safetensors")
    return digest and digest[:12]


def embedding_hash(path: Path) -> str | None:
    """A1111's hash of a textual-inversion embedding in "TI hashes": the first 12 hex digits of the file's SHA-256."""
    digest = file_sha256(path)
    return digest and digest[:12]


def file_sha256(path: Path | None, skip_header: bool = False) -> str | None:
    """The SHA-256 of a file (hex), of a safetensors file's data after its header with `skip_header`. Hashing a 4 GB
    file takes seconds, so the hash is kept in ~/.cache/sdlite/model-hashes.json under the file's path, beside its
    size and mtime, and computed again only when either changes. None for no file, or one that can no longer be read
    (moved since it was loaded): the PNG then goes without the hash rather than the images being lost."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        return None
    kind = "sha256 after header" if skip_header else "sha256"
    cache_file = cache_folder() / HASH_CACHE
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(path))
    if entry is None or entry["size"] != stat.st_size or entry["mtime"] != stat.st_mtime_ns:
        entry = {"size": stat.st_size, "mtime": stat.st_mtime_ns}
    if kind not in entry:
        digest = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                if skip_header:
                    f.seek(8 + int.from_bytes(f.read(8), "little"))
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            return None
        cache = {name: e for name, e in cache.items() if Path(name).exists()}   # files deleted since are forgotten
        entry[kind] = digest.hexdigest()
        cache[str(path)] = entry
        try:  # the cache is a convenience: a read-only home only costs the hashing next time
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".part")
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return entry[kind]


def save_png(image: Image.Image, path: str | Path, overwrite: bool = False) -> None:
    """Write `image` with its `info["parameters"]` (Pipeline.parameters) as a PNG text chunk. The file appears whole or not at all: it is
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


def check_writable(folder: Path, what: str = "--out") -> None:
    """Refuse a folder where no file can be created, before spending a generation (or a conversion) on it."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{what}: cannot write to {folder}: {e.strerror or e}") from None


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


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], as the VAE takes it; a uint8 (N, H, W, 3) batch -> (N, 3, H, W)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)       # (H, W, 3) or (N, H, W, 3) in [0, 1]
    return (pixels.reshape(-1, *pixels.shape[-3:]).permute(0, 3, 1, 2) * 2 - 1).contiguous()


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1], as the VAE decodes them -> uint8 RGB images, rounded as the reference rounds them;
    (N, 1, H, W) -> greyscale ("L") images, as a one-channel pixel-space model samples them."""
    pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    arrays = (pixels * 255).round().astype(np.uint8)
    return [Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array) for array in arrays]


def paste_unmasked(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """The original wherever the mask ("L", white = repainted) is black, the generated image where it is white,
    and a blend of the two where a blurred mask is grey. Keeps the generated image's metadata."""
    out = Image.composite(generated, original, mask)
    out.info = dict(generated.info)
    return out


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    """The images in rows of `columns`, on white (in the first image's mode: RGB, or L for grey images)."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    out = Image.new(images[0].mode, (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        out.paste(image, ((i % columns) * w, (i // columns) * h))
    return out
