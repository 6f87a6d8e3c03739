"""VAE tiling: encode and decode images larger than the VAE's own size in overlapping tiles, so that memory is bounded
by one tile instead of growing with the image, at the price of results that differ from the untiled ones near the
seams. Functions over a VAE, as diffusers' AutoencoderKL does with tiling enabled (and A1111 and ComfyUI offer); the
tile is the VAE's config.sample_size pixels square (512 for SD 1.x) unless given.
"""
import torch

from .vae import AutoencoderKL, DiagonalGaussian


def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, tile: int | None = None) -> DiagonalGaussian:
    """vae.encode(x) for images x (B, C, H, W), in tiles of `tile` pixels when x is larger than one."""
    tile = tile or vae.config.sample_size
    if max(x.shape[2:]) <= tile:
        return vae.encode(x)
    return DiagonalGaussian(tiled(vae.moments, x, tile, tile // vae.config.downscale))


def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """vae.decode(z) for latents z (B, latent_channels, h, w), in tiles of `tile` pixels (tile / 8 latents in SD)
    when the image is larger than one."""
    tile = tile or vae.config.sample_size
    latent_tile = tile // vae.config.downscale
    if max(z.shape[2:]) <= latent_tile:
        return vae.decode(z)
    return tiled(vae.decode, z, latent_tile, tile)


def tiled(f, x: torch.Tensor, tile: int, out_tile: int) -> torch.Tensor:
    """f(x) computed on overlapping tile x tile pieces of x, blended back together, as diffusers' AutoencoderKL does
    with tiling enabled (and A1111 and ComfyUI offer): a tile starts every 3/4 tile; each output tile (out_tile
    square) fades in linearly over its first quarter from the tiles above and to its left, and keeps its first 3/4.
    Tiles see no context beyond their borders, so the result differs from f(x) near the seams."""
    stride, blend = tile * 3 // 4, out_tile // 4
    rows = [[f(x[:, :, i:i + tile, j:j + tile]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    for i, row in enumerate(rows):
        for j, out in enumerate(row):
            if i > 0:
                fade_in(out, rows[i - 1][j], blend, dim=2)
            if j > 0:
                fade_in(out, row[j - 1], blend, dim=3)
    keep = out_tile - blend
    return torch.cat([torch.cat([out[:, :, :keep, :keep] for out in row], dim=3) for row in rows], dim=2)


def fade_in(b: torch.Tensor, a: torch.Tensor, n: int, dim: int) -> None:
    """In place: the first n rows (dim 2) or columns (dim 3) of b go linearly from a's last n to b's own."""
    n = min(a.shape[dim], b.shape[dim], n)
    for k in range(n):
        b.select(dim, k).copy_(a.select(dim, k - n) * (1 - k / n) + b.select(dim, k) * (k / n))

