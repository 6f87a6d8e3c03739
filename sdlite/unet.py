"""The denoising UNet of Stable Diffusion 1.x and 2.x: eps (or v) = unet(x_t, t, text context).

Latent diffusion (Rombach et al. 2022, sec. 3.3) on the UNet of DDPM (Ho et al. 2020): an encoder of resnet blocks
that halves the resolution at each level, a middle block, and a decoder that doubles it back, each decoder block
reading the encoder activation of its resolution (a "skip"). At the levels with attention every resnet is followed
by a spatial transformer whose cross-attention reads the text encoder's output.

    x (B, in, h, w) -> conv_in -> down_blocks[0..L-1] -> mid_block -> up_blocks[0..L-1] -> norm, silu, conv_out
                                   |  each leaves skips    ^ each consumes skips, deepest first
                                   +-----------------------+

SD 1.5 (a 512x512 image: 64x64 latents; "attn": a spatial transformer after each resnet; "skips": the activations a
block leaves, each read by one resnet of the decoder, which concatenates it to its input, last in first out; an up
block's resnet reads the block's input or the previous resnet's output + a skip):

    block            resnets (in -> out channels)                 attn   resolution   skips left / taken
    conv_in          4 -> 320                                            64           320
    down_blocks.0    320 -> 320, 320 -> 320                       yes    64 -> 32     320, 320, 320 (downsampled)
    down_blocks.1    320 -> 640, 640 -> 640                       yes    32 -> 16     640, 640, 640
    down_blocks.2    640 -> 1280, 1280 -> 1280                    yes    16 -> 8      1280, 1280, 1280
    down_blocks.3    1280 -> 1280, 1280 -> 1280                   no     8            1280, 1280
    mid_block        1280 -> 1280, transformer, 1280 -> 1280             8
    up_blocks.0      1280+1280, 1280+1280, 1280+1280 -> 1280      no     8 -> 16      takes 1280, 1280, 1280
    up_blocks.1      1280+1280, 1280+1280, 1280+640 -> 1280       yes    16 -> 32     takes 1280, 1280, 640
    up_blocks.2      1280+640, 640+640, 640+320 -> 640            yes    32 -> 64     takes 640, 640, 320
    up_blocks.3      640+320, 320+320, 320+320 -> 320             yes    64           takes 320, 320, 320
    conv_out         320 -> 4 (after GroupNorm and SiLU)

SD 2.x has the same widths (heads of 64 channels, linear projections, a 1024-wide text context).

Attribute names are diffusers' state-dict keys (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`),
so a diffusers unet/ folder loads as it is; formats/ldm.py renames the original single-file keys.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import ACTIVATIONS, ConfigFile, show
from .errors import UserError


# The values of config.json keys that sdlite has no code for and that change nothing at these values (the reference's
# defaults; `dropout` acts in training only, which sdlite runs without it). Any other value is refused by name.
UNET_REFUSED = {
    "class_embed_type": (None,), "addition_embed_type": (None,), "num_class_embeds": (None,),
    "addition_time_embed_dim": (None,), "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,), "addition_embed_type_num_heads": (64,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "dual_cross_attention": (False,),
    "attention_type": ("default",), "cross_attention_norm": (None,), "reverse_transformer_layers_per_block": (None,),
    "dropout": (0, 0.0),
    # diffusers itself refuses it ("not possible to define the number of attention heads via num_attention_heads")
    "num_attention_heads": (None,),
}
# The keys UNetConfig.from_json reads. Two are honoured by having no effect in the reference's UNet2DConditionModel
# either: mid_block_only_cross_attention and resnet_out_scale_factor are read only by the SimpleCrossAttn blocks that
# sdlite refuses (the test fixture sets both and matches the reference). sample_size is the loader's (the default
# image size).
UNET_IMPLEMENTED = {
    "sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "mid_block_type", "layers_per_block", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
    "only_cross_attention", "mid_block_only_cross_attention", "norm_num_groups", "norm_eps", "act_fn",
    "downsample_padding", "mid_block_scale_factor", "resnet_out_scale_factor", "flip_sin_to_cos", "freq_shift",
    "conv_in_kernel", "conv_out_kernel", "center_input_sample", "use_linear_projection", "upcast_attention",
}
DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}   # block type -> has transformers
UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
MID_TYPES = ("UNetMidBlock2DCrossAttn", None)


def per_level(value, levels: int) -> tuple:
    """A value given once for all levels, or one per level, as a tuple of one per level."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * levels


@dataclass
class UNetConfig:
    """Defaults are Stable Diffusion 1.x's. The fields given per level (`levels` = len(block_out_channels), shallowest
    first) also take one value for every level."""
    in_channels: int = 4                       # 9 for inpainting: latents, mask, masked-image latents
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)   # channels of each level
    layers_per_block: tuple[int, ...] | int = 2  # resnets per encoder level (the decoder has one more)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # encoder levels with transformers
    up_attention_levels: tuple[bool, ...] | None = None   # decoder levels with transformers; None: as the encoder
    heads: tuple[int, ...] = (8, 8, 8, 8)      # attention heads per level; the mid block uses the last
    transformer_depth: tuple[int, ...] | int = 1   # transformer blocks per spatial transformer
    cross_attention_dim: tuple[int, ...] | int = 768   # width of the text context (SD 2.x: 1024)
    only_cross_attention: tuple[bool, ...] | bool = False   # the first attention reads the text too, not x
    use_linear_projection: bool = False        # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    upcast_attention: bool = False             # SD 2.x: attention in fp32
    mid_block: bool = True                     # False: the deepest encoder level feeds the decoder directly
    norm_num_groups: int = 32                  # of every GroupNorm
    norm_eps: float = 1e-5                     # of the resnets' and the output's GroupNorms
    act_fn: str = "silu"                       # of the resnets, the time embedding and the output
    downsample_padding: int = 1                # 0: LDM's asymmetric padding (right and bottom only)
    mid_block_scale_factor: float = 1.0        # the mid block's resnets divide their output by it
    flip_sin_to_cos: bool = True               # timestep embedding: cosines first
    freq_shift: float = 0.0                    # timestep embedding: frequencies 10000^(-i / (dim/2 - freq_shift))
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    center_input_sample: bool = False          # x -> 2x - 1 first

    def __post_init__(self):
        levels = len(self.block_out_channels)
        self.block_out_channels = tuple(self.block_out_channels)
        self.layers_per_block = per_level(self.layers_per_block, levels)
        self.attention_levels = tuple(self.attention_levels)
        self.up_attention_levels = tuple(self.up_attention_levels or self.attention_levels)
        self.heads = per_level(self.heads, levels)
        self.transformer_depth = per_level(self.transformer_depth, levels)
        self.cross_attention_dim = per_level(self.cross_attention_dim, levels)
        self.only_cross_attention = per_level(self.only_cross_attention, levels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_json(cls, cfg: dict, where="unet/config.json") -> "UNetConfig":
        """From a diffusers unet/config.json; a key sdlite cannot honour, or a value of the wrong type, is a
        UserError naming it."""
        c = ConfigFile(cfg, where, UNET_IMPLEMENTED, UNET_REFUSED)
        # absent keys take the reference's defaults (SD 1.x's layout)
        channels = c.list_of("block_out_channels", [320, 640, 1280, 1280], int)
        levels = len(channels)
        down = c.list_of("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], str, levels)
        up = c.list_of("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, str, levels)
        for key, types, kinds in (("down_block_types", down, DOWN_TYPES), ("up_block_types", up, UP_TYPES)):
            if unknown := [t for t in types if t not in kinds]:
                raise UserError(f"{where}: {key} has {unknown[0]}, which sdlite does not implement "
                                f"(only {' and '.join(kinds)})")
        mid = c.values.get("mid_block_type", MID_TYPES[0])
        if mid not in MID_TYPES:
            raise UserError(f"{where}: mid_block_type = {show(mid)} is not supported by sdlite "
                            f"(only {MID_TYPES[0]} or null)")
        if c.values.get("norm_num_groups", 32) is None:
            raise UserError(f"{where}: norm_num_groups = null (no output norm) is not supported by sdlite")
        c.optional("mid_block_only_cross_attention", bool)   # read to check their types; see UNET_IMPLEMENTED
        c.get("resnet_out_scale_factor", 1.0, float)
        c.optional("sample_size", int)   # the loader's default image size (a [height, width] list is refused)
        # diffusers quirk: in SD configs "attention_head_dim" is the number of heads (8, or [5, 10, 20, 20] in SD 2)
        config = cls(
            in_channels=c.get("in_channels", 4, int),
            out_channels=c.get("out_channels", 4, int),
            block_out_channels=channels,
            layers_per_block=c.per_level("layers_per_block", 2, int, levels),
            attention_levels=tuple(DOWN_TYPES[t] for t in down),
            up_attention_levels=tuple(UP_TYPES[t] for t in reversed(up)),   # up_block_types run deepest first
            heads=c.per_level("attention_head_dim", 8, int, levels),
            transformer_depth=c.per_level("transformer_layers_per_block", 1, int, levels),
            cross_attention_dim=c.per_level("cross_attention_dim", 1280, int, levels),
            only_cross_attention=c.per_level("only_cross_attention", False, bool, levels),
            use_linear_projection=c.get("use_linear_projection", False, bool),
            upcast_attention=c.get("upcast_attention", False, bool),
            mid_block=mid is not None,
            norm_num_groups=c.get("norm_num_groups", 32, int),
            norm_eps=c.get("norm_eps", 1e-5, float),
            act_fn=c.choice("act_fn", "silu", ACTIVATIONS),
            downsample_padding=c.get("downsample_padding", 1, int),
            mid_block_scale_factor=c.get("mid_block_scale_factor", 1.0, float),
            flip_sin_to_cos=c.get("flip_sin_to_cos", True, bool),
            freq_shift=c.get("freq_shift", 0.0, float),
            conv_in_kernel=c.get("conv_in_kernel", 3, int),
            conv_out_kernel=c.get("conv_out_kernel", 3, int),
            center_input_sample=c.get("center_input_sample", False, bool),
        )
        config.check(where)
        return config

    def to_json(self) -> dict:
        """The diffusers unet/config.json keys that from_json reads back to this config (one value for a per-level key
        that is the same at every level)."""
        def once_or_per_level(values: tuple):
            return values[0] if len(set(values)) == 1 else list(values)
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels],
            "mid_block_type": "UNetMidBlock2DCrossAttn" if self.mid_block else None,
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.up_attention_levels)],
            "layers_per_block": once_or_per_level(self.layers_per_block),
            "attention_head_dim": list(self.heads),
            "transformer_layers_per_block": once_or_per_level(self.transformer_depth),
            "cross_attention_dim": once_or_per_level(self.cross_attention_dim),
            "only_cross_attention": once_or_per_level(self.only_cross_attention),
            "use_linear_projection": self.use_linear_projection, "upcast_attention": self.upcast_attention,
            "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps, "act_fn": self.act_fn,
            "downsample_padding": self.downsample_padding, "mid_block_scale_factor": self.mid_block_scale_factor,
            "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
            "conv_in_kernel": self.conv_in_kernel, "conv_out_kernel": self.conv_out_kernel,
            "center_input_sample": self.center_input_sample,
        }

    def check(self, where) -> None:
        """Values that fit each other: GroupNorm groups and attention heads divide the widths, positive sizes."""
        sizes = {"in_channels": [self.in_channels], "out_channels": [self.out_channels],
                 "block_out_channels": self.block_out_channels, "layers_per_block": self.layers_per_block,
                 "attention_head_dim": self.heads, "transformer_layers_per_block": self.transformer_depth,
                 "cross_attention_dim": self.cross_attention_dim, "norm_num_groups": [self.norm_num_groups],
                 "conv_in_kernel": [self.conv_in_kernel], "conv_out_kernel": [self.conv_out_kernel]}
        for key, values in sizes.items():
            if min(values) < 1:
                raise UserError(f"{where}: {key} must be positive, not {show(list(values))}")
        if self.downsample_padding < 0 or self.norm_eps <= 0:
            raise UserError(f"{where}: downsample_padding must be >= 0 and norm_eps > 0")
        last = len(self.block_out_channels) - 1
        for level, (width, heads) in enumerate(zip(self.block_out_channels, self.heads)):
            attends = (self.attention_levels[level] or self.up_attention_levels[level]
                       or (level == last and self.mid_block))
            if width % self.norm_num_groups or (attends and width % heads):
                raise UserError(f"{where}: block_out_channels {show(list(self.block_out_channels))} must be "
                                f"multiples of norm_num_groups ({self.norm_num_groups}) and of each level's "
                                f"attention_head_dim {show(list(self.heads))}")


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
                       ) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) = [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2 - freq_shift)): the
    Transformer's sinusoidal position encoding (Vaswani et al. 2017, sec. 3.5) with t as the position, as DDPM embeds
    it (cosines first; sines first without flip_sin_to_cos). An odd dim gets a last column of zeros."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    angles = t[:, None].float() * freqs[None, :]
    waves = [torch.cos(angles), torch.sin(angles)]
    return F.pad(torch.cat(waves if flip_sin_to_cos else waves[::-1], dim=-1), (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """The MLP that turns the sinusoidal embedding into the vector every resnet block is conditioned on."""

    def __init__(self, channels: int, embed_dim: int, act_fn: str):
        super().__init__()
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.act = ACTIVATIONS[act_fn]
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(t_emb)))


class UNetResnetBlock(nn.Module):
    """Two 3x3 convs with a residual (He et al. 2016), the time embedding added in between (DDPM's resnet block);
    the sum divided by `output_scale` (1 in SD)."""

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int, output_scale: float):
        super().__init__()
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.act, self.output_scale = ACTIVATIONS[cfg.act_fn], output_scale
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time_emb_proj(self.act(emb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        h = h + self.conv_shortcut(x)
        return h if self.output_scale == 1 else h / self.output_scale


class Attention(nn.Module):
    """Multi-head attention of x over itself (context None) or over the text context (cross-attention)."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])   # a list only for the key name to_out.0

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out[0](self.attend(self.to_q(x), self.to_k(context), self.to_v(context)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, N, C) queries, (B, M, C) keys and values -> (B, N, C)."""
        return attention(q, k, v, self.heads, upcast=self.upcast)


class GEGLU(nn.Module):
    """x -> a * gelu(b), a and b the two halves of one projection (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is the reference's dropout, which does nothing at inference; it keeps the keys net.0 and net.2
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, feed-forward, each residual. With
    `only_cross`, the first attention reads the text as well."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool, only_cross: bool):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, context_dim if only_cross else dim, heads, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the h*w pixels of a feature map as tokens, with a residual around them all
    (Rombach et al. 2022, sec. 3.3: how the text conditions the UNet)."""

    def __init__(self, cfg: UNetConfig, level: int):
        super().__init__()
        channels = cfg.block_out_channels[level]
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if self.linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, cfg.heads[level], cfg.cross_attention_dim[level], cfg.upcast_attention,
                             cfg.only_cross_attention[level])
            for _ in range(cfg.transformer_depth[level]))
        self.proj_out = nn.Linear(channels, channels) if self.linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.linear:
            tokens = self.proj_in(tokens)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, c)   # (B, h*w, C)
        if self.linear:
            tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.linear:
            tokens = self.proj_out(tokens)
        # (B, C, h, w), contiguous like the reference's: convs round differently on channels-last memory
        out = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        if not self.linear:
            out = self.proj_out(out)
        return out + x


class UNetDownsample(nn.Module):
    """Halves height and width with a stride-2 3x3 convolution, the input padded by `padding` on every side, or with
    padding 0 on the right and the bottom only (as LDM's VAE)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.asymmetric = padding == 0
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)   # padding 1: h -> ceil(h / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class UNetUpsample(nn.Module):
    """Nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """To `size`, that of the skip met next: twice x's, or one less where the skip is odd (5 -> 9)."""
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetDownBlock(nn.Module):
    """One encoder level: resnets (each followed by a transformer at attention levels), then a stride-2 conv
    except at the deepest level. Every output is kept as a skip."""

    def __init__(self, cfg: UNetConfig, level: int, in_channels: int):
        super().__init__()
        out = cfg.block_out_channels[level]
        n = cfg.layers_per_block[level]
        self.resnets = nn.ModuleList(
            UNetResnetBlock(cfg, in_channels if i == 0 else out, out, 1.0) for i in range(n))
        self.attentions = nn.ModuleList(
            SpatialTransformer(cfg, level) for _ in range(n if cfg.attention_levels[level] else 0))
        deepest = level == len(cfg.block_out_channels) - 1
        self.downsamplers = nn.ModuleList([] if deepest else [UNetDownsample(out, cfg.downsample_padding)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsample in self.downsamplers:
            x = downsample(x)
            skips.append(x)
        return x, skips


class UNetUpBlock(nn.Module):
    """One decoder level: the level's layers_per_block + 1 resnets, each on its input concatenated with a skip (then a
    transformer at attention levels), then a 2x upsampling except at the top level."""

    def __init__(self, cfg: UNetConfig, level: int, in_channels: int, skip_channels: list[int]):
        super().__init__()
        out = cfg.block_out_channels[level]
        n = len(skip_channels)
        self.resnets = nn.ModuleList(
            UNetResnetBlock(cfg, (in_channels if i == 0 else out) + skip_channels[i], out, 1.0) for i in range(n))
        self.attentions = nn.ModuleList(
            SpatialTransformer(cfg, level) for _ in range(n if cfg.up_attention_levels[level] else 0))
        self.upsamplers = nn.ModuleList([] if level == 0 else [UNetUpsample(out)])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        """Pops its skips off the end of `skips`."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsample in self.upsamplers:
            x = upsample(x, skips[-1].shape[-2:])
        return x


class UNetMidBlock(nn.Module):
    """resnet, transformer, resnet at the deepest level."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        channels = cfg.block_out_channels[-1]
        self.resnets = nn.ModuleList(
            UNetResnetBlock(cfg, channels, channels, cfg.mid_block_scale_factor) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialTransformer(cfg, -1)])

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim, config.act_fn)
        k = config.conv_in_kernel
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], k, padding=(k - 1) // 2)

        self.down_blocks = nn.ModuleList()
        skip_channels = [channels[0]]   # of every skip the encoder leaves, in order: conv_in's, then each block's
        for level, out in enumerate(channels):
            block = UNetDownBlock(config, level, channels[max(level - 1, 0)])
            self.down_blocks.append(block)
            skip_channels += [out] * (len(block.resnets) + len(block.downsamplers))

        self.mid_block = UNetMidBlock(config) if config.mid_block else None

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(channels))):
            n = config.layers_per_block[level] + 1   # skips this decoder level takes
            skip_channels, taken = skip_channels[:-n], skip_channels[-n:][::-1]   # the decoder takes them last first
            in_channels = channels[min(level + 1, len(channels) - 1)]            # the deeper level's, or the mid's
            self.up_blocks.append(UNetUpBlock(config, level, in_channels, taken))

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        k = config.conv_out_kernel
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, k, padding=(k - 1) // 2)

    def forward(self, x: torch.Tensor, t: float | int | torch.Tensor, context: torch.Tensor,
                down_residuals: list[torch.Tensor] | None = None, mid_residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (B, in, h, w), t a number or a 0-d or (B,) tensor, context (B, 77, cross_attention_dim)
        -> (B, out, h, w). A ControlNet's outputs (controlnet.py) are added to the skips (`down_residuals`, one per
        skip) and to the mid block's output (`mid_residual`)."""
        c = self.config
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(x.dtype)
        emb = self.time_embedding(t_emb)                    # (B, time_embed_dim)

        if c.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips
        if down_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_residuals, strict=True)]
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            x = block(x, skips, emb, context)
        return self.conv_out(ACTIVATIONS[c.act_fn](self.conv_norm_out(x)))

