"""Open a Stable Diffusion checkpoint in either official layout and build sdlite's modules from it.

  single file   v1-5-pruned-emaonly.safetensors
                  model.diffusion_model.*  UNet            (unet.unet_from_ldm maps the keys)
                  first_stage_model.*      VAE             (vae.vae_from_ldm)
                  cond_stage_model.*       text encoder:   transformer.* = OpenAI CLIP (SD 1.x, clip.clip_from_openai)
                                                           model.*       = OpenCLIP    (SD 2.x, clip.clip_from_openclip)
                Nothing in the file says which scheduler or image size it was trained for: the family's convention
                decides (SD 2.x single files are v-prediction unless the caller says otherwise, as in the reference).
  folder        model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/ (the diffusers layout): every
                config is read from its config.json and the weights need no key mapping, since sdlite's module
                attribute names are the diffusers names.
"""
import json
import os
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from .clip import CLIPTextConfig, CLIPTextModel, clip_from_openai, clip_from_openclip, with_text_model_prefix
from .errors import UserError
from .pipeline import Pipeline
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig, unet_from_ldm
from .vae import AutoencoderKL, VAEConfig, vae_from_ldm
from .weights import read_safetensors

# The training schedules of the official releases, as their diffusers folders state them (scheduler_config.json of
# stable-diffusion-v1-5 and stable-diffusion-2-1), used for single files, which carry no scheduler config.
SD1_SCHEDULER = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None, "steps_offset": 1,
                 "skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False}
SD2_SCHEDULER = {**SD1_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Names with these endings are files: a missing one is a mistyped path, never a Hub id.
FILE_SUFFIXES = (".safetensors", ".sft", ".gguf", ".json", ".yaml", ".onnx", *PICKLE_SUFFIXES)
# What a conversion or a config constructor raises on keys, shapes or values it cannot make sense of.
MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError)


def load(model: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         prediction_type: str | None = None) -> Pipeline:
    """A Pipeline from a single-file checkpoint, a diffusers folder, or a Hugging Face Hub id (downloaded)."""
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise UserError(f"unknown prediction type {prediction_type!r}: use 'epsilon' or 'v_prediction'")
    check_device(device)
    path = resolve(model)
    pipe = load_folder(path, dtype) if path.is_dir() else load_single_file(path, dtype)
    # the file A1111's "Model hash" is of; a folder's UNet weights stand for the folder
    pipe.model_file = weights_file(path / "unet", "diffusion_pytorch_model") if path.is_dir() else path
    if prediction_type is not None:
        pipe.scheduler_config["prediction_type"] = prediction_type
    return pipe.to(device=device, dtype=dtype)


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
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path}: not a loadable weights-only checkpoint ({str(e).splitlines()[0]}); "
                            "convert it to .safetensors") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict):
            raise UserError(f"{path}: holds {type(sd).__name__} data where a state_dict (named tensors) belongs: "
                            "not a model checkpoint")
        wrong = [k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))][:1]
        if wrong:
            raise UserError(f"{path}: entry {str(wrong[0])[:80]!r} is not a named tensor: not a model checkpoint")
        return sd
    try:
        return read_safetensors(path, dtype)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


def load_single_file(path: Path, dtype: torch.dtype) -> Pipeline:
    sd = read_state_dict(path, dtype)
    parts = {prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
             for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")}
    missing = [prefix + "*" for prefix, part in parts.items() if not part]
    if missing:
        raise UserError(f"{path}: not a Stable Diffusion checkpoint (no {', '.join(missing)} weights)")
    text = parts["cond_stage_model."]
    if any(k.startswith("transformer.") for k in text):
        scheduler, pad_id, side = SD1_SCHEDULER, 49407, 512    # OpenAI CLIP pads with end-of-text
        text_config, text_sd = convert(clip_from_openai, text, path, "cond_stage_model.*")
    elif any(k.startswith("model.") for k in text):
        scheduler, pad_id, side = SD2_SCHEDULER, 0, 768        # OpenCLIP pads with 0 ("!")
        text_config, text_sd = convert(clip_from_openclip, text, path, "cond_stage_model.*")
    else:
        raise UserError(f"{path}: unknown text encoder layout under cond_stage_model.* (neither SD 1.x nor 2.x)")
    unet_config, unet_sd = convert(unet_from_ldm, parts["model.diffusion_model."], path, "model.diffusion_model.*")
    vae_config, vae_sd = convert(vae_from_ldm, parts["first_stage_model."], path, "first_stage_model.*")
    vae_config.sample_size = side   # as the family's diffusers vae/config.json says (the tile side when tiling)
    return Pipeline(
        tokenizer=Tokenizer.from_vendored(pad_id),
        text_encoder=build(CLIPTextModel, text_config, text_sd, path),
        unet=build(UNet, unet_config, unet_sd, path),
        vae=build(AutoencoderKL, vae_config, vae_sd, path),
        scheduler_config=dict(scheduler),
        default_size=side, name=path.stem)


def load_folder(path: Path, dtype: torch.dtype) -> Pipeline:
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path}: not a diffusers folder (no model_index.json)")
    read_json(path / "model_index.json")
    unet_json = read_json(path / "unet" / "config.json")
    unet_config = read_config(UNetConfig, unet_json, path / "unet" / "config.json")
    vae_config = read_config(VAEConfig, read_json(path / "vae" / "config.json"), path / "vae" / "config.json")
    text_config = read_config(CLIPTextConfig, read_json(path / "text_encoder" / "config.json"),
                              path / "text_encoder" / "config.json")
    text_sd = with_text_model_prefix(read_state_dict(weights_file(path / "text_encoder", "model"), dtype))
    unet_sd = read_state_dict(weights_file(path / "unet", "diffusion_pytorch_model"), dtype)
    vae_sd = read_state_dict(weights_file(path / "vae", "diffusion_pytorch_model"), dtype)
    return Pipeline(
        tokenizer=read_tokenizer(path / "tokenizer"),
        text_encoder=build(CLIPTextModel, text_config, text_sd, path / "text_encoder"),
        unet=build(UNet, unet_config, unet_sd, path / "unet"),
        vae=build(AutoencoderKL, vae_config, vae_sd, path / "vae"),
        scheduler_config=read_json(path / "scheduler" / "scheduler_config.json"),
        default_size=(unet_json.get("sample_size") or 64) * vae_config.downscale,   # an int: UNetConfig checks it
        name=path.name)


def read_json(path: Path) -> dict:
    """A config file's JSON object."""
    if path.exists() and not path.is_file():   # a folder, or a pipe that would block the read
        raise UserError(f"{path}: not a regular file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the diffusers folder is incomplete") from None
    except (ValueError, RecursionError) as e:   # invalid UTF-8 or JSON
        raise UserError(f"{path}: not valid JSON ({str(e)[:120]})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a JSON {type(data).__name__}, not an object of settings")
    return data


def read_config(config_class, data: dict, path: Path):
    """config_class.from_json(data), a value of the wrong type or range refused naming the file."""
    try:
        return config_class.from_json(data, path)
    except UserError:
        raise
    except MALFORMED as e:
        raise UserError(f"{path}: a missing key or a value of the wrong type ({type(e).__name__}: "
                        f"{str(e)[:120]})") from None


def read_tokenizer(folder: Path) -> Tokenizer:
    if not folder.is_dir():
        raise UserError(f"{folder} is missing: the diffusers folder is incomplete")
    try:
        return Tokenizer.from_folder(folder)
    except UserError:
        raise
    except (Exception, RecursionError) as e:   # the tokenizers library raises plain Exception on a corrupt file
        raise UserError(f"{folder}: not a readable CLIP tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None


def convert(conversion, state_dict: dict[str, torch.Tensor], path: Path, prefix: str):
    """conversion(state_dict) -> (config, state dict), weights that do not form the network refused."""
    try:
        return conversion(state_dict)
    except MALFORMED as e:
        raise UserError(f"{path}: the {prefix} weights do not form the expected network ({type(e).__name__}: "
                        f"{str(e)[:120]})") from None


def weights_file(folder: Path, stem: str) -> Path:
    """The component's weights: full precision if present, else the `.fp16` variant, else a pickled .bin."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: no weights ({stem}.safetensors or {stem}.fp16.safetensors)")


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
