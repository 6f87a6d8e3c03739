"""What the stages minimise, equation by equation.

  VAE        ||D(z) - x||^2 + beta KL(q(z|x) || N(0, I)), z ~ q(z|x) by the reparameterisation trick: the negative
             ELBO of Kingma & Welling 2014 (eq. 10) with a Gaussian decoder, the KL down-weighted as in the KL-reg
             autoencoder of Rombach et al. 2022 (sec. 3, appendix G), so that the latents keep the image's detail.
  UNet       DDPM's simplified objective (Ho et al. 2020, eq. 14): t ~ U{0..T-1}, eps ~ N(0, I),
             x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (noise added in one step, eq. 4), and
             ||eps - eps_theta(x_t, t, c)||^2; or, with prediction_type "v_prediction", the same MSE on
             v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4). x_0 is the VAE
             latent times the scaling factor (Rombach et al. sec. 4.3.2) or, for the pixel model, the image itself.
             The caption is replaced by "" in 10% of the steps, so that the one model also predicts unconditionally,
             as classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2).

x_t is drawn by samplers/training_schedule.py's add_noise: the forward process the samplers run backwards. Each loss
here is a Loss: (model, the step's generator) -> scalar, drawing its batch and its noise from that generator.
"""
from typing import Callable

import torch
import torch.nn.functional as F

from ..clip import CLIPTextModel
from ..samplers.training_schedule import add_noise
from ..unet import UNet
from ..unet2d import UNet2D
from ..vae import AutoencoderKL

# (model, the step's generator, share) -> scalar loss. The batch is drawn whole from the generator; the loss is the
# mean over its items `share` (all of them, or one process's part of the global batch in data-parallel training).
Loss = Callable[[torch.nn.Module, torch.Generator, slice], torch.Tensor]
ALL = slice(None)
# The per-element error the UNet's loss averages: DDPM's squared error, the absolute error (as the "L1" DDPM of
# Saharia et al. 2022, Palette, sec. 5.2), or Huber's (half the squared error below 1, the absolute error less 1/2
# above: robust to outliers).
DISTANCES = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, generator: torch.Generator,
             batch_size: int, share: slice = ALL) -> torch.Tensor:
    """The negative ELBO (Kingma & Welling 2014, eq. 10) on a batch of `images`: mean squared reconstruction error +
    kl_weight * KL(q(z|x) || N(0, I)) per latent element, KL = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2) (appendix B)."""
    x = images[torch.randint(len(images), (batch_size,), generator=generator)][share]
    posterior = vae.encode(x)
    eps = torch.randn((batch_size, *posterior.mean.shape[1:]), generator=generator, dtype=posterior.mean.dtype)
    reconstruction = vae.decode(posterior.mean + posterior.std * eps[share])   # z ~ q(z|x): posterior.sample's draw
    kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).mean()
    return F.mse_loss(reconstruction.float(), x) + kl_weight * kl


def diffusion_loss(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: str, generator: torch.Generator,
                   distance: str = "mse", share: slice = ALL) -> torch.Tensor:
    """DDPM's simplified loss (Ho et al. 2020, eq. 14) on eps, or on v (Salimans & Ho 2022, sec. 4), at one random
    timestep per item, x_t drawn from q(x_t | x_0) in one step (eq. 4); predict(x_t, t) is the UNet's output on the
    items `share`. `distance` is DISTANCES' name of the per-element error averaged: eq. 14's squared error, or another."""
    t = torch.randint(len(alphas_cumprod), (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = add_noise(alphas_cumprod, x0, noise, t)
    target = noise if prediction_type == "epsilon" else velocity(alphas_cumprod, x0, noise, t)
    return DISTANCES[distance](predict(x_t[share], t[share]).float(), target[share])


def velocity(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4): what a v-prediction UNet
    learns to output for the x_t that add_noise made of x_0 and eps."""
    alpha_bar = alphas_cumprod.to(x0.dtype)[t].view(-1, *[1] * (x0.ndim - 1))
    return alpha_bar ** 0.5 * noise - (1 - alpha_bar) ** 0.5 * x0


class TextToImage(torch.nn.Module):
    """The text encoder and the UNet trained as one model; the text encoder's parameters are frozen unless asked."""

    def __init__(self, text_encoder: CLIPTextModel, unet: UNet, train_text_encoder: bool):
        super().__init__()
        self.text_encoder, self.unet = text_encoder.requires_grad_(train_text_encoder), unet.requires_grad_(True)


def text_to_image_loss(latents: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, empty_ids: torch.Tensor,
                       alphas_cumprod: torch.Tensor, prediction_type: str, batch_size: int, distance: str = "mse",
                       caption_dropout: float = 0.1) -> Loss:
    """The conditional latent-diffusion loss (Rombach et al. 2022, eq. 3) on (mean, std) of the scaled VAE
    posteriors of the images and their token ids, with captions dropped for classifier-free guidance (Ho & Salimans
    2022, sec. 3.2)."""
    mean, std = latents

    def loss(model: TextToImage, generator: torch.Generator, share: slice = ALL) -> torch.Tensor:
        i = torch.randint(len(mean), (batch_size,), generator=generator)
        x0 = mean[i] + std[i] * torch.randn(mean[i].shape, generator=generator)  # z ~ q(z|x), as SD trains
        dropped = torch.rand(batch_size, generator=generator) < caption_dropout
        context = model.text_encoder(torch.where(dropped[:, None], empty_ids, ids[i])[share])
        return diffusion_loss(lambda x_t, t: model.unet(x_t, t, context), x0, alphas_cumprod, prediction_type,
                              generator, distance, share)
    return loss


def pixel_loss(images: torch.Tensor, alphas_cumprod: torch.Tensor, batch_size: int, distance: str = "mse",
               flip: bool = False) -> Loss:
    """The DDPM loss (Ho et al. 2020, eq. 14) on the images themselves, for an unconditional UNet2D; with `flip`,
    each image mirrored left-right with probability 1/2 (the random flips Ho et al. train CIFAR-10 with, appendix B)."""
    def loss(unet: UNet2D, generator: torch.Generator, share: slice = ALL) -> torch.Tensor:
        x0 = images[torch.randint(len(images), (batch_size,), generator=generator)]
        if flip:
            mirrored = torch.rand(batch_size, generator=generator) < 0.5
            x0 = torch.where(mirrored[:, None, None, None], x0.flip(-1), x0)
        return diffusion_loss(unet, x0, alphas_cumprod, "epsilon", generator, distance, share)
    return loss
