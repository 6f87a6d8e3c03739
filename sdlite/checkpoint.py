"""Open a Stable Diffusion checkpoint in either official layout, tell its family, and build sdlite's modules from it.

  single file   v1-5-pruned-emaonly.safetensors: model.diffusion_model.* (UNet), first_stage_model.* (VAE),
                cond_stage_model.* (text encoder: OpenAI CLIP in SD 1.x, OpenCLIP in SD 2.x); formats/ldm.py maps
                each part to sdlite's config and state dict. Nothing in the file says which scheduler or image size
                it was trained for: its family's record (formats/families.py) decides, the family told from the text
                encoder's layout and the UNet's input channels (SD 2.x single files are v-prediction unless the
                caller says otherwise, as in the reference).
  folder        model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/ (the diffusers layout,
                formats/diffusers.py): every config is read from its config.json and the weights need no key mapping,
                since sdlite's module attribute names are the diffusers names.
`save` writes a loaded model in either layout, in the precision asked for (`sdlite convert`).
"""
import os
import shutil
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .clip import CLIPTextConfig, CLIPTextModel
from .errors import MALFORMED, UserError
from .formats import ldm
from .formats.diffusers import (image_size, read_config, read_json, read_tokenizer, save_folder, save_pixel_folder,
                                weights_file, with_text_model_prefix)
from .formats.families import single_file_family
from .image import check_writable
from .pipeline import Pipeline
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import PICKLE_SUFFIXES, read_file, read_safetensors

# Names with these endings are files: a missing one is a mistyped path, never a Hub id.
FILE_SUFFIXES = (".safetensors", ".sft", ".gguf", ".json", ".yaml", ".onnx", *PICKLE_SUFFIXES)


def load(model: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         prediction_type: str | None = None) -> Pipeline:
    """A Pipeline from a single-file checkpoint, a diffusers folder, or a Hugging Face Hub id (downloaded)."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise UserError(f"unknown prediction type {prediction_type!r}: use 'epsilon' or 'v_prediction'")
    check_device(device)
    path = resolve(model)
    pipe = load_folder(path, dtype) if path.is_dir() else load_single_file(path, dtype)
    if path.is_dir() and (path / "depth_estimator").is_dir():   # SD 2 depth's folder ships its depth estimator
        pipe.depth_model = path
    # the file A1111's "Model hash" is of; a folder's UNet weights stand for the folder
    pipe.model_file = weights_file(path / "unet", "diffusion_pytorch_model") if path.is_dir() else path
    if prediction_type is not None:
        pipe.scheduler_config["prediction_type"] = prediction_type
    return pipe.to(device=device, dtype=dtype)


def save(pipe, out: str | Path, dtype: torch.dtype = torch.float16, overwrite: bool = False) -> None:
    """Write `pipe` (a Pipeline or a PixelPipeline) with its weights in `dtype`: `NAME.safetensors` as one file in the
    original layout, any other name as a diffusers folder. It is written beside `out` under a temporary name and
    renamed into place when complete, so `out` is never left half-written; an existing `out` is replaced only with
    `overwrite` (a folder only if it is a model folder: one with a model_index.json)."""
    from .pixel import PixelPipeline   # here, not at the top: pixel.py imports this module
    out = Path(out)
    single = check_replaceable(out, overwrite)
    if single and isinstance(pipe, PixelPipeline):
        raise UserError(f"{out}: a pixel-space model has no single-file layout: name a folder")
    if getattr(pipe, "embeddings", None):
        raise UserError("textual-inversion embeddings are loaded: they would be written into the text encoder; "
                        "save the model before loading them")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        if single:
            ldm.save_single_file(pipe, partial, dtype)
        elif isinstance(pipe, PixelPipeline):
            save_pixel_folder(pipe, partial, dtype)
        else:
            save_folder(pipe, partial, dtype)
        if out.is_dir():                      # a model folder (check_replaceable): swapped out, then removed
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old)
        else:
            os.replace(partial, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if partial.is_dir():
            shutil.rmtree(partial)
        partial.unlink(missing_ok=True)


def check_replaceable(out: Path, overwrite: bool) -> bool:
    """Refuse, before any weights are read or written, an `out` that cannot be written or must not be replaced;
    -> whether it names a single file (else a folder)."""
    single = out.suffix.lower() == ".safetensors"
    if out.suffix.lower() in FILE_SUFFIXES and not single:
        raise UserError(f"{out}: sdlite writes .safetensors: name a NAME.safetensors file (the original layout) "
                        "or a folder (the diffusers layout)")
    if not out.parent.is_dir():
        raise UserError(f"{out}: folder {out.parent} does not exist")
    check_writable(out.parent, str(out))
    if not os.path.lexists(out):
        return single
    if not overwrite:
        raise UserError(f"{out} exists: choose another name or pass --overwrite")
    if single and out.is_dir():
        raise UserError(f"{out} is a folder: name a .safetensors file")
    if not single and not out.is_dir():
        raise UserError(f"{out} is a file: name a folder")
    if not single and not (out / "model_index.json").is_file():
        raise UserError(f"{out} is a folder but not a model folder (no model_index.json): sdlite replaces only a "
                        "model folder; name another")
    return single


def check_device(device: str | torch.device) -> None:
    """Refuse a device that torch does not know or this machine does not have, before any weights are read."""
    try:
        device = torch.device(device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, TypeError) as e:   # AssertionError: "Torch not compiled with CUDA enabled"
        raise UserError(f"device {str(device)[:40]!r} is not available here ({str(e).splitlines()[0][:80]}): "
                        "use --device cpu") from None
    if device.type == "meta":
        raise UserError("device 'meta' holds no data and cannot generate images: use --device cpu")


def resolve(model: str | Path) -> Path:
    """A local path as it is; otherwise a Hub id such as 'runwayml/stable-diffusion-v1-5', downloaded. Anything that
    looks like a local path (absolute, ./ or ~, a weights file's suffix, or a first folder that exists here) is never
    sent to the Hub: a missing one is reported as missing."""
    if str(model) == "":
        raise UserError("--model is empty: give a .safetensors file, a diffusers folder or a Hub id")
    try:
        path = Path(model).expanduser()
        exists = path.exists()
    except (RuntimeError, OSError, ValueError) as e:  # ~user that does not exist, a NUL byte, a name too long
        raise UserError(f"model path {str(model)[:200]!r} is not usable: {e}") from None
    if os.path.islink(path) and not exists:
        raise UserError(f"model not found: {model} is a broken symbolic link (or a loop of them)")
    if exists:
        if not (path.is_dir() or path.is_file()):
            raise UserError(f"{model} is not a regular file or folder (a pipe or a device?): give a .safetensors "
                            "file or a diffusers folder")
        return path
    name = str(model)
    looks_like_hub_id = (name.count("/") == 1 and not name.startswith((".", "~", "/"))
                         and not name.lower().endswith(FILE_SUFFIXES) and not Path(name.split("/")[0]).exists())
    if not looks_like_hub_id:
        raise UserError(f"model not found: {model} does not exist (give a .safetensors file, a diffusers folder "
                        "or a Hub id such as owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=[
            "model_index.json", "*/*.json", "tokenizer/*.txt",
            "*/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]))
    except Exception as e:  # offline, unknown repository, gated model: all the user can act on is the message
        raise UserError(f"no local path {model}, and could not download {model!r} from the Hugging Face Hub: "
                        f"{str(e).splitlines()[0]}") from None


def read_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors by name, floating-point ones in `dtype`. Safetensors is the format (read_safetensors); a pickled file
    is opened only by torch's weights-only loader, which refuses anything but tensors and plain containers, so a
    checkpoint cannot run code (Pipeline.to casts it)."""
    if path.suffix in PICKLE_SUFFIXES:
        try:
            weights = read_file(path)
        except Exception as e:
            raise UserError(f"{path}: not a loadable weights-only checkpoint ({str(e).splitlines()[0]}); "
                            "convert it to .safetensors") from None
        weights = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
        if not isinstance(weights, dict):
            raise UserError(f"{path}: holds {type(weights).__name__} data where a state_dict (named tensors) belongs: "
                            "not a model checkpoint")
        wrong = [k for k, v in weights.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))][:1]
        if wrong:
            raise UserError(f"{path}: entry {str(wrong[0])[:80]!r} is not a named tensor: not a model checkpoint")
        return weights
    try:
        return read_safetensors(path, dtype)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


def load_single_file(path: Path, dtype: torch.dtype) -> Pipeline:
    parts = ldm.split(read_state_dict(path, dtype))
    missing = [ldm.PREFIXES[name] + "*" for name, part in parts.items() if not part]
    if missing:
        raise UserError(f"{path}: not a Stable Diffusion checkpoint (no {', '.join(missing)} weights)")
    layout = ldm.text_layout(parts["text_encoder"])
    if layout is None:
        raise UserError(f"{path}: unknown text encoder layout under cond_stage_model.* (neither SD 1.x nor 2.x)")
    text_from_ldm = ldm.clip_from_openai if layout == "openai" else ldm.clip_from_openclip
    text_config, text_weights = convert(text_from_ldm, parts["text_encoder"], path, "cond_stage_model.*")
    unet_config, unet_weights = convert(ldm.unet_from_ldm, parts["unet"], path, "model.diffusion_model.*")
    vae_config, vae_weights = convert(ldm.vae_from_ldm, parts["vae"], path, "first_stage_model.*")
    family = single_file_family(layout, unet_config.in_channels)
    vae_config.sample_size = family.image_size   # as the family's vae/config.json says (the tile side when tiling)
    return Pipeline(
        tokenizer=Tokenizer.from_vendored(family.pad_id),
        text_encoder=build(CLIPTextModel, text_config, text_weights, path),
        unet=build(UNet, unet_config, unet_weights, path),
        vae=build(AutoencoderKL, vae_config, vae_weights, path),
        scheduler_config=family.scheduler_config(),
        default_size=family.image_size, name=path.stem)


def load_folder(path: Path, dtype: torch.dtype) -> Pipeline:
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path}: not a diffusers folder (no model_index.json)")
    from . import pixel   # here, not at the top: pixel.py builds its pipeline with this module's build
    if pixel.is_pixel_folder(path, read_json(path / "model_index.json")):
        return pixel.load_folder(path, dtype)
    unet_json = read_json(path / "unet" / "config.json")
    unet_config = read_config(UNetConfig, unet_json, path / "unet" / "config.json")
    vae_config = read_config(VAEConfig, read_json(path / "vae" / "config.json"), path / "vae" / "config.json")
    text_config = read_config(CLIPTextConfig, read_json(path / "text_encoder" / "config.json"),
                              path / "text_encoder" / "config.json")
    text_weights = with_text_model_prefix(read_state_dict(weights_file(path / "text_encoder", "model"), dtype))
    unet_weights = read_state_dict(weights_file(path / "unet", "diffusion_pytorch_model"), dtype)
    vae_weights = read_state_dict(weights_file(path / "vae", "diffusion_pytorch_model"), dtype)
    return Pipeline(
        tokenizer=read_tokenizer(path / "tokenizer"),
        text_encoder=build(CLIPTextModel, text_config, text_weights, path / "text_encoder"),
        unet=build(UNet, unet_config, unet_weights, path / "unet"),
        vae=build(AutoencoderKL, vae_config, vae_weights, path / "vae"),
        scheduler_config=read_json(path / "scheduler" / "scheduler_config.json"),
        default_size=image_size(unet_json, vae_config.downscale),
        name=path.name)


def convert(conversion, state_dict: dict[str, torch.Tensor], path: Path, prefix: str):
    """conversion(state_dict) -> (config, state dict), weights that do not form the network refused."""
    try:
        return conversion(state_dict)
    except MALFORMED as e:
        raise UserError(f"{path}: the {prefix} weights do not form the expected network ({type(e).__name__}: "
                        f"{str(e)[:120]})") from None


class SkipNormalInit(TorchFunctionMode):
    """Within it, nn.init.normal_ (nn.Embedding's init) leaves its tensor as it is: on the meta device it would do
    nothing but import torch._dynamo, 1.6 s at every load on this machine."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.init.normal_:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build(module_class, config, state_dict: dict[str, torch.Tensor], where: Path) -> torch.nn.Module:
    """The module with the checkpoint's tensors as its parameters: built on the meta device (no memory, no random
    init) and given the loaded tensors themselves, never a copy. A missing or unexpected key is an error."""
    try:
        with torch.device("meta"), SkipNormalInit():
            module = module_class(config)
    except UserError:
        raise
    except MALFORMED as e:   # a config value of the wrong type or range (read from config.json, or inferred)
        raise UserError(f"{where}: its config does not describe a network that can be built ({type(e).__name__}: "
                        f"{str(e)[:120]})") from None
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as e:   # a tensor of another shape than the config's widths give
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise UserError(f"{where}: the weights do not fit the config ({mismatch})") from None
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit the inferred architecture "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval().requires_grad_(False)
