"""The diffusers folder layout, read and written: one subfolder per component, each with its config and weights.

    model_index.json                    which class each component is
    unet/         config.json           UNetConfig.from_json / to_json     diffusion_pytorch_model.safetensors
                                        (a pixel model's DDPMPipeline folder: UNet2DConfig, no vae/ nor text)
    vae/          config.json           VAEConfig.from_json / to_json      diffusion_pytorch_model.safetensors
    text_encoder/ config.json           CLIPTextConfig.from_json           model.safetensors (transformers' names)
    tokenizer/    vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json (or tokenizer.json)
    scheduler/    scheduler_config.json the training schedule and the sampler the model was published with

sdlite's module attribute names are the diffusers and transformers names, so the weights need no key mapping (but
for transformers' two spellings of the text encoder's keys). The configs' key checks are in each model file's
from_json (sdlite/config.py reads them); the files' JSON, the weights' file names and the writer are here.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..clip import CLIPTextModel
from ..errors import MALFORMED, UserError
from ..tokenizer import Tokenizer
from ..unet import UNet
from ..vae import AutoencoderKL

# The diffusers release whose folders these are (the one the reference tests ran).
DIFFUSERS_VERSION = "0.42.1"


# ---- reading ----

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


def weights_file(folder: Path, stem: str) -> Path:
    """The component's weights: full precision if present, else the `.fp16` variant, else a pickled .bin."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: no weights ({stem}.safetensors or {stem}.fp16.safetensors)")


def with_text_model_prefix(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict in sdlite's names. transformers before 5.x saved its keys under
    `text_model.`, 5.x saves them without; older files also hold `text_model.embeddings.position_ids`, the constant
    0..76 that sdlite does not store (forward takes the first L position embeddings), so it is dropped.
    CLIPTextModelWithProjection's text_projection sits beside text_model in both."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in weights.items() if not k.endswith("embeddings.position_ids")}


def image_size(unet_json: dict, vae_scale: int) -> int:
    """The image side the model was trained at: unet/config.json's sample_size (in latents) times the VAE's scale."""
    return (unet_json.get("sample_size") or 64) * vae_scale   # an int: UNetConfig checks it


# ---- writing ----

def save_folder(pipe, out: Path, dtype: torch.dtype = torch.float16) -> None:
    """The pipeline as a diffusers folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, with
    the config keys diffusers and transformers use, so that sdlite.load and diffusers' from_pretrained both read it."""
    latent_side = pipe.default_size // pipe.vae_scale
    depth_parts = {part: names for part, names in DEPTH_PARTS.items()   # SD 2 depth's, when loaded from its folder
                   if pipe.depth_model is not None and (pipe.depth_model / part).is_dir()}
    write_json(out / "model_index.json", {
        "_class_name": PIPELINE_CLASSES.get(pipe.unet.config.in_channels, "StableDiffusionPipeline"),
        "_diffusers_version": DIFFUSERS_VERSION, "safety_checker": [None, None], "requires_safety_checker": False,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", pipe.scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], **depth_parts})
    save_unet(pipe.unet, out / "unet", latent_side, dtype)
    save_vae(pipe.vae, out / "vae", dtype)
    save_text_encoder(pipe.text_encoder, out / "text_encoder", dtype)
    save_tokenizer(pipe.tokenizer, out / "tokenizer")
    save_scheduler(pipe.scheduler_config, out / "scheduler")
    for part in depth_parts:   # copied as they are
        shutil.copytree(pipe.depth_model / part, out / part)


# The pipeline class of model_index.json, by the UNet's input channels (latents, + mask and masked image, + depth);
# SD 2 depth's folder also holds its depth estimator and that estimator's preprocessing config.
PIPELINE_CLASSES = {4: "StableDiffusionPipeline", 9: "StableDiffusionInpaintPipeline",
                    5: "StableDiffusionDepth2ImgPipeline"}
DEPTH_PARTS = {"depth_estimator": ["transformers", "DPTForDepthEstimation"],
               "feature_extractor": ["transformers", "DPTImageProcessor"]}


def save_pixel_folder(pipe, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """A PixelPipeline as diffusers' DDPMPipeline folder: model_index.json, unet/ (a UNet2DModel), scheduler/, so
    that sdlite.load and diffusers' DDPMPipeline.from_pretrained both read it."""
    write_json(out / "model_index.json", {
        "_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", pipe.scheduler_config["_class_name"]], "unet": ["diffusers", "UNet2DModel"]})
    write_json(out / "unet" / "config.json", {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **pipe.unet.config.to_json()})
    save_weights(pipe.unet.state_dict(), out / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    save_scheduler(pipe.scheduler_config, out / "scheduler")


def save_unet(unet: UNet, folder: Path, sample_size: int, dtype: torch.dtype) -> None:
    write_json(folder / "config.json", {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": sample_size,
        **unet.config.to_json()})
    save_weights(unet.state_dict(), folder / "diffusion_pytorch_model.safetensors", dtype)


def save_vae(vae: AutoencoderKL, folder: Path, dtype: torch.dtype) -> None:
    write_json(folder / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **vae.config.to_json()})
    save_weights(vae.state_dict(), folder / "diffusion_pytorch_model.safetensors", dtype)


def save_text_encoder(text_encoder: CLIPTextModel, folder: Path, dtype: torch.dtype) -> None:
    c = text_encoder.config
    write_json(folder / "config.json", {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "hidden_act": c.hidden_act, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings, "layer_norm_eps": c.layer_norm_eps,
        "projection_dim": c.hidden_size, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        "torch_dtype": "float32"})  # what transformers loads it as, whatever the file's dtype: as the UNet and VAE
    save_weights(text_encoder.state_dict(), folder / "model.safetensors", dtype)


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """vocab.json and merges.txt (the BPE model) and the special tokens, as CLIPTokenizer writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.backend.model.save(str(folder))
    token = tokenizer.backend.id_to_token
    specials = {"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
                "pad_token": token(tokenizer.pad_id), "unk_token": token(tokenizer.eos_id)}
    write_json(folder / "special_tokens_map.json", specials)
    write_json(folder / "tokenizer_config.json", {**specials, "tokenizer_class": "CLIPTokenizer",
                                                  "model_max_length": tokenizer.max_length, "do_lower_case": True})


def save_scheduler(scheduler_config: dict, folder: Path) -> None:
    write_json(folder / "scheduler_config.json", {**scheduler_config, "_diffusers_version": DIFFUSERS_VERSION})


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    """The tensors as a safetensors file, in `dtype`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in state_dict.items()}, path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)   # save_file creates it 0600; a file written by the other writers is 0666 - umask


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
