"""The pixel-space denoising UNet of DDPM: eps = unet(x_t, t), no text (Ho et al. 2020, appendix B).

The network of Ho et al. as diffusers ships it (UNet2DModel, the DDPMPipeline / DDIMPipeline layout of
google/ddpm-cifar10-32, ddpm-cat-256, ddpm-celebahq-256 and the models trained with diffusers' tutorial): the
encoder-decoder of unet.py (read that first) with self-attention where unet.py has text transformers, and a resnet
whose time embedding may scale and shift the normalised features (Nichol & Dhariwal 2021, "Improved Denoising
Diffusion Probabilistic Models", whose learned-variance models output 2x the channels: see samplers/ddpm.py).

    x (B, in, H, W) -> conv_in -> down_blocks -> mid_block -> up_blocks -> norm, silu, conv_out -> (B, out, H, W)

Attribute names are diffusers' state-dict keys; `renamed_old_attention_keys` maps the attention names of the first
published checkpoints (query, key, value, proj_attn), as diffusers does on loading.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import ACTIVATIONS, ConfigFile, show
from .errors import UserError
from .unet import TimestepEmbedding, UNetDownsample, UNetUpsample, timestep_embedding

# Keys whose other values sdlite has no code for (the reference's defaults, and dropout, which acts in training only).
UNET2D_REFUSED = {
    "time_embedding_type": ("positional",), "downsample_type": ("conv",), "upsample_type": ("conv",),
    "class_embed_type": (None,), "num_class_embeds": (None,), "num_train_timesteps": (None,), "dropout": (0, 0.0),
}
UNET2D_IMPLEMENTED = {
    "sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_dim", "freq_shift",
    "flip_sin_to_cos", "down_block_types", "mid_block_type", "up_block_types", "block_out_channels",
    "layers_per_block", "mid_block_scale_factor", "downsample_padding", "act_fn", "attention_head_dim",
    "norm_num_groups", "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift", "add_attention",
}
DOWN_TYPES = {"DownBlock2D": False, "AttnDownBlock2D": True}   # block type -> has self-attention
UP_TYPES = {"UpBlock2D": False, "AttnUpBlock2D": True}
MID_TYPES = ("UNetMidBlock2D", None)
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class UNet2DConfig:
    """Defaults are diffusers' UNet2DModel's. Per-level tuples run shallowest level first."""
    sample_size: tuple[int, int] = (32, 32)    # the image (height, width) it was trained at: the default size
    in_channels: int = 3
    out_channels: int = 3                      # 2 * in_channels for the learned-variance models
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2                  # resnets per encoder level (the decoder has one more)
    attention_levels: tuple[bool, ...] = (False, True, True, True)      # encoder levels with self-attention
    up_attention_levels: tuple[bool, ...] = (False, True, True, True)   # decoder levels with self-attention
    mid_block: bool = True                     # False: the deepest encoder level feeds the decoder directly
    mid_attention: bool = True                 # the mid block's attention (add_attention)
    attention_head_dim: int | None = 8         # channels per head; None: one head over all channels
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None    # the mid attention's GroupNorm; None: as the resnets' (see MidBlock)
    norm_eps: float = 1e-5
    act_fn: str = "silu"                       # of the resnets (the time MLP and the output use silu)
    resnet_time_scale_shift: str = "default"   # "default": h + emb; "scale_shift": norm(h) (1 + scale) + shift
    time_embedding_dim: int | None = None      # None: 4 * block_out_channels[0]
    flip_sin_to_cos: bool = True               # timestep embedding: cosines first
    freq_shift: float = 0.0                    # timestep embedding: 10000^(-i / (dim/2 - freq_shift))
    downsample_padding: int = 1                # 0: asymmetric padding (right and bottom), as the google models
    mid_block_scale_factor: float = 1.0        # the mid block's resnets and attention divide their output by it
    center_input_sample: bool = False          # x -> 2x - 1 first

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_json(cls, cfg: dict, where="unet/config.json") -> "UNet2DConfig":
        """From a diffusers UNet2DModel unet/config.json; a key sdlite cannot honour is a UserError naming it."""
        c = ConfigFile(cfg, where, UNET2D_IMPLEMENTED, UNET2D_REFUSED)
        channels = c.list_of("block_out_channels", [224, 448, 672, 896], int)
        levels = len(channels)
        down = c.list_of("down_block_types", ["DownBlock2D"] + ["AttnDownBlock2D"] * 3, str, levels)
        up = c.list_of("up_block_types", ["AttnUpBlock2D"] * 3 + ["UpBlock2D"], str, levels)
        for key, types, kinds in (("down_block_types", down, DOWN_TYPES), ("up_block_types", up, UP_TYPES)):
            if unknown := [t for t in types if t not in kinds]:
                raise UserError(f"{where}: {key} has {unknown[0]}, which sdlite does not implement "
                                f"(only {' and '.join(kinds)})")
        mid = c.values.get("mid_block_type", MID_TYPES[0])
        if mid not in MID_TYPES:
            raise UserError(f"{where}: mid_block_type = {show(mid)} is not supported by sdlite "
                            f"(only {MID_TYPES[0]} or null)")
        if isinstance(c.values.get("sample_size"), list):   # [height, width]
            size = c.list_of("sample_size", None, int, 2)
        else:
            size = (c.get("sample_size", 32, int),) * 2
        config = cls(
            sample_size=size,
            in_channels=c.get("in_channels", 3, int),
            out_channels=c.get("out_channels", 3, int),
            block_out_channels=channels,
            layers_per_block=c.get("layers_per_block", 2, int),
            attention_levels=tuple(DOWN_TYPES[t] for t in down),
            up_attention_levels=tuple(UP_TYPES[t] for t in reversed(up)),   # up_block_types run deepest first
            mid_block=mid is not None,
            mid_attention=c.get("add_attention", True, bool),
            attention_head_dim=c.optional("attention_head_dim", int) if "attention_head_dim" in cfg else 8,
            norm_num_groups=c.get("norm_num_groups", 32, int),
            attn_norm_num_groups=c.optional("attn_norm_num_groups", int),
            norm_eps=c.get("norm_eps", 1e-5, float),
            act_fn=c.choice("act_fn", "silu", ACTIVATIONS),
            resnet_time_scale_shift=c.choice("resnet_time_scale_shift", "default", ("default", "scale_shift")),
            time_embedding_dim=c.optional("time_embedding_dim", int),
            flip_sin_to_cos=c.get("flip_sin_to_cos", True, bool),
            freq_shift=c.get("freq_shift", 0.0, float),
            downsample_padding=c.get("downsample_padding", 1, int),
            mid_block_scale_factor=c.get("mid_block_scale_factor", 1.0, float),
            center_input_sample=c.get("center_input_sample", False, bool),
        )
        config.check(where)
        return config

    def to_json(self) -> dict:
        """The diffusers UNet2DModel unet/config.json keys that from_json reads back to this config."""
        height, width = self.sample_size
        return {
            "sample_size": height if height == width else [height, width],
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels],
            "mid_block_type": "UNetMidBlock2D" if self.mid_block else None,
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.up_attention_levels)],
            "add_attention": self.mid_attention, "attention_head_dim": self.attention_head_dim,
            "norm_num_groups": self.norm_num_groups, "attn_norm_num_groups": self.attn_norm_num_groups,
            "norm_eps": self.norm_eps, "act_fn": self.act_fn, "resnet_time_scale_shift": self.resnet_time_scale_shift,
            "time_embedding_type": "positional", "time_embedding_dim": self.time_embedding_dim,
            "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
            "downsample_padding": self.downsample_padding, "mid_block_scale_factor": self.mid_block_scale_factor,
            "center_input_sample": self.center_input_sample,
        }

    def check(self, where) -> None:
        """Positive sizes, an image size the levels can halve; GroupNorm groups and heads that divide the widths."""
        sizes = [self.in_channels, self.out_channels, self.layers_per_block, self.norm_num_groups,
                 *self.block_out_channels, *self.sample_size, self.attention_head_dim or 1, self.time_embed_dim]
        if min(sizes) < 1 or self.norm_eps <= 0 or self.downsample_padding < 0:
            raise UserError(f"{where}: sizes must be positive, norm_eps > 0 and downsample_padding >= 0")
        last = len(self.block_out_channels) - 1
        if any(side % 2 ** last for side in self.sample_size):   # each level but the last halves the image
            raise UserError(f"{where}: sample_size {show(list(self.sample_size))} must be a multiple of {2 ** last} "
                            f"(2 to the number of block_out_channels less one)")
        for level, width in enumerate(self.block_out_channels):
            attends = (self.attention_levels[level] or self.up_attention_levels[level]
                       or (level == last and self.mid_block and self.mid_attention))
            if width % self.norm_num_groups or (attends and width % (self.attention_head_dim or width)):
                raise UserError(f"{where}: block_out_channels {show(list(self.block_out_channels))} must be "
                                f"multiples of norm_num_groups ({self.norm_num_groups}) and, at the levels with "
                                f"attention, of attention_head_dim ({show(self.attention_head_dim)})")


def renamed_old_attention_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`mid_block.attentions.0.query.weight` -> `mid_block.attentions.0.to_q.weight`: the attention names of the
    checkpoints saved before diffusers 0.15 (query, key, value, proj_attn), as diffusers renames them on loading.
    Only UNet2DModel's attentions have leaves of these names; other keys pass unchanged."""
    renamed = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in OLD_ATTENTION_NAMES:
            parts[-2] = OLD_ATTENTION_NAMES[parts[-2]]
        renamed[".".join(parts)] = value
    return renamed


class Resnet(nn.Module):
    """DDPM's resnet block: norm, act, conv; the time embedding added ("default") or, after the second norm, as a
    scale and a shift of the normalised features ("scale_shift": Nichol & Dhariwal 2021, sec. 3 and their code's
    "use_scale_shift_norm"); act, conv; the residual (1x1 conv where the width changes), divided by output_scale."""

    def __init__(self, cfg: UNet2DConfig, in_channels: int, out_channels: int, output_scale: float = 1.0):
        super().__init__()
        self.act, self.output_scale = ACTIVATIONS[cfg.act_fn], output_scale
        self.scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, in_channels, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, out_channels * (2 if self.scale_shift else 1))
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, out_channels, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        t = self.time_emb_proj(self.act(emb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.act(h))
        return (self.conv_shortcut(x) + h) / self.output_scale


class SelfAttention(nn.Module):
    """Multi-head self-attention over the h*w positions of a feature map, added to its input (Ho et al.'s attention
    block, after PixelCNN++ / the Transformer), the sum divided by output_scale. `groups` None: no GroupNorm first."""

    def __init__(self, channels: int, head_dim: int | None, groups: int | None, eps: float, output_scale: float):
        super().__init__()
        self.heads, self.output_scale = channels // (head_dim or channels), output_scale
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])   # a list only for the key name to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x if self.group_norm is None else self.group_norm(x)
        tokens = tokens.flatten(2).transpose(1, 2)   # (B, h*w, C)
        out = attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), self.heads)
        return (self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w) + x) / self.output_scale


class DownBlock(nn.Module):
    """One encoder level (DownBlock2D, or AttnDownBlock2D with self-attention after each resnet), then a stride-2
    conv except at the deepest level. Every output is kept as a skip."""

    def __init__(self, cfg: UNet2DConfig, level: int, in_channels: int):
        super().__init__()
        out = cfg.block_out_channels[level]
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(Resnet(cfg, in_channels if i == 0 else out, out) for i in range(n))
        self.attentions = nn.ModuleList(
            SelfAttention(out, cfg.attention_head_dim, cfg.norm_num_groups, cfg.norm_eps, 1.0)
            for _ in range(n if cfg.attention_levels[level] else 0))
        deepest = level == len(cfg.block_out_channels) - 1
        self.downsamplers = nn.ModuleList([] if deepest else [UNetDownsample(out, cfg.downsample_padding)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[i](x)
            skips.append(x)
        for downsample in self.downsamplers:
            x = downsample(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level (UpBlock2D or AttnUpBlock2D): layers_per_block + 1 resnets, each on its input concatenated
    with a skip (then self-attention), then a 2x upsampling except at the top level."""

    def __init__(self, cfg: UNet2DConfig, level: int, in_channels: int, skip_channels: list[int]):
        super().__init__()
        out = cfg.block_out_channels[level]
        n = len(skip_channels)
        self.resnets = nn.ModuleList(
            Resnet(cfg, (in_channels if i == 0 else out) + skip_channels[i], out) for i in range(n))
        self.attentions = nn.ModuleList(
            SelfAttention(out, cfg.attention_head_dim, cfg.norm_num_groups, cfg.norm_eps, 1.0)
            for _ in range(n if cfg.up_attention_levels[level] else 0))
        self.upsamplers = nn.ModuleList([] if level == 0 else [UNetUpsample(out)])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """Pops its skips off the end of `skips`."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
            if self.attentions:
                x = self.attentions[i](x)
        for upsample in self.upsamplers:
            x = upsample(x, (2 * x.shape[-2], 2 * x.shape[-1]))
        return x


class MidBlock(nn.Module):
    """resnet, self-attention (unless add_attention is false), resnet at the deepest level. The attention has no
    GroupNorm with scale_shift resnets unless attn_norm_num_groups gives one (as the reference has it)."""

    def __init__(self, cfg: UNet2DConfig):
        super().__init__()
        channels, scale = cfg.block_out_channels[-1], cfg.mid_block_scale_factor
        groups = cfg.attn_norm_num_groups or (cfg.norm_num_groups if cfg.resnet_time_scale_shift == "default" else None)
        self.resnets = nn.ModuleList(Resnet(cfg, channels, channels, scale) for _ in range(2))
        self.attentions = nn.ModuleList(
            [SelfAttention(channels, cfg.attention_head_dim, groups, cfg.norm_eps, scale)] if cfg.mid_attention else [])

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, emb)
        for attention_block in self.attentions:
            x = attention_block(x)
        return self.resnets[1](x, emb)


class UNet2D(nn.Module):
    def __init__(self, config: UNet2DConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim, "silu")
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)

        self.down_blocks = nn.ModuleList()
        skip_channels = [channels[0]]   # of every skip the encoder leaves, in order: conv_in's, then each block's
        for level, out in enumerate(channels):
            block = DownBlock(config, level, channels[max(level - 1, 0)])
            self.down_blocks.append(block)
            skip_channels += [out] * (len(block.resnets) + len(block.downsamplers))

        self.mid_block = MidBlock(config) if config.mid_block else None

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(channels))):
            n = config.layers_per_block + 1   # skips this decoder level takes
            skip_channels, taken = skip_channels[:-n], skip_channels[-n:][::-1]   # the decoder takes them last first
            in_channels = channels[min(level + 1, len(channels) - 1)]            # the deeper level's, or the mid's
            self.up_blocks.append(UpBlock(config, level, in_channels, taken))

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: float | int | torch.Tensor) -> torch.Tensor:
        """x (B, in, H, W), H and W multiples of 2^(levels - 1); t a number or a 0-d or (B,) tensor
        -> (B, out, H, W)."""
        c = self.config
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(x.dtype)
        emb = self.time_embedding(t_emb)                    # (B, time_embed_dim)

        if c.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb)
            skips += block_skips
        if self.mid_block is not None:
            x = self.mid_block(x, emb)
        for block in self.up_blocks:
            x = block(x, skips, emb)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
