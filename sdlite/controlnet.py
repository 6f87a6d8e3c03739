"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a trainable copy of
the UNet's encoder half and middle block that reads a control image (edges, depth, pose, ...) besides the latents,
and whose outputs are added to the frozen UNet's skips and mid-block output.

    hint (B, 3, H, W) -> controlnet_cond_embedding (4 conv levels, 3 of stride 2) -> (B, C0, H/8, W/8)
    x (B, 4, h, w) -> conv_in -> + hint embedding -> down_blocks[0..L-1] -> mid_block
                                                      | every skip             |
                                      controlnet_down_blocks (1x1 "zero convs")  controlnet_mid_block (1x1)
                                                      v                        v
                                              down residuals (one per UNet skip)   mid residual, each * scale

The zero convolutions start at zero in training (sec. 3.1: the copy then adds nothing), so that training starts from
the unchanged UNet. The encoder half is the UNet's own code (unet.py's UNetDownBlock, UNetMidBlock, TimestepEmbedding).
Attribute names are diffusers' ControlNetModel state-dict keys, so a diffusers folder loads as it is;
`controlnet_from_ldm` renames the keys of the single files people download (`control_model.*`).

The pipeline side (as diffusers' StableDiffusionControlNet*Pipeline): `prepare_control_image` once per call,
`control_residuals` at every step, whose result goes to UNet.forward's down_residuals / mid_residual.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import ConfigFile, show
from .errors import UserError
from .image import legacy_model_hash, open_rgb
from .formats.ldm import encoder_fields, ldm_to_diffusers_key
from .unet import TimestepEmbedding, UNetConfig, UNetDownBlock, UNetMidBlock, timestep_embedding

# config.json keys sdlite has no code for, accepted at the reference's defaults only (see config.py).
CONTROLNET_REFUSED = {
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,), "addition_embed_type_num_heads": (64,),
    "resnet_time_scale_shift": ("default",), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
}
# The keys of the encoder half, which mean what they mean in a UNet's config.json (UNetConfig.from_json reads them).
ENCODER_KEYS = {
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "use_linear_projection",
    "upcast_attention",
}
CONTROLNET_IMPLEMENTED = ENCODER_KEYS | {
    "num_attention_heads", "conditioning_channels", "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels", "global_pool_conditions",
}
# text-context widths of the families whose ControlNets sdlite cannot run (SD 1.x: 768, SD 2.x: 1024)
OTHER_FAMILIES = {2048: "SDXL", 1280: "the SDXL refiner"}


@dataclass
class ControlNetConfig:
    """The encoder half as a UNetConfig (its decoder fields unused), and the ControlNet's own settings."""
    encoder: UNetConfig = field(default_factory=UNetConfig)
    conditioning_channels: int = 3                       # of the control image
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)   # widths of the hint encoder's levels (diffusers' key:
                                                         # conditioning_embedding_out_channels)
    bgr: bool = False                                    # the control image is read with its channels reversed
    global_pool_conditions: bool = False                 # residuals averaged over the image (shuffle ControlNets)

    @classmethod
    def from_json(cls, cfg: dict, where="config.json") -> "ControlNetConfig":
        """From a diffusers ControlNetModel config.json; a key sdlite cannot honour is a UserError naming it."""
        if isinstance(cfg, dict):
            extra = cfg.get("addition_embed_type")
            refuse_other_family(where, cfg.get("cross_attention_dim"),
                                None if extra is None else f"addition_embed_type {show(extra)}")
        c = ConfigFile(cfg, where, CONTROLNET_IMPLEMENTED, CONTROLNET_REFUSED)
        # The encoder half is read as a UNet config.json of the same keys would be, with the decoder mirroring it.
        # Two keys take one value only, as in the reference; num_attention_heads (when given) is the number of
        # heads, and so is attention_head_dim (diffusers' quirk, see unet.py).
        c.get("layers_per_block", 2, int)
        c.get("cross_attention_dim", 1280, int)
        down = c.list_of("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], str)
        unet_json = {key: value for key, value in cfg.items() if key in ENCODER_KEYS}
        unet_json["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
        if cfg.get("num_attention_heads") is not None:
            unet_json["attention_head_dim"] = cfg["num_attention_heads"]
        encoder = UNetConfig.from_json(unet_json, where)
        config = cls(
            encoder=encoder,
            conditioning_channels=c.get("conditioning_channels", 3, int),
            hint_channels=c.list_of("conditioning_embedding_out_channels", [16, 32, 96, 256], int),
            bgr=c.choice("controlnet_conditioning_channel_order", "rgb", ("rgb", "bgr")) == "bgr",
            global_pool_conditions=c.get("global_pool_conditions", False, bool),
        )
        if min(config.hint_channels) < 1 or config.conditioning_channels < 1:
            raise UserError(f"{where}: conditioning_channels and conditioning_embedding_out_channels must be positive")
        return config


def refuse_other_family(where, context_width, extra_embedding: str | None) -> None:
    """A ControlNet for SDXL (a text context 2048 wide, an added embedding of pooled text and image sizes, named by
    `extra_embedding` where there is one) or another family is refused by name."""
    width_of_another = isinstance(context_width, int) and context_width in OTHER_FAMILIES
    family = OTHER_FAMILIES[context_width] if width_of_another else "SDXL" if extra_embedding is not None else None
    if family:
        why = f"cross_attention_dim {context_width}" if width_of_another else extra_embedding
        raise UserError(f"{where}: a ControlNet for {family} ({why}): sdlite runs SD 1.x and 2.x ControlNets only")


class HintEncoder(nn.Module):
    """The control image (B, 3, H, W) -> (B, C0, H/8, W/8), the latents' size (sec. 3.2: "a tiny network E of four
    convolution layers"): a 3x3 conv, then per level a 3x3 conv and a stride-2 3x3 conv to the next width, SiLU after
    each, and a last 3x3 conv (zero at initialisation) to the UNet's first width."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width, next_width in zip(channels, channels[1:]):
            self.blocks.append(nn.Conv2d(width, width, 3, padding=1))
            self.blocks.append(nn.Conv2d(width, next_width, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = nn.functional.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        self.name = "ControlNet"             # the file's or folder's name, and the weights file (load_controlnet
        self.model_file: Path | None = None  # sets them): the PNG parameters name the ControlNet by them
        enc = config.encoder
        channels = enc.block_out_channels
        self.time_embedding = TimestepEmbedding(channels[0], enc.time_embed_dim, enc.act_fn)
        self.conv_in = nn.Conv2d(enc.in_channels, channels[0], 3, padding=1)
        self.controlnet_cond_embedding = HintEncoder(config.conditioning_channels, config.hint_channels, channels[0])
        self.down_blocks = nn.ModuleList(
            UNetDownBlock(enc, level, channels[max(level - 1, 0)]) for level in range(len(channels)))
        skip_channels = [channels[0]]   # of every skip the encoder leaves, as in the UNet
        for out, block in zip(channels, self.down_blocks):
            skip_channels += [out] * (len(block.resnets) + len(block.downsamplers))
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in skip_channels)
        self.mid_block = UNetMidBlock(enc)
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], 1)

    def forward(self, x: torch.Tensor, t: float | int | torch.Tensor, context: torch.Tensor, hint: torch.Tensor,
                scale: float = 1.0, guess_mode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, 4, h, w), t, context (B, 77, D) as the UNet takes them, hint (B, 3, 8h, 8w) the control image in
        [0, 1] -> (residuals for each of the UNet's skips, residual for its mid-block output), each times `scale`.
        In guess mode the residuals are scaled from 0.1 (the first skip) up to 1 (the mid block), log-spaced, as
        the reference does (the ControlNet authors' "soft" control for prompts that say little)."""
        c = self.config.encoder
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(x.dtype)
        emb = self.time_embedding(t_emb)
        if self.config.bgr:
            hint = hint.flip(1)

        x = self.conv_in(x) + self.controlnet_cond_embedding(hint)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips
        x = self.mid_block(x, emb, context)

        down = [zero_conv(skip) for zero_conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * scale
        else:
            scales = [scale] * (len(down) + 1)
        down = [residual * s for residual, s in zip(down, scales)]
        mid = mid * scales[-1]
        if self.config.global_pool_conditions:
            down = [residual.mean(dim=(2, 3), keepdim=True) for residual in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid

    def check_fits(self, unet_config: UNetConfig, name: str = "the ControlNet") -> None:
        """Refuse a ControlNet whose residuals do not fit the UNet's skips, or that reads another text encoder."""
        mine = self.config.encoder
        width, unet_width = mine.cross_attention_dim[0], unet_config.cross_attention_dim[0]
        if width != unet_width:
            families = {768: " (SD 1.x)", 1024: " (SD 2.x)"}
            raise UserError(f"{name} is for a text context {width} wide{families.get(width, '')}, the model's is "
                            f"{unet_width}{families.get(unet_width, '')}: use a ControlNet made for this model")
        if (mine.block_out_channels, mine.layers_per_block) != (unet_config.block_out_channels,
                                                                 unet_config.layers_per_block):
            raise UserError(f"{name}'s levels ({list(mine.block_out_channels)}, {mine.layers_per_block[0]} per "
                            f"level) do not match the model's UNet ({list(unet_config.block_out_channels)}): use a "
                            "ControlNet made for this model")


# ---- the single files people download (lllyasviel's ControlNet repository: "control_model.*") ----

def controlnet_key(key: str, layers_per_block: int, last_hint_conv: int) -> str:
    """The diffusers name of a single-file key (without `control_model.`): `zero_convs.3.0.weight` ->
    `controlnet_down_blocks.3.weight`, `middle_block_out.0.bias` -> `controlnet_mid_block.bias`, the hint encoder's
    Sequential `input_hint_block.{0, 2, ..., last}` (SiLUs between) -> `conv_in`, `blocks.{0, 1, ...}`, `conv_out`;
    the encoder half's keys are the UNet's (ldm_to_diffusers_key)."""
    path, param = key.rsplit(".", 1)
    part, index, *_ = path.split(".") + [""]
    if part == "zero_convs":
        return f"controlnet_down_blocks.{index}.{param}"
    if part == "middle_block_out":
        return f"controlnet_mid_block.{param}"
    if part == "input_hint_block":
        i = int(index)
        layer = "conv_in" if i == 0 else "conv_out" if i == last_hint_conv else f"blocks.{i // 2 - 1}"
        return f"controlnet_cond_embedding.{layer}.{param}"
    return ldm_to_diffusers_key(key, layers_per_block)


def single_file_part(sd: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """The ControlNet's weights of a single file, without `control_model.` (some files are distributed without
    it); a file that holds no ControlNet, or one for another family (SDXL's have an added embedding, label_emb),
    is refused."""
    sd = {k[len("control_model."):]: v for k, v in sd.items() if k.startswith("control_model.")} or sd
    if "zero_convs.0.0.weight" not in sd:
        raise UserError(f"{where}: not a ControlNet (no control_model.zero_convs.* weights)")
    widths = [v.shape[-1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    sdxl = "label_emb.* weights" if "label_emb.0.0.weight" in sd else None
    refuse_other_family(where, max(widths, default=None), sdxl)
    return sd


def controlnet_from_ldm(sd: dict[str, torch.Tensor]) -> tuple[ControlNetConfig, dict[str, torch.Tensor]]:
    """Config and diffusers-named weights of a single-file ControlNet (keys without `control_model.`), the
    architecture read off the tensor shapes as unet_from_ldm does."""
    hint_convs = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
    hint = [sd[f"input_hint_block.{i}.weight"] for i in hint_convs]
    encoder = encoder_fields(sd)
    config = ControlNetConfig(
        encoder=UNetConfig(**encoder),
        conditioning_channels=hint[0].shape[1],
        # conv_in's width, then that of each level's stride-2 conv (the odd ones of the blocks between)
        hint_channels=(hint[0].shape[0], *(w.shape[0] for w in hint[2:-1:2])),
    )
    return config, {controlnet_key(k, encoder["layers_per_block"], hint_convs[-1]): v for k, v in sd.items()}


def load_controlnet(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> ControlNet:
    """A ControlNet from a diffusers ControlNetModel folder (config.json and diffusion_pytorch_model.safetensors, or
    its .fp16 variant) or a single file (control_model.* keys; .safetensors, or a pickle read weights-only)."""
    # imported here: checkpoint.py imports the pipeline, which imports this module
    from .checkpoint import build, check_device, convert, read_state_dict
    from .formats.diffusers import read_config, read_json, weights_file
    check_device(device)
    path = Path(path)
    if path.is_dir():
        config = read_config(ControlNetConfig, read_json(path / "config.json"), path / "config.json")
        model_file = weights_file(path, "diffusion_pytorch_model")
        weights = read_state_dict(model_file, dtype)
    elif path.is_file():
        model_file = path
        sd = single_file_part(read_state_dict(path, dtype), path)
        config, weights = convert(controlnet_from_ldm, sd, path, "control_model.*")
    else:
        raise UserError(f"ControlNet not found: {path} does not exist (give a diffusers ControlNet folder or a "
                        ".safetensors file)")
    net = build(ControlNet, config, weights, path).to(device=device, dtype=dtype)
    net.name, net.model_file = path.stem if path.is_file() else path.name, model_file
    return net


# ---- the pipeline's side ----

@dataclass
class Control:
    """One ControlNet and its control image for a generation: its residuals are multiplied by `scale` and added in
    the steps from fraction `start` to fraction `end` of the loop (diffusers' control_guidance_start / _end)."""
    controlnet: ControlNet
    image: Image.Image | str | Path
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise UserError(f"control scale must be a finite number, not {self.scale!r}")
        if not 0 <= self.start < self.end <= 1:
            raise UserError(f"control start {self.start} and end {self.end}: need 0 <= start < end <= 1")


def prepare_control_image(image: Image.Image | str | Path, width: int, height: int, batch_size: int, guided: bool,
                          guess_mode: bool) -> torch.Tensor:
    """The control image as diffusers' ControlNet pipelines make it (prepare_image): resized to width x height with
    Lanczos, RGB in [0, 1] (not [-1, 1]: the hint encoder was trained on that), one copy per image of the batch,
    and twice that when guided, the ControlNet then running on the doubled batch (in guess mode it runs on the
    conditional half only). -> (B or 2B, 3, height, width) float32.
    The image is converted to RGB before it is resized (sdlite's reading, open_rgb); the reference converts after,
    which differs for palette images (Pillow resizes those nearest-neighbour) and transparent ones."""
    image = open_rgb(image, "control image")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)    # (3, H, W) in [0, 1]
    copies = batch_size * (2 if guided and not guess_mode else 1)
    return pixels[None].repeat(copies, 1, 1, 1)


def control_parameters(controls: list[Control], guess_mode: bool) -> dict[str, str]:
    """The PNG parameters of the controls as A1111's ControlNet extension writes them (its infotext.py): per unit
    "ControlNet i" -> "Module: none, Model: NAME [HASH], Weight: ..., Guidance Start: ..., Guidance End: ...", the
    hash A1111's short one of the weights file (legacy_model_hash). The control image is used as given (module
    none), resized to the output ("Just Resize"); guess mode is the extension's "ControlNet is more important"."""
    mode = "ControlNet is more important" if guess_mode else "Balanced"
    return {f"ControlNet {i}": f"Module: none, Model: {c.controlnet.name} [{legacy_model_hash(c.controlnet.model_file)}]"
                               f", Weight: {c.scale}, Resize Mode: Just Resize, Low Vram: False, Guidance Start: "
                               f"{c.start}, Guidance End: {c.end}, Pixel Perfect: False, Control Mode: {mode}"
            for i, c in enumerate(controls)}


def keep(step: int, steps: int, start: float, end: float) -> float:
    """1.0 if a control acts at `step` (0-based) of `steps`, else 0.0: from the step at fraction `start` of the loop
    through the one ending at fraction `end`, as the reference decides it (controlnet_keep)."""
    return 1.0 - float(step / steps < start or (step + 1) / steps > end)


def control_residuals(controls: list[Control], hints: list[torch.Tensor], x: torch.Tensor,
                      t: float | int | torch.Tensor, context: torch.Tensor, step: int, steps: int, guided: bool,
                      guess_mode: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The residuals to add to the UNet at `step`: every control's, summed (diffusers' MultiControlNetModel), each
    scaled by its scale times keep(). x and context are the UNet's inputs (the scaled latents without extra
    channels, doubled when guided: unconditional half first), hints from prepare_control_image. In guess mode with
    guidance the ControlNets see the conditional half only, and the unconditional half gets zeros."""
    conditional_only = guess_mode and guided
    if conditional_only:
        x, context = x.chunk(2)[1], context.chunk(2)[1]
    down, mid = None, None
    for control, hint in zip(controls, hints, strict=True):
        scale = control.scale * keep(step, steps, control.start, control.end)
        d, m = control.controlnet(x, t, context, hint.to(x.dtype), scale, guess_mode)
        down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
    if conditional_only:
        down = [torch.cat([torch.zeros_like(r), r]) for r in down]
        mid = torch.cat([torch.zeros_like(mid), mid])
    return down, mid
