"""The stages: each builds a model and a loss (objectives.py), runs the shared loop (loop.py) and returns the EMA
weights. A new latent model is two stages, train_vae then train_text_to_image on a pipeline new_pipeline makes around
the trained VAE; fine-tuning is train_text_to_image on a loaded checkpoint; train_pixel is DDPM on the images
themselves. The sample grids are drawn with the public pipelines: Pipeline.txt2img (latent models) and
PixelPipeline.sample (pixel models).
"""
import copy
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from ..clip import CLIPTextConfig, CLIPTextModel
from ..errors import UserError
from ..formats.families import PIXEL_DDPM, SDLITE_TINY
from ..image import grid, to_images
from ..pipeline import Pipeline
from ..pixel import PixelPipeline
from ..progress import Progress
from ..samplers.training_schedule import TrainingSchedule, alphas_cumprod
from ..tokenizer import Tokenizer
from ..unet import UNet, UNetConfig
from ..unet2d import UNet2D, UNet2DConfig
from ..vae import AutoencoderKL, VAEConfig
from .loop import TrainConfig, Trainer
from .objectives import TextToImage, pixel_loss, text_to_image_loss, vae_loss

# The default model's architecture: SD's classes, miniature widths (64 x 64 images, 8 x 8 x 4 latents as in SD).
DEFAULT_VAE = VAEConfig(block_out_channels=(8, 16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
DEFAULT_TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
DEFAULT_UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, True),
                          heads=(4, 4), cross_attention_dim=64)
# The pixel model's: DDPM's UNet (UNet2DModel), three levels, self-attention at the deepest (as DDPM's at 16 x 16).
PIXEL_UNET = UNet2DConfig(block_out_channels=(32, 64, 128), layers_per_block=1, attention_levels=(False, False, True),
                          up_attention_levels=(False, False, True), attention_head_dim=32)


def train_vae(images: torch.Tensor, vae_config: VAEConfig, kl_weight: float, config: TrainConfig,
              out: Path) -> AutoencoderKL:
    """A VAE from scratch; its scaling factor is then set to 1 / std of the latents (Rombach et al. sec. 4.3.2)."""
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(vae_config)
    shown = images[:8]

    def sample_grid(ema: AutoencoderKL) -> Image.Image:  # originals above, reconstructions below
        with torch.no_grad():
            pixels = torch.cat([shown, ema.decode(ema.encode(shown).mean)]).clamp(-1, 1)
        return grid(to_images(pixels), columns=len(shown))

    trainer = Trainer("vae", vae, lambda model, g, share: vae_loss(model, images, kl_weight, g, config.batch_size,
                                                                   share), config, out, sample_grid)
    trainer.resume()
    vae = trainer.run().eval()
    mean, std = encode(vae, images)
    vae.config.scaling_factor = round(1 / mean.std().item(), 5)
    return vae


def new_pipeline(vae: AutoencoderKL, size: int, seed: int, name: str) -> Pipeline:
    """A text-to-image pipeline at init: the default model's text encoder and UNet with the given trained VAE."""
    torch.manual_seed(seed)
    unet_config = UNetConfig(**{**asdict(DEFAULT_UNET), "in_channels": vae.config.latent_channels,
                                "out_channels": vae.config.latent_channels})
    return Pipeline(Tokenizer.from_vendored(), CLIPTextModel(DEFAULT_TEXT), UNet(unet_config), vae,
                    SDLITE_TINY.scheduler_config(), default_size=size, name=name)


def train_text_to_image(pipe: Pipeline, images: torch.Tensor, captions: list[str], config: TrainConfig, out: Path,
                        train_text_encoder: bool, prompts: list[str], distance: str = "mse") -> Pipeline:
    """The pipeline's UNet (and text encoder, if asked) trained on latents of the images, the VAE frozen, to predict
    what its scheduler config's prediction_type says; sample grids show `prompts`. Returns the pipeline with the EMA
    weights."""
    scale = pipe.vae.config.scaling_factor
    if pipe.vae.config.shift_factor is not None or pipe.vae.config.latents_mean is not None:
        raise UserError("training on a VAE whose config.json has shift_factor or latents_mean is not supported")
    mean, std = encode(pipe.vae, images)
    ids, empty_ids = pipe.tokenizer(captions), pipe.tokenizer([""])
    prediction_type = pipe.scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"training a UNet that predicts {prediction_type!r} is not supported (epsilon, v_prediction)")
    alpha_bar = alphas_cumprod(schedule_of(pipe.scheduler_config))
    model = TextToImage(pipe.text_encoder, pipe.unet, train_text_encoder).train()

    def sample_grid(ema: TextToImage) -> Image.Image:  # each prompt in a column, two seeds
        sampling = copy.copy(pipe)  # the same pipeline with the EMA networks
        sampling.text_encoder, sampling.unet = ema.text_encoder, ema.unet
        runs, images = [(seed, prompt) for seed in (0, 1) for prompt in prompts], []
        progress = Progress("samples", "image")
        for seed, prompt in runs:
            images += sampling.txt2img(prompt, steps=20, seed=seed)
            progress(len(images), len(runs))
        return grid(images, columns=len(prompts))

    loss = text_to_image_loss((mean * scale, std * scale), ids, empty_ids, alpha_bar, prediction_type,
                              config.batch_size, distance)
    trainer = Trainer("unet", model, loss, config, out, sample_grid if config.sample_every else None)
    trainer.resume()
    ema = trainer.run().eval().requires_grad_(False)
    pipe.text_encoder, pipe.unet = ema.text_encoder, ema.unet
    return pipe


def train_pixel(images: torch.Tensor, unet_config: UNet2DConfig, config: TrainConfig, out: Path,
                distance: str = "mse", flip: bool = False) -> PixelPipeline:
    """An unconditional UNet on the images themselves: DDPM as Ho et al. 2020 trained it (CIFAR-10, CelebA-HQ).
    Returns the pipeline of the EMA weights and DDPM's scheduler, named after `out`."""
    torch.manual_seed(config.seed)
    scheduler_config = PIXEL_DDPM.scheduler_config()
    alpha_bar = alphas_cumprod(schedule_of(scheduler_config))

    def sample_grid(ema: UNet2D) -> Image.Image:
        return grid(PixelPipeline(ema, scheduler_config, out.name).sample(steps=50, batch_size=8, seed=0), columns=8)

    loss = pixel_loss(images, alpha_bar, config.batch_size, distance, flip)
    trainer = Trainer("pixel-unet", UNet2D(unet_config), loss, config, out, sample_grid if config.sample_every else None)
    trainer.resume()
    return PixelPipeline(trainer.run().eval().requires_grad_(False), scheduler_config, out.name)


def schedule_of(scheduler_config: dict) -> TrainingSchedule:
    """The training schedule a diffusers scheduler config describes (the keys of other samplers' set aside)."""
    return TrainingSchedule(**{k: v for k, v in scheduler_config.items() if k in TrainingSchedule.__dataclass_fields__})


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of q(z|x) for every image, unscaled: computed once, so training samples z without the encoder."""
    posteriors = [vae.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([p.mean for p in posteriors]).float(), torch.cat([p.std for p in posteriors]).float()
