"""The trained pipeline as a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
with the config keys diffusers and transformers use, so that sdlite.load and diffusers' from_pretrained both read it.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..clip import CLIPTextModel
from ..pipeline import Pipeline
from ..tokenizer import Tokenizer
from ..unet import UNet
from ..vae import AutoencoderKL

DIFFUSERS_VERSION = "0.42.1"  # the diffusers whose folders these are written as (the configs' "_diffusers_version")

def save_folder(pipe: Pipeline, out: Path, dtype: torch.dtype = torch.float16) -> None:
    """The pipeline as a diffusers folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, with
    the config keys diffusers and transformers use, so that sdlite.load and diffusers' from_pretrained both read it."""
    latent_side = pipe.default_size // pipe.vae_scale
    write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "image_encoder": [None, None], "scheduler": ["diffusers", pipe.scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    save_unet(pipe.unet, out / "unet", latent_side, dtype)
    save_vae(pipe.vae, out / "vae", dtype)
    save_text_encoder(pipe.text_encoder, out / "text_encoder", dtype)
    save_tokenizer(pipe.tokenizer, out / "tokenizer")
    write_json(out / "scheduler" / "scheduler_config.json",
               {**pipe.scheduler_config, "_diffusers_version": DIFFUSERS_VERSION})


def save_unet(unet: UNet, folder: Path, sample_size: int, dtype: torch.dtype) -> None:
    write_json(folder / "config.json", {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": sample_size,
        **unet.config.to_json()})
    save_weights(unet, folder / "diffusion_pytorch_model.safetensors", dtype)


def save_vae(vae: AutoencoderKL, folder: Path, dtype: torch.dtype) -> None:
    write_json(folder / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **vae.config.to_json()})
    save_weights(vae, folder / "diffusion_pytorch_model.safetensors", dtype)


def save_text_encoder(text_encoder: CLIPTextModel, folder: Path, dtype: torch.dtype) -> None:
    c = text_encoder.config
    write_json(folder / "config.json", {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "hidden_act": c.hidden_act, "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings, "layer_norm_eps": c.layer_norm_eps,
        "projection_dim": c.hidden_size, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        "torch_dtype": "float32"})  # what transformers loads it as, whatever the file's dtype: as the UNet and VAE
    save_weights(text_encoder, folder / "model.safetensors", dtype)


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


def save_weights(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}, path)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
