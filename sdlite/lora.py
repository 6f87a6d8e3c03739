"""LoRA (Hu et al. 2021, eq. 3): a fine-tune stored as low-rank updates of the UNet's and the text encoder's linear
and convolution weights,

    W' = W + weight * (alpha / r) * up @ down          up (out, r), down (r, in), r much smaller than out and in

with `weight` the user's strength (A1111's multiplier) and alpha / r the file's own scale. The files:
  kohya / A1111    lora_unet_<layer>.lora_down.weight, .lora_up.weight, .alpha, and lora_te_<layer>.* for the text
                   encoder, <layer> being the diffusers module path with "." -> "_"
                   (lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q). LoCon adds convolutions:
                   down (r, in, kh, kw) is a convolution with the layer's kernel, up (out, r, 1, 1) a 1x1 one, so
                   up @ down (flattened) is an (out, in, kh, kw) kernel. No alpha: alpha = r.
  diffusers / PEFT unet.<layer>.lora_A.weight (down), .lora_B.weight (up), text_encoder.<layer>.*. The scale is
                   lora_alpha / r of each model's LoraConfig when diffusers stored it in the file's metadata
                   (`peft_scales`), else 1.
sdlite's module names are diffusers' (unet.py, clip.py), so a file's names are found by walking the model's own
Linear and Conv2d layers (`layer_names`), not from a table.

Merged, not kept beside: load_lora adds the update into the weights, and unmerge puts the original weights back. An
sdlite weight is usually a read-only view of the memory-mapped checkpoint (weights.py), never changed in place: the
merged weight is a new tensor of that layer alone, the original stays referenced (ORIGINALS), and unmerge points each
layer back at it, exact with no arithmetic to undo. Every key of a file is checked (a layer of this model, shapes
that fit) before any weight changes: a LoRA for another model is refused whole, never half-applied.
"""
import json
import re
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .errors import UserError
from .weights import PICKLE_SUFFIXES, read_file

KINDS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",     # kohya / A1111
         ".lora_A.weight": "down", ".lora_B.weight": "up"}                             # diffusers / PEFT
# <lora:NAME>, <lora:NAME:WEIGHT> (and <lyco:...>, which A1111 reads as <lora:...>)
LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]+)>")

# The weight each merged layer had before its first LoRA: what unmerge restores.
ORIGINALS: "weakref.WeakKeyDictionary[nn.Module, nn.Parameter]" = weakref.WeakKeyDictionary()


def file_names(model: str, layer: str) -> list[str]:
    """The names a file gives the layer `layer` (sdlite's module path) of the unet or the text_encoder.
    The text encoder's modules are under text_model. in transformers before 5.x, and in kohya's names."""
    kohya = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[model]
    names = [kohya + layer.replace(".", "_"), f"{model}.{layer}"]
    if layer.startswith("text_model."):
        names.append(f"{model}.{layer.removeprefix('text_model.')}")
    return names


def layer_names(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Every Linear and Conv2d of the models by each name a LoRA file may give it."""
    return {name: module for model, root in models.items() for layer, module in root.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) for name in file_names(model, layer)}


def read_lora(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors by layer name and kind (down, up, alpha), in fp32."""
    if not path.is_file():
        raise UserError(f"LoRA not found: {path}")
    try:
        sd = read_file(path)   # a pickle through the weights-only loader: tensors and plain containers, never code
    except Exception as e:
        raise UserError(f"{path}: not a readable LoRA file ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: not a LoRA file (holds a {type(sd).__name__}, not a dict of tensors)")
    layers = {}
    for key, value in sd.items():
        suffix = next((s for s in KINDS if key.endswith(s)), None)
        if suffix is None or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: {key!r} is not a LoRA tensor (lora_down/lora_up/alpha or lora_A/lora_B): "
                            "not a LoRA file sdlite reads")
        layers.setdefault(key.removesuffix(suffix), {})[KINDS[suffix]] = value.float()
    if not layers:
        raise UserError(f"{path}: holds no tensors")
    return layers


def peft_scales(path: Path) -> dict[str, float]:
    """The scale of the unet's and the text_encoder's layers in a diffusers-saved PEFT file, from the LoraConfig it
    stores in the safetensors metadata (lora_adapter_metadata: {"unet.r": 4, "unet.lora_alpha": 8, ...}): PEFT
    scales by lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (Kalajdzievski 2023)."""
    if path.suffix != ".safetensors":
        return {}
    with safe_open(path, "pt") as f:
        config = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    scales = {}
    for model in ("unet", "text_encoder"):
        if f"{model}.lora_alpha" not in config:
            continue
        if config.get(f"{model}.rank_pattern") or config.get(f"{model}.alpha_pattern"):
            raise UserError(f"{path}: per-layer ranks or alphas (PEFT's rank_pattern, alpha_pattern) are not supported")
        r = config[f"{model}.r"]
        scales[model] = config[f"{model}.lora_alpha"] / (r ** 0.5 if config.get(f"{model}.use_rslora") else r)
    return scales


def update(down: torch.Tensor, up: torch.Tensor, scale: float, weight: torch.Tensor) -> torch.Tensor | None:
    """scale * up @ down in the layer weight's shape, or None if the shapes do not fit it."""
    r = down.shape[0]
    kernel_fits = down.shape[1:] == weight.shape[1:] or (down.ndim == 2 and weight[0].numel() == down.shape[1])
    if up.shape[0] != weight.shape[0] or up[0].numel() != r or not kernel_fits:
        return None
    return (scale * up.flatten(1) @ down.flatten(1)).reshape(weight.shape)


def updates(models: dict[str, nn.Module], path: Path) -> list[tuple[nn.Module, torch.Tensor]]:
    """Each layer the file changes and its update, all checked before any is returned."""
    layers, known = read_lora(path), layer_names(models)
    unknown = [name for name in layers if name not in known]
    if unknown:
        sdxl = any(name.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks")) for name in unknown)
        hint = " (an SDXL LoRA?)" if sdxl else ""
        raise UserError(f"{path}: {len(unknown)} of its {len(layers)} layers are not in this model, e.g. {unknown[0]}"
                        f"{hint}: the LoRA was made for another model")
    out, peft = [], peft_scales(path)
    for name, parts in layers.items():
        if "down" not in parts or "up" not in parts:
            raise UserError(f"{path}: layer {name} lacks its {'down' if 'down' not in parts else 'up'} weight")
        layer = known[name]
        # kohya: alpha / r (no alpha: 1); PEFT: by the model's name before the first "." (unet, text_encoder)
        scale = parts["alpha"].item() / len(parts["down"]) if "alpha" in parts else peft.get(name.split(".")[0], 1.0)
        delta = update(parts["down"], parts["up"], scale, layer.weight)
        if delta is None:
            raise UserError(f"{path}: layer {name} has shapes {tuple(parts['up'].shape)} @ {tuple(parts['down'].shape)}"
                            f" but this model's weight is {tuple(layer.weight.shape)}: the LoRA was made for another "
                            "model (SD 1.x and 2.x differ)")
        out.append((layer, delta))
    return out


def merge(models: dict[str, nn.Module], path: Path, weight: float = 1.0) -> None:
    """W += weight * update for every layer the file changes, each merged weight a new tensor (module docstring)."""
    for layer, delta in updates(models, path):
        ORIGINALS.setdefault(layer, layer.weight)
        w = layer.weight
        layer.weight = nn.Parameter((w.float() + weight * delta.to(w.device)).to(w.dtype), requires_grad=False)


def unmerge(models: dict[str, nn.Module]) -> None:
    """Every merged layer of the models back to its weight from before its first LoRA: the very same tensor."""
    for root in models.values():
        for layer in root.modules():
            if layer in ORIGINALS:
                layer.weight = ORIGINALS.pop(layer)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's extra-network syntax: `<lora:NAME:WEIGHT>` (WEIGHT 1 if left out) taken out of the prompt, which is
    otherwise left as it is (A1111 removes the tag only, not the comma or space around it)."""
    loras = []
    for m in LORA_TAG.finditer(prompt):
        name, *weights = m.group(1).split(":")
        if not name.strip():
            raise UserError(f"{m.group(0)}: no LoRA name: write <lora:NAME:WEIGHT>")
        if any("=" in w for w in weights) or len(set(weights)) > 1:
            raise UserError(f"{m.group(0)}: separate text-encoder and UNet weights are not supported: give one weight")
        try:
            loras.append((name, float(weights[0]) if weights else 1.0))
        except ValueError:
            raise UserError(f"{m.group(0)}: the weight must be a number, as in <lora:{name}:0.8>") from None
    return LORA_TAG.sub("", prompt), loras


def find_lora(directory: Path, name: str) -> Path:
    """The file a prompt's <lora:NAME> means: NAME.safetensors (or .pt, .ckpt) in the directory or a folder in it,
    as A1111 looks for it in its models/Lora."""
    found = sorted(p for p in directory.rglob(f"{name}.*") if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    if not found:
        raise UserError(f"<lora:{name}>: no {name}.safetensors in {directory}")
    return found[0]
