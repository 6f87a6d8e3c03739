"""The original single-file layout (CompVis / Stability AI's latent-diffusion code, the `.safetensors` or `.ckpt` that
A1111 and ComfyUI load): one state dict, a prefix per network, the networks' own key names.

    model.diffusion_model.*  UNet          input_blocks / middle_block / output_blocks, numbered consecutively
    first_stage_model.*      VAE           encoder.down.N.block.M ..., decoder levels numbered from the image end
    cond_stage_model.*       text encoder  transformer.text_model.* = OpenAI CLIP, transformers' names (SD 1.x)
                                           model.*                  = OpenCLIP's names (SD 2.x)

Each network has a reader (its part of the file -> sdlite's config and state dict: the config read off the tensor
shapes, the keys renamed to sdlite's, which are diffusers' and transformers') and a writer (the way back). Keys that
sdlite does not use are dropped by the readers and not written by the writers: the EMA's bookkeeping (model_ema.*),
the schedule buffers (betas, alphas_cumprod, ...), the VAE's training loss (loss.*), CLIP's position_ids (the
constant 0..76) and OpenCLIP's contrastive head (text_projection, logit_scale).
"""
import dataclasses
import re

import torch

from ..clip import CLIPTextConfig, CLIPTextModel
from ..errors import UserError
from ..unet import UNet, UNetConfig
from ..vae import AutoencoderKL, VAEConfig
from .diffusers import save_weights, with_text_model_prefix

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}


def split(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A single file's state dict -> each network's part, its prefix removed (empty where the file has none)."""
    return {name: {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            for name, prefix in PREFIXES.items()}


def text_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The text encoder's layout of a `cond_stage_model.` part: "openai" (SD 1.x), "openclip" (SD 2.x) or None."""
    if any(k.startswith("transformer.") for k in state_dict):
        return "openai"
    if any(k.startswith("model.") for k in state_dict):
        return "openclip"
    return None


def single_file(unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """sdlite's three networks as one single-file state dict (the tensors themselves, not copies)."""
    text = (clip_to_openclip if text_encoder.config.hidden_act == "gelu" else clip_to_openai)(
        text_encoder.state_dict())
    parts = {"unet": unet_to_ldm(unet.config, unet.state_dict()), "vae": vae_to_ldm(vae.config, vae.state_dict()),
             "text_encoder": text}
    return {PREFIXES[name] + key: value for name, part in parts.items() for key, value in part.items()}


def save_single_file(pipe, path, dtype: torch.dtype = torch.float16) -> None:
    """A pipeline's networks as a single .safetensors file in the original layout, if it can hold them (UserError
    naming what it cannot hold: write a folder then)."""
    weights = single_file(pipe.unet, pipe.vae, pipe.text_encoder)
    problem = unrepresentable(weights, pipe.unet, pipe.vae, pipe.text_encoder)
    if problem:
        raise UserError(f"the single-file layout cannot hold this model: {problem}; write a diffusers folder")
    save_weights(weights, path, dtype)


def unrepresentable(weights: dict[str, torch.Tensor], unet: UNet, vae: AutoencoderKL,
                    text_encoder: CLIPTextModel) -> str | None:
    """The first config value that the readers below would not find again in `weights` (a single file has no
    config: each network's is read off its tensor shapes and the original code's constants, e.g. 32 GroupNorm
    groups), or None. The VAE's sample_size is the family's (formats/families.py), not the file's."""
    parts = split(weights)
    from_openai = text_layout(parts["text_encoder"]) == "openai"
    for name, (found, config) in {
            "UNet": (unet_from_ldm(parts["unet"])[0], unet.config),
            "VAE": (vae_from_ldm(parts["vae"])[0], vae.config),
            "text encoder": ((clip_from_openai if from_openai else clip_from_openclip)(parts["text_encoder"])[0],
                             text_encoder.config)}.items():
        for field in dataclasses.fields(config):
            ours, read = getattr(config, field.name), getattr(found, field.name)
            if ours != read and field.name != "sample_size":
                return f"its {name}'s {field.name} is {ours}, which the layout reads as {read}"
    return None


# ---- UNet: model.diffusion_model.* ----

# leaf modules the original names differently: the top-level ones, then those inside a resnet or downsampler
UNET_NAMES = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut", "op": "conv",
}
UNET_LDM_NAMES = {diffusers: ldm for ldm, diffusers in UNET_NAMES.items()}


def ldm_to_diffusers_key(key: str, layers_per_block: int) -> str:
    """`output_blocks.4.1.proj_in.weight` -> `up_blocks.1.attentions.1.proj_in.weight` (for 2 layers per block).

    The original numbers the blocks of each half consecutively: input_blocks.0 is conv_in, then each level has
    layers_per_block blocks [resnet, transformer] and one [downsampler]; output_blocks has layers_per_block + 1
    blocks per level [resnet, transformer, upsampler], the upsampler in the last. middle_block is resnet,
    transformer, resnet. A transformer's inner names are diffusers' already.
    """
    path, param = key.rsplit(".", 1)
    if path in UNET_NAMES:
        return f"{UNET_NAMES[path]}.{param}"
    half, index, *inner = path.split(".")
    index = int(index)
    if half == "middle_block":
        block = "mid_block.attentions.0" if index == 1 else f"mid_block.resnets.{index // 2}"
    else:
        position, *inner = inner
        if half == "input_blocks":
            level, i = divmod(index - 1, layers_per_block + 1)
            side, resampler = "down_blocks", "downsamplers"
        else:
            level, i = divmod(index, layers_per_block + 1)
            side, resampler = "up_blocks", "upsamplers"
        if inner in (["op"], ["conv"]):
            block = f"{side}.{level}.{resampler}.0"
        else:
            block = f"{side}.{level}.{['resnets', 'attentions'][int(position)]}.{i}"
    inner = ".".join(inner)
    return f"{block}.{UNET_NAMES.get(inner, inner)}.{param}"


def diffusers_to_ldm_key(key: str, layers_per_block: int, up_attention: set[int]) -> str:
    """The inverse of ldm_to_diffusers_key: `up_blocks.1.attentions.1.proj_in.weight` -> `output_blocks.4.1.proj_in
    .weight`. up_attention: the up_blocks with transformers, whose upsampler comes third in its block, not second."""
    path, param = key.rsplit(".", 1)
    if path in UNET_LDM_NAMES:
        return f"{UNET_LDM_NAMES[path]}.{param}"
    side, *rest = path.split(".")
    if side == "mid_block":
        kind, i, *inner = rest
        block = "middle_block.1" if kind == "attentions" else f"middle_block.{2 * int(i)}"
    else:
        level, kind, i, *inner = rest
        level, i = int(level), int(i)
        if side == "down_blocks":
            index = 1 + level * (layers_per_block + 1) + (layers_per_block if kind == "downsamplers" else i)
            position = 1 if kind == "attentions" else 0
        else:
            index = level * (layers_per_block + 1) + (layers_per_block if kind == "upsamplers" else i)
            position = {"resnets": 0, "attentions": 1, "upsamplers": 1 + (level in up_attention)}[kind]
        block = f"{'input' if side == 'down_blocks' else 'output'}_blocks.{index}.{position}"
        if kind == "upsamplers":                          # the upsampler's convolution is `conv` in both layouts
            return f"{block}.conv.{param}"
    inner = ".".join(inner)
    return f"{block}.{UNET_LDM_NAMES.get(inner, inner)}.{param}"


def encoder_fields(weights: dict[str, torch.Tensor]) -> dict:
    """The UNetConfig fields that an original-layout encoder (the input_blocks and middle_block of a UNet or of a
    ControlNet) shows in its tensor shapes (the idea of ComfyUI's model_detection)."""
    levels = 1 + sum(k.startswith("input_blocks.") and k.endswith(".op.weight") for k in weights)  # all but the last
    n_input = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("input_blocks."))
    layers = n_input // levels - 1                                       # n_input = 1 + levels * layers + levels - 1
    first = [1 + level * (layers + 1) for level in range(levels)]       # each level's first input block
    channels = tuple(weights[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first)
    mid = "middle_block.1."
    v2 = weights[mid + "proj_in.weight"].ndim == 2   # SD 2.x: Linear projections, 64-dim heads, upcast attention
    return dict(
        in_channels=weights["input_blocks.0.0.weight"].shape[1],
        block_out_channels=channels,
        layers_per_block=layers,
        attention_levels=tuple(f"input_blocks.{i}.1.proj_in.weight" in weights for i in first),
        heads=tuple(c // 64 for c in channels) if v2 else (8,) * levels,
        transformer_depth=len({k.split(".")[3] for k in weights if k.startswith(mid + "transformer_blocks.")}),
        cross_attention_dim=weights[mid + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
        use_linear_projection=v2,
        upcast_attention=v2,
    )


def unet_from_ldm(weights: dict[str, torch.Tensor]) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """Config and diffusers-named weights of an original single-file UNet (keys without `model.diffusion_model.`),
    the architecture read off the tensor shapes: the encoder's (encoder_fields), the output width and which decoder
    levels attend."""
    encoder = encoder_fields(weights)
    levels, layers = len(encoder["block_out_channels"]), encoder["layers_per_block"]
    config = UNetConfig(
        **encoder,
        out_channels=weights["out.2.weight"].shape[0],
        up_attention_levels=tuple(f"output_blocks.{(levels - 1 - level) * (layers + 1)}.1.proj_in.weight" in weights
                                  for level in range(levels)),
    )
    return config, {ldm_to_diffusers_key(k, layers): v for k, v in weights.items()}


def unet_to_ldm(config: UNetConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sdlite's UNet weights in the original names. The original numbers its blocks with one layers_per_block and
    always has a middle block: another UNet has no single-file form."""
    if len(set(config.layers_per_block)) > 1 or not config.mid_block:
        raise UserError("this UNet (layers_per_block differing between levels, or no mid block) has no form in the "
                        "original single-file layout: save it as a diffusers folder")
    levels = len(config.block_out_channels)
    up_attention = {levels - 1 - level for level, attends in enumerate(config.up_attention_levels) if attends}
    return {diffusers_to_ldm_key(k, config.layers_per_block[0], up_attention): v for k, v in weights.items()}


# ---- VAE: first_stage_model.* ----

# Components of LDM key names that diffusers calls differently, the longest first (the mid block's "block_1" is
# "resnets.0" where any other "block" is "resnets"). The other components are the same in both.
VAE_NAMES = {
    "mid.block_1": "mid_block.resnets.0", "mid.attn_1": "mid_block.attentions.0", "mid.block_2": "mid_block.resnets.1",
    "down": "down_blocks", "up": "up_blocks", "block": "resnets", "nin_shortcut": "conv_shortcut",
    "downsample": "downsamplers.0", "upsample": "upsamplers.0", "norm_out": "conv_norm_out",
    "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0",  # inside attn_1
}
VAE_LDM_NAMES = {diffusers: ldm for ldm, diffusers in VAE_NAMES.items()}


def rename(key: str, names: dict[str, str]) -> str:
    """`key` with each run of dot-separated components that `names` holds replaced, the longest run first."""
    parts, out = key.split("."), []
    while parts:
        n = next(n for n in (3, 2, 1) if n == 1 or ".".join(parts[:n]) in names)
        head = ".".join(parts[:n])
        out.append(names.get(head, head))
        parts = parts[n:]
    return ".".join(out)


def flip_decoder_levels(key: str, levels: int) -> str:
    """LDM numbers the decoder's levels from the image end (decoder.up.0 is the last), diffusers from z (decoder.
    up_blocks.0 is the first): the same flip takes either to the other."""
    parts = key.split(".")
    if parts[0] == "decoder" and parts[1] in ("up", "up_blocks"):
        parts[2] = str(levels - 1 - int(parts[2]))
    return ".".join(parts)


def vae_from_ldm(weights: dict[str, torch.Tensor]) -> tuple[VAEConfig, dict[str, torch.Tensor]]:
    """The config and the diffusers-named state dict for VAE weights in the original single-file (LDM) layout.

    `weights` has its `first_stage_model.` prefix already removed. Keys outside the autoencoder, such as the training
    loss's `loss.*`, are dropped. The config comes from the weight shapes. LDM always uses 32 GroupNorm groups and
    keeps the scaling factor in its yaml, so those two keep their SD defaults.
    """
    def count(pattern: str) -> int:
        return sum(re.fullmatch(pattern, key) is not None for key in weights)

    levels = count(r"encoder\.down\.\d+\.block\.0\.conv1\.weight")
    config = VAEConfig(
        in_channels=weights["encoder.conv_in.weight"].shape[1],
        out_channels=weights["decoder.conv_out.weight"].shape[0],
        latent_channels=weights["post_quant_conv.weight"].shape[0],
        block_out_channels=tuple(weights[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)),
        layers_per_block=count(r"encoder\.down\.0\.block\.\d+\.conv1\.weight"),
    )
    state_dict = {}
    for key, value in weights.items():
        if key.split(".")[0] not in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
            continue
        name = rename(flip_decoder_levels(key, levels), VAE_NAMES)
        if ".attentions." in name and value.ndim == 4:  # LDM's q, k, v and proj_out are 1x1 convolutions
            value = value[:, :, 0, 0]
        state_dict[name] = value
    return config, state_dict


def vae_to_ldm(config: VAEConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sdlite's VAE weights in the original names, the attention's linear layers as 1x1 convolutions again."""
    state_dict = {}
    for key, value in weights.items():
        name = rename(flip_decoder_levels(key, len(config.block_out_channels)), VAE_LDM_NAMES)
        if ".attn_1." in name and value.ndim == 2:
            value = value[:, :, None, None]
        state_dict[name] = value
    return state_dict


# ---- text encoder: cond_stage_model.* ----

def config_from_shapes(weights: dict[str, torch.Tensor], hidden_act: str) -> CLIPTextConfig:
    """The config of a state dict in sdlite's names; heads are 64 wide in both CLIP text towers SD uses."""
    vocab_size, hidden_size = weights["text_model.embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[3]) for k in weights if k.startswith("text_model.encoder.layers."))
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        hidden_act=hidden_act,
        vocab_size=vocab_size,
        max_position_embeddings=weights["text_model.embeddings.position_embedding.weight"].shape[0])


def clip_from_openai(weights: dict[str, torch.Tensor]) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """SD 1.x single file, `cond_stage_model.` removed: `transformer.text_model.*`. The original code wrapped
    transformers' CLIPTextModel, so past `transformer.` the keys are already sdlite's (but for position_ids)."""
    weights = with_text_model_prefix({k.removeprefix("transformer."): v for k, v in weights.items()})
    return config_from_shapes(weights, "quick_gelu"), weights


def clip_to_openai(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"transformer." + k: v for k, v in weights.items()}


OPENCLIP_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
OPENCLIP_TOP = {"model.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                "model.positional_embedding": "text_model.embeddings.position_embedding.weight",
                "model.ln_final.weight": "text_model.final_layer_norm.weight",
                "model.ln_final.bias": "text_model.final_layer_norm.bias"}
BLOCKS = "model.transformer.resblocks."


def clip_from_openclip(weights: dict[str, torch.Tensor]) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """SD 2.x single file, `cond_stage_model.` removed: OpenCLIP's names under `model.`. SD 2.x uses the output of
    the penultimate block, so the last resblock is dropped; ln_final is still applied after it. text_projection and
    logit_scale (CLIP's contrastive head) are unused. The fused attention input projection holds q, k and v stacked
    along its output dimension."""
    last = max(int(k[len(BLOCKS):].split(".")[0]) for k in weights if k.startswith(BLOCKS))
    out = {ours: weights[theirs] for theirs, ours in OPENCLIP_TOP.items()}
    for key, value in weights.items():
        if not key.startswith(BLOCKS):
            continue
        n, name = key[len(BLOCKS):].split(".", 1)  # "3", "attn.in_proj_weight"
        if int(n) == last:
            continue
        layer = f"text_model.encoder.layers.{n}."
        if name.startswith("attn.in_proj_"):
            kind = name.removeprefix("attn.in_proj_")  # weight or bias
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[f"{layer}self_attn.{proj}.{kind}"] = part
        else:
            module, kind = name.rsplit(".", 1)
            out[layer + OPENCLIP_NAMES[module] + "." + kind] = value
    return config_from_shapes(out, "gelu"), out


def clip_to_openclip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sdlite's text encoder in OpenCLIP's names, q, k and v fused again, and one resblock more: the last, which
    SD 2.x skips (clip_from_openclip drops it). sdlite does not keep that block, so it is written as the identity
    (LayerNorms of weight 1, every other tensor 0: x + 0 + 0), which any code that runs it leaves the output of."""
    out = {theirs: weights[ours] for theirs, ours in OPENCLIP_TOP.items()}
    layers = 1 + max(int(k.split(".")[3]) for k in weights if k.startswith("text_model.encoder.layers."))
    for n in range(layers):
        layer = f"text_model.encoder.layers.{n}."
        for kind in ("weight", "bias"):
            out[f"{BLOCKS}{n}.attn.in_proj_{kind}"] = torch.cat(
                [weights[f"{layer}self_attn.{proj}.{kind}"] for proj in ("q_proj", "k_proj", "v_proj")])
            for theirs, ours in OPENCLIP_NAMES.items():
                out[f"{BLOCKS}{n}.{theirs}.{kind}"] = weights[f"{layer}{ours}.{kind}"]
    last = f"{BLOCKS}{layers - 1}."
    for key in [k for k in out if k.startswith(last)]:
        value = out[key]
        out[key.replace(last, f"{BLOCKS}{layers}.")] = (torch.ones_like(value) if re.search(r"ln_\d\.weight$", key)
                                                       else torch.zeros_like(value))
    return out
