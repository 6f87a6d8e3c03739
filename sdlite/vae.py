"""The variational autoencoder that takes images to Stable Diffusion's latent space and back.

This is the KL-regularised autoencoder of Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models" (section 3 and appendix G). A convolutional encoder E maps an image x to the mean and
log-variance of a diagonal Gaussian posterior q(z|x), as in a VAE (Kingma & Welling 2014, "Auto-Encoding
Variational Bayes"). A mirrored decoder D maps a latent z back to pixels. Images are in [-1, 1]. With
L = len(block_out_channels) levels, an H x W image has latents of about H / 2^(L-1) x W / 2^(L-1): H/8 x W/8 in SD.
The pipeline brings latents to roughly unit variance with `scale_latents` (and back with `unscale_latents`).

SD 1.5 (a 512x512 image, 64x64 latents; each resnet in -> out channels):

    encoder.conv_in          3 -> 128                                        512
    encoder.down_blocks.0    128 -> 128, 128 -> 128                          512 -> 256
    encoder.down_blocks.1    128 -> 256, 256 -> 256                          256 -> 128
    encoder.down_blocks.2    256 -> 512, 512 -> 512                          128 -> 64
    encoder.down_blocks.3    512 -> 512, 512 -> 512                          64
    encoder.mid_block        512 -> 512, attention, 512 -> 512               64
    encoder.conv_out         512 -> 8 (mean and log-variance), quant_conv 8 -> 8
    post_quant_conv 4 -> 4, decoder.conv_in 4 -> 512                         64
    decoder.mid_block        512 -> 512, attention, 512 -> 512               64
    decoder.up_blocks.0      512 -> 512, 512 -> 512, 512 -> 512              64 -> 128
    decoder.up_blocks.1      512 -> 512, 512 -> 512, 512 -> 512              128 -> 256
    decoder.up_blocks.2      512 -> 256, 256 -> 256, 256 -> 256              256 -> 512
    decoder.up_blocks.3      256 -> 128, 128 -> 128, 128 -> 128              512
    decoder.conv_out         128 -> 3 (after GroupNorm and SiLU)

Module names equal the keys of diffusers' AutoencoderKL state dict. formats/ldm.py renames the original
CompVis single-file layout.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .config import ACTIVATIONS, ConfigFile, show
from .errors import UserError

# The keys VAEConfig.from_json reads (down/up_block_types only to check they are the one kind sdlite implements),
# and those it refuses unless they hold these values.
VAE_IMPLEMENTED = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
    "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
    "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
}
VAE_REFUSED: dict[str, tuple] = {}


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width of each resolution level, highest first
    layers_per_block: int = 2  # resnets per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    act_fn: str = "silu"  # of the resnets (the encoder and decoder outputs use silu whatever it says, as diffusers)
    scaling_factor: float = 0.18215  # latents = scaling_factor * z (scale_latents)
    shift_factor: float | None = None  # SD3's: latents = scaling_factor * (z - shift_factor)
    latents_mean: tuple[float, ...] | None = None  # SDXL's: latents = scaling_factor * (z - mean) / std, per channel
    latents_std: tuple[float, ...] | None = None
    sample_size: int = 512  # the image side it was trained at; the side of a tile in tiling.py
    force_upcast: bool = True  # a float16 pipeline runs this VAE in float32 (as diffusers' SDXL pipelines do)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)

    @property
    def downscale(self) -> int:
        """Image side / latent side: 8 in SD (each level but the last halves the side)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_json(cls, config: dict, where="vae/config.json") -> "VAEConfig":
        """From a parsed diffusers vae/config.json; a key sdlite cannot honour, or a value of the wrong type, is a
        UserError naming it."""
        c = ConfigFile(config, where, VAE_IMPLEMENTED, VAE_REFUSED)
        channels = c.list_of("block_out_channels", [64], int)
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if c.list_of(key, [kind] * len(channels), str, len(channels)) != (kind,) * len(channels):
                raise UserError(f"{where}: {key} = {show(config[key])[:60]} is not supported by sdlite (only {kind})")
        latent_channels = c.get("latent_channels", 4, int)
        mean, std = (None if c.values.get(key) is None else c.list_of(key, None, float, latent_channels)
                     for key in ("latents_mean", "latents_std"))
        if (mean is None) != (std is None) or (mean is not None and c.values.get("shift_factor") is not None):
            raise UserError(f"{where}: give latents_mean and latents_std together, and not with shift_factor "
                            "(no reference pipeline uses both)")
        result = cls(
            in_channels=c.get("in_channels", 3, int),
            out_channels=c.get("out_channels", 3, int),
            latent_channels=latent_channels,
            block_out_channels=channels,
            layers_per_block=c.get("layers_per_block", 1, int),
            norm_num_groups=c.get("norm_num_groups", 32, int),
            act_fn=c.choice("act_fn", "silu", ACTIVATIONS),
            scaling_factor=c.get("scaling_factor", 0.18215, float),
            shift_factor=c.optional("shift_factor", float),
            latents_mean=mean,
            latents_std=std,
            sample_size=c.get("sample_size", 32, int),
            force_upcast=c.get("force_upcast", True, bool),
            use_quant_conv=c.get("use_quant_conv", True, bool),
            use_post_quant_conv=c.get("use_post_quant_conv", True, bool),
            mid_block_add_attention=c.get("mid_block_add_attention", True, bool),
        )
        result.check(where)
        return result

    def to_json(self) -> dict:
        """The diffusers vae/config.json keys that from_json reads back to this config."""
        levels = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels, "latent_channels": self.latent_channels,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "norm_num_groups": self.norm_num_groups, "act_fn": self.act_fn, "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latents_mean": self.latents_mean and list(self.latents_mean),
            "latents_std": self.latents_std and list(self.latents_std),
            "sample_size": self.sample_size, "force_upcast": self.force_upcast, "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv, "mid_block_add_attention": self.mid_block_add_attention,
        }

    def check(self, where) -> None:
        """Values that fit each other: positive sizes, GroupNorm groups that divide the widths, no scale of 0."""
        sizes = [self.in_channels, self.out_channels, self.latent_channels, self.layers_per_block,
                 self.norm_num_groups, self.sample_size, *self.block_out_channels]
        if min(sizes) < 1 or any(width % self.norm_num_groups for width in self.block_out_channels):
            raise UserError(f"{where}: sizes must be positive and block_out_channels "
                            f"{show(list(self.block_out_channels))} multiples of norm_num_groups "
                            f"({self.norm_num_groups})")
        if self.scaling_factor == 0 or 0 in (self.latents_std or ()):
            raise UserError(f"{where}: scaling_factor and latents_std must not be 0")


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))) that the encoder outputs (Kingma & Welling 2014, eq. 9)."""

    def __init__(self, moments: torch.Tensor):  # (B, 2 * latent_channels, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps with eps ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014, section 2.4).

        eps is one randn of the mean's shape and dtype, drawn on the generator's device and then moved to the
        mean's, as diffusers does. So a generator seeded the same way gives the same z.
        """
        device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class VAEResnetBlock(nn.Module):
    """Residual block with pre-activation (He et al. 2016): x + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, act_fn: str):
        super().__init__()
        self.act = ACTIVATIONS[act_fn]
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # When the width changes, a 1x1 convolution brings the skip path to the new width.
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h + skip


class AttentionBlock(nn.Module):
    """Self-attention with one head over all h*w positions, added to its input."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list so that the key is diffusers' `to_out.0`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, h*w, C): a view if channels-last
        out = self.attend(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
        return x + self.to_out[0](out).reshape(b, h, w, c).permute(0, 3, 1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, h*w, C) queries, keys and values -> (B, h*w, C)."""
        return attention(q, k, v, heads=1)


class VAEDownsample(nn.Module):
    """Halves height and width with a stride-2 3x3 convolution. As in LDM, the input is padded on the right and the
    bottom only, so an input h high gives h // 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEUpsample(nn.Module):
    """Doubles height and width: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resnet_chain(in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str) -> nn.Sequential:
    """`layers` resnets in a row, the first of which changes the width."""
    return nn.Sequential(*(VAEResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
                           for i in range(layers)))


class EncoderBlock(nn.Sequential):
    """One encoder level, run in order: resnets at one resolution, then a downsample (none at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str, downsample: bool):
        super().__init__(OrderedDict(
            resnets=resnet_chain(in_channels, out_channels, layers, groups, act_fn),
            downsamplers=nn.Sequential(VAEDownsample(out_channels)) if downsample else nn.Sequential()))


class DecoderBlock(nn.Sequential):
    """One decoder level, run in order: resnets at one resolution, then an upsample (none at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str, upsample: bool):
        super().__init__(OrderedDict(
            resnets=resnet_chain(in_channels, out_channels, layers, groups, act_fn),
            upsamplers=nn.Sequential(VAEUpsample(out_channels)) if upsample else nn.Sequential()))


class VAEMidBlock(nn.Module):
    """resnet, self-attention, resnet: at the lowest resolution, the only place where attention is used (unless the
    config says mid_block_add_attention false: then resnet, resnet)."""

    def __init__(self, config: VAEConfig, channels: int):
        super().__init__()
        groups, act_fn = config.norm_num_groups, config.act_fn
        self.resnets = nn.ModuleList([VAEResnetBlock(channels, channels, groups, act_fn),
                                      VAEResnetBlock(channels, channels, groups, act_fn)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)] if config.mid_block_add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention_block in self.attentions:
            x = attention_block(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, h, w), mean and log-variance stacked."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups, act_fn = config.block_out_channels, config.norm_num_groups, config.act_fn
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(c_in, c_out, config.layers_per_block, groups, act_fn, downsample=i < len(widths) - 1)
            for i, (c_in, c_out) in enumerate(zip(widths[:1] + widths[:-1], widths)))
        self.mid_block = VAEMidBlock(config, widths[-1])
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))   # silu whatever act_fn says, as diffusers


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, H, W), climbing the levels in reverse."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups, act_fn = config.block_out_channels[::-1], config.norm_num_groups, config.act_fn  # lowest first
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = VAEMidBlock(config, widths[0])
        self.up_blocks = nn.ModuleList(
            DecoderBlock(c_in, c_out, config.layers_per_block + 1, groups, act_fn, upsample=i < len(widths) - 1)
            for i, (c_in, c_out) in enumerate(zip(widths[:1] + widths[:-1], widths)))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))   # silu whatever act_fn says, as diffusers


class AutoencoderKL(nn.Module):
    """The autoencoder of Rombach et al. 2022, with 1x1 convolutions (quant_conv, post_quant_conv) between the
    encoder, the latent space and the decoder (unless the config turns them off)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else nn.Identity()
        self.decoder = Decoder(config)

    def upcast_for(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype this VAE runs in within a pipeline of `dtype`: float32 for float16 if the config says
        force_upcast (float16 overflows in SD's VAE at large sizes), as diffusers' SDXL pipelines do."""
        return torch.float32 if dtype == torch.float16 and self.config.force_upcast else dtype

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """A posterior sample z -> the latents the UNet denoises, as diffusers' pipelines scale them: SD's
        scaling_factor * z, SDXL's (z - latents_mean) * scaling_factor / latents_std, SD3's (z - shift_factor) *
        scaling_factor (whichever the config holds)."""
        c = self.config
        if c.latents_mean is not None:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(z) for v in (c.latents_mean, c.latents_std))
            return (z - mean) * c.scaling_factor / std
        if c.shift_factor is not None:
            return (z - c.shift_factor) * c.scaling_factor
        return c.scaling_factor * z

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of scale_latents: denoised latents -> the z the decoder takes."""
        c = self.config
        if c.latents_mean is not None:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents) for v in (c.latents_mean, c.latents_std))
            return latents * std / c.scaling_factor + mean
        if c.shift_factor is not None:
            return latents / c.scaling_factor + c.shift_factor
        return latents / c.scaling_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for images x (B, C, H, W) in [-1, 1]."""
        return DiagonalGaussian(self.moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] for latents z (B, latent_channels, h, w), not scaled by scaling_factor."""
        return self.decoder(self.post_quant_conv(z))

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior's mean and log-variance stacked: (B, 2 * latent_channels, h, w)."""
        return self.quant_conv(self.encoder(x))

