"""Training Stable Diffusion's three networks, from scratch or from a checkpoint, on a 2-core CPU if need be.

    python -m sdlite train --data scenes --out weights/my-default         # VAE, then text-to-image UNet, from scratch
    python -m sdlite train --data photos/ --model weights/default --out weights/photos    # fine-tune a model's UNet
    python -m sdlite train --data digits/ --pixel --out runs/digits       # unconditional UNet on pixels (plain DDPM)

What each stage minimises:
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

Every stage runs the same loop (Trainer): AdamW (Loshchilov & Hutter 2019), a learning rate that warms up linearly
then decays along a half cosine (Loshchilov & Hutter 2017, SGDR), gradient-norm clipping, optional bf16 autocast on
the CPU, and an exponential moving average of the weights (Polyak averaging; the EMA weights are what is sampled and
saved). Each stage keeps its state in OUT/train/STAGE.pt, so an interrupted run resumes where it stopped; a batch
depends only on the seed and the step number, so a resumed run takes the same steps as an uninterrupted one.
"""
import argparse
import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from . import samplers, scenes
from .checkpoint import load
from .clip import CLIPTextConfig, CLIPTextModel
from .errors import UserError
from .image import open_rgb
from .pipeline import Pipeline
from .progress import Progress
from .request import check_text
from .samplers.training_schedule import TrainingSchedule, alphas_cumprod
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# SD's training schedule (its scheduler_config.json), sampled by default with DDIM, which needs few steps.
SD_SCHEDULE = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "trained_betas": None, "steps_offset": 1, "clip_sample": False,
               "set_alpha_to_one": False, "timestep_spacing": "leading", "prediction_type": "epsilon"}
# The pixel model is trained on DDPM's own schedule (Ho et al. 2020, sec. 4) and sampled with its ancestral loop.
DDPM_SCHEDULE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                 "beta_schedule": "linear", "trained_betas": None, "clip_sample": True, "prediction_type": "epsilon"}
SAMPLE_PROMPTS = ["a red circle", "a blue square on the left", "a small green triangle at the top right",
                  "a large yellow circle at the bottom", "a purple square in the middle", "a small orange circle"]
# The default model's architecture: SD's classes, miniature widths (64 x 64 images, 8 x 8 x 4 latents as in SD).
DEFAULT_VAE = VAEConfig(block_out_channels=(8, 16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8)
DEFAULT_TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
DEFAULT_UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, True),
                          heads=(4, 4), cross_attention_dim=64)
PIXEL_UNET = UNetConfig(in_channels=3, out_channels=3, block_out_channels=(32, 64, 128), layers_per_block=1,
                        attention_levels=(False, False, True), heads=(4, 4, 4), cross_attention_dim=32)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # maximum global gradient norm
    ema_decay: float = 0.999
    bf16: bool = False  # autocast the forward pass to bfloat16 (faster on CPUs with AVX-512 BF16 or AMX)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 500  # steps between sample grids (0: none)
    save_every: int = 500  # steps between training checkpoints


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The learning rate's multiplier: 0 -> 1 linearly over `warmup` steps, then 1 -> 0 along a half cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta after every step. d starts low and rises to `decay` as
    (1 + step) / (10 + step), so that the average forgets the random initialisation quickly (diffusers' EMAModel)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for ema, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:  # frozen parameters stay equal
                ema.lerp_(p.detach(), 1 - d)


Loss = Callable[[torch.nn.Module, torch.Generator], torch.Tensor]  # (model, the step's generator) -> scalar loss
Sampler = Callable[[torch.nn.Module], Image.Image]  # EMA model -> a grid of samples


class Trainer:
    """The loop every stage shares. `loss(model, generator)` draws its batch from the generator it is given, which
    is seeded with (seed, step): so the run is the same whether or not it was stopped and resumed."""

    def __init__(self, name: str, model: torch.nn.Module, loss: Loss, config: TrainConfig, out: Path,
                 sample: Sampler | None = None):
        self.name, self.model, self.loss, self.config, self.out, self.sample = name, model, loss, config, out, sample
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_with_warmup(s, config.warmup_steps, config.steps))
        self.ema = EMA(model, config.ema_decay)
        self.step = 0

    @property
    def state_path(self) -> Path:
        return self.out / "train" / f"{self.name}.pt"

    def state_dict(self) -> dict:
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()}

    def save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), self.state_path.with_suffix(".part"))
        self.state_path.with_suffix(".part").replace(self.state_path)  # a crash mid-write leaves the last one intact

    def resume(self) -> bool:
        """Load OUT/train/NAME.pt if it exists; True if it did."""
        if not self.state_path.exists():
            return False
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.ema.model.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])
            if type(state["step"]) is not int or state["step"] < 0:
                raise ValueError(f"step {state['step']!r}")
            self.step = state["step"]
        except Exception as e:  # truncated, another stage's or model's, not a torch file: unpickling raises anything
            raise UserError(f"{self.state_path} is not a resumable state of this run ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''}): delete it to start over") from None
        return True

    def train_step(self) -> float:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = self.loss(self.model, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return loss.item()

    def run(self, until: int | None = None) -> torch.nn.Module:
        """Train from the current step to `until` (default: config.steps), logging to stdout and OUT/NAME-loss.csv,
        saving sample grids to OUT/samples/ and the state to OUT/train/; returns the EMA model."""
        cfg, until = self.config, until or self.config.steps
        log = self.out / f"{self.name}-loss.csv"
        if not log.exists():
            log.write_text("step,loss,lr\n")
        progress, losses = Progress(self.name, start=self.step), []
        while self.step < until:
            losses.append(self.train_step())
            if self.step % cfg.log_every == 0 or self.step == until:
                lr = self.lr_schedule.get_last_lr()[0]
                with log.open("a") as f:
                    f.write(f"{self.step},{np.mean(losses):.5f},{lr:.3g}\n")
                progress(self.step, until, f"loss {np.mean(losses):.4f}  lr {lr:.2g}")
                losses = []
            if self.step % cfg.save_every == 0 or self.step == until:
                self.save()
            if self.sample and cfg.sample_every and (self.step % cfg.sample_every == 0 or self.step == until):
                (self.out / "samples").mkdir(exist_ok=True)
                self.sample(self.ema.model).save(self.out / "samples" / f"{self.name}-{self.step:06d}.png")
        return self.ema.model


# --- the losses ---

def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, generator: torch.Generator,
             batch_size: int) -> torch.Tensor:
    """Mean squared reconstruction error + kl_weight * KL(q(z|x) || N(0, I)) per latent element (Kingma & Welling
    2014, appendix B: KL = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2))."""
    x = images[torch.randint(len(images), (batch_size,), generator=generator)]
    posterior = vae.encode(x)
    reconstruction = vae.decode(posterior.sample(generator))
    kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).mean()
    return F.mse_loss(reconstruction.float(), x) + kl_weight * kl


def diffusion_loss(unet: UNet, x0: torch.Tensor, context: torch.Tensor, alpha_bar: torch.Tensor,
                   prediction_type: str, generator: torch.Generator) -> torch.Tensor:
    """DDPM's simplified loss (Ho et al. 2020, eq. 14) on eps, or on v (Salimans & Ho 2022)."""
    t = torch.randint(len(alpha_bar), (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise  # q(x_t | x_0) in one step (Ho et al. eq. 4)
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    return F.mse_loss(unet(x_t, t, context).float(), target)


class TextToImage(torch.nn.Module):
    """The text encoder and the UNet trained as one model; the text encoder's parameters are frozen unless asked."""

    def __init__(self, text_encoder: CLIPTextModel, unet: UNet, train_text_encoder: bool):
        super().__init__()
        self.text_encoder, self.unet = text_encoder.requires_grad_(train_text_encoder), unet.requires_grad_(True)


def text_to_image_loss(latents: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, empty_ids: torch.Tensor,
                       alpha_bar: torch.Tensor, prediction_type: str, batch_size: int, caption_dropout: float = 0.1
                       ) -> Loss:
    """The latent-diffusion loss on (mean, std) of the scaled VAE posteriors of the images and their token ids."""
    mean, std = latents

    def loss(model: TextToImage, generator: torch.Generator) -> torch.Tensor:
        i = torch.randint(len(mean), (batch_size,), generator=generator)
        x0 = mean[i] + std[i] * torch.randn(mean[i].shape, generator=generator)  # z ~ q(z|x), as SD trains
        dropped = torch.rand(batch_size, generator=generator) < caption_dropout
        batch_ids = torch.where(dropped[:, None], empty_ids, ids[i])
        return diffusion_loss(model.unet, x0, model.text_encoder(batch_ids), alpha_bar, prediction_type, generator)
    return loss


def pixel_loss(images: torch.Tensor, alpha_bar: torch.Tensor, batch_size: int) -> Loss:
    """The DDPM loss on images. The UNet class is SD's and has cross-attention in its middle block: an
    unconditional model gives it one zero token, which makes that cross-attention add a constant."""
    def loss(unet: UNet, generator: torch.Generator) -> torch.Tensor:
        x0 = images[torch.randint(len(images), (batch_size,), generator=generator)]
        return diffusion_loss(unet, x0, null_context(unet, batch_size), alpha_bar, "epsilon", generator)
    return loss


def null_context(unet: UNet, batch_size: int) -> torch.Tensor:
    return torch.zeros(batch_size, 1, unet.config.cross_attention_dim[-1])


# --- data ---

def read_folder(folder: Path, size: int, caption: str | None) -> tuple[np.ndarray, list[str]]:
    """Images of `folder` as uint8 (N, size, size, 3), centre-cropped to a square and resized, and their captions:
    the text of NAME.txt beside each NAME.png, or `caption` for all."""
    if not folder.is_dir():
        raise UserError(f"--data: {folder} is not a folder (give a folder of images, or 'scenes')")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"--data: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    images, captions = np.empty((len(paths), size, size, 3), dtype=np.uint8), []
    for i, path in enumerate(paths):
        image = open_rgb(path)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        images[i] = np.asarray(image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS))
        text = path.with_suffix(".txt")
        if caption is None and not text.exists():
            raise UserError(f"{path.name} has no caption: write {text.name} beside it, or pass --caption")
        try:
            captions.append(caption if caption is not None else text.read_text(encoding="utf-8").strip())
        except (UnicodeDecodeError, OSError) as e:
            raise UserError(f"{text}: not a readable UTF-8 caption ({e})") from None
    return images, captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of q(z|x) for every image, unscaled: computed once, so training samples z without the encoder."""
    posteriors = [vae.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([p.mean for p in posteriors]).float(), torch.cat([p.std for p in posteriors]).float()


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    out = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        out.paste(image, ((i % columns) * w, (i // columns) * h))
    return out


# --- the stages ---

def train_vae(images: torch.Tensor, vae_config: VAEConfig, kl_weight: float, config: TrainConfig,
              out: Path) -> AutoencoderKL:
    """A VAE from scratch; its scaling factor is then set to 1 / std of the latents (Rombach et al. sec. 4.3.2)."""
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(vae_config)
    shown = images[:8]

    def sample(ema: AutoencoderKL) -> Image.Image:  # originals above, reconstructions below
        with torch.no_grad():
            pixels = torch.cat([shown, ema.decode(ema.encode(shown).mean)]).clamp(-1, 1)
        return grid(tensor_to_images(pixels), columns=len(shown))

    trainer = Trainer("vae", vae, lambda model, g: vae_loss(model, images, kl_weight, g, config.batch_size),
                      config, out, sample)
    trainer.resume()
    vae = trainer.run().eval()
    mean, std = encode(vae, images)
    vae.config.scaling_factor = round(1 / mean.std().item(), 5)
    return vae


def train_text_to_image(pipe: Pipeline, images: torch.Tensor, captions: list[str], config: TrainConfig, out: Path,
                        train_text_encoder: bool, prompts: list[str]) -> Pipeline:
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

    def sample(ema: TextToImage) -> Image.Image:  # each prompt in a column, two seeds
        sampling = Pipeline(pipe.tokenizer, ema.text_encoder, ema.unet, pipe.vae, pipe.scheduler_config,
                            pipe.default_size, pipe.name)
        runs, images = [(seed, prompt) for seed in (0, 1) for prompt in prompts], []
        progress = Progress("samples", "image")
        for seed, prompt in runs:
            images += sampling.txt2img(prompt, steps=20, seed=seed)
            progress(len(images), len(runs))
        return grid(images, columns=len(prompts))

    loss = text_to_image_loss((mean * scale, std * scale), ids, empty_ids, alpha_bar, prediction_type,
                              config.batch_size)
    trainer = Trainer("unet", model, loss, config, out, sample if config.sample_every else None)
    trainer.resume()
    ema = trainer.run().eval().requires_grad_(False)
    pipe.text_encoder, pipe.unet = ema.text_encoder, ema.unet
    return pipe


def train_pixel(images: torch.Tensor, unet_config: UNetConfig, config: TrainConfig, out: Path) -> UNet:
    """An unconditional UNet on the images themselves: DDPM as Ho et al. 2020 trained it (CIFAR-10, CelebA-HQ)."""
    torch.manual_seed(config.seed)
    unet = UNet(unet_config)
    alpha_bar = alphas_cumprod(schedule_of(DDPM_SCHEDULE))
    size = images.shape[-1]

    def sample(ema: UNet) -> Image.Image:
        return grid(tensor_to_images(sample_pixels(ema, DDPM_SCHEDULE, 8, size, steps=50, seed=0)), columns=8)

    trainer = Trainer("pixel-unet", unet, pixel_loss(images, alpha_bar, config.batch_size), config, out, sample)
    trainer.resume()
    return trainer.run().eval()


@torch.no_grad()
def sample_pixels(unet: UNet, scheduler_config: dict, n: int, size: int, steps: int, seed: int) -> torch.Tensor:
    """The sampling loop of an unconditional pixel model: x_T ~ N(0, I), then the sampler's steps to x_0."""
    generator = torch.Generator().manual_seed(seed)
    sampler = samplers.make(samplers.CLASS_NAMES[scheduler_config["_class_name"]], scheduler_config)
    x = torch.randn(n, unet.config.in_channels, size, size, generator=generator) * sampler.init_sigma
    for t in sampler.set_timesteps(steps):
        x = sampler.step(unet(sampler.scale_input(x, t), t, null_context(unet, n)), t, x, generator)
    return x.clamp(-1, 1)


def tensor_to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> PIL images."""
    arrays = ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def schedule_of(scheduler_config: dict) -> TrainingSchedule:
    return TrainingSchedule(**{k: v for k, v in scheduler_config.items() if k in TrainingSchedule.__dataclass_fields__})


def new_pipeline(vae: AutoencoderKL, size: int, seed: int, name: str) -> Pipeline:
    """A text-to-image pipeline at init: the default model's text encoder and UNet with the given trained VAE."""
    torch.manual_seed(seed)
    unet_config = UNetConfig(**{**asdict(DEFAULT_UNET), "in_channels": vae.config.latent_channels,
                                "out_channels": vae.config.latent_channels})
    return Pipeline(Tokenizer.from_vendored(), CLIPTextModel(DEFAULT_TEXT), UNet(unet_config), vae,
                    dict(SD_SCHEDULE), default_size=size, name=name)


# --- saving in the diffusers layout ---

def save_folder(pipe: Pipeline, out: Path, dtype: torch.dtype = torch.float16) -> None:
    """The pipeline as a diffusers folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, with
    the config keys diffusers and transformers use, so that sdlite.load and diffusers' from_pretrained both read it."""
    latent_side = pipe.default_size // pipe.vae_scale
    write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "image_encoder": [None, None], "scheduler": ["diffusers", pipe.scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    save_unet(pipe.unet, out / "unet", latent_side, dtype)
    save_vae(pipe.vae, out / "vae", dtype)
    save_text_encoder(pipe.text_encoder, out / "text_encoder", dtype)
    save_tokenizer(pipe.tokenizer, out / "tokenizer")
    write_json(out / "scheduler" / "scheduler_config.json", {**pipe.scheduler_config, "_diffusers_version": "0.42.1"})


def save_unet(unet: UNet, folder: Path, sample_size: int, dtype: torch.dtype) -> None:
    write_json(folder / "config.json", {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", "sample_size": sample_size,
        **unet.config.to_json()})
    save_weights(unet, folder / "diffusion_pytorch_model.safetensors", dtype)


def save_vae(vae: AutoencoderKL, folder: Path, dtype: torch.dtype) -> None:
    write_json(folder / "config.json", {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", **vae.config.to_json()})
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


# --- the command line ---

def add_command(subparsers, formatter_class=argparse.RawDescriptionHelpFormatter) -> None:
    """The `train` subcommand of python -m sdlite (its --help laid out by formatter_class)."""
    p = subparsers.add_parser("train", help="train a model from scratch, or fine-tune a checkpoint's UNet",
                              description=__doc__.split("\n\n")[1],
                              formatter_class=formatter_class)
    p.add_argument("--data", required=True, help="a folder of images with a NAME.txt caption beside each, or "
                                                 "'scenes': sdlite's generated shapes with their captions")
    p.add_argument("--out", required=True, type=Path, help="output folder: the model (diffusers layout), "
                                                           "samples/, loss logs and train/ (the resumable state)")
    p.add_argument("--model", help="fine-tune this checkpoint's UNet instead of training a new model")
    p.add_argument("--pixel", action="store_true", help="train an unconditional UNet on pixels (no VAE, no text)")
    p.add_argument("--caption", help="one caption for every image of --data")
    p.add_argument("--size", type=int, default=64, help="image side in pixels for a new model, a multiple of 16 "
                   "(4 with --pixel; default: 64; fine-tuning uses the checkpoint's own size)")
    p.add_argument("--scenes", type=int, default=10000, help="number of generated scene images (--data scenes)")
    p.add_argument("--steps", type=int, default=3500, help="UNet training steps")
    p.add_argument("--vae-steps", type=int, default=2000, help="VAE training steps (new latent models)")
    p.add_argument("--batch-size", type=int, default=32, help="UNet batch size")
    p.add_argument("--vae-batch-size", type=int, default=16, help="VAE batch size")
    p.add_argument("--vae-lr", type=float, default=2e-3, help="the VAE's peak learning rate")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the VAE's KL term")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (fine-tuning: use ~1e-5)")
    p.add_argument("--warmup-steps", type=int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the saved EMA weights")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipped to this")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], help="what the UNet predicts "
                   "(default: epsilon for a new model, the checkpoint's own when fine-tuning)")
    p.add_argument("--train-text-encoder", action="store_true", help="train the text encoder with the UNet "
                                                                     "(SD keeps CLIP frozen)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--sample-every", type=int, default=500, help="steps between sample grids (0: none)")
    p.add_argument("--save-every", type=int, default=500, help="steps between resumable checkpoints")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and noise")
    p.set_defaults(run=run)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse every setting that would crash the run, silently do nothing, or train on NaN."""
    at_least = {"--steps": (args.steps, 1), "--vae-steps": (args.vae_steps, 1), "--batch-size": (args.batch_size, 1),
                "--vae-batch-size": (args.vae_batch_size, 1), "--save-every": (args.save_every, 1),
                "--scenes": (args.scenes, 1), "--warmup-steps": (args.warmup_steps, 0),
                "--sample-every": (args.sample_every, 0),
                "--threads": (1 if args.threads is None else args.threads, 1)}
    for flag, (value, least) in at_least.items():
        if value < least:
            raise UserError(f"{flag} must be at least {least}, not {value}")
    positive = {"--lr": args.lr, "--vae-lr": args.vae_lr, "--grad-clip": args.grad_clip}
    for flag, value in positive.items():
        if not 0 < value < math.inf:
            raise UserError(f"{flag} must be a finite number above 0, not {value}")
    if not 0 <= args.kl_weight < math.inf:
        raise UserError(f"--kl-weight must be a finite number of 0 or more, not {args.kl_weight}")
    if not 0 <= args.ema_decay <= 1:
        raise UserError(f"--ema-decay must be between 0 and 1, not {args.ema_decay}")
    if args.caption is not None:
        check_text("--caption", args.caption)
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be an integer from 0 to 2**32 - 1, not {args.seed}")
    side = 4 if args.pixel else 16   # halved by each UNet level (and by the VAE's 8 first for a latent model)
    if args.model is None and (args.size < side or args.size % side):
        raise UserError(f"--size must be a positive multiple of {side}, not {args.size}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out: {args.out} is a file: name a folder (new, or a run's to resume it)")
    if args.model and args.out.exists() and Path(args.model).expanduser().resolve() == args.out.resolve():
        raise UserError(f"--out is the --model folder {args.model}: the weights being read would be overwritten; "
                        "name another folder")


def run(args: argparse.Namespace) -> None:
    """Whatever --out/train/ holds is resumed: a finished stage is not trained again."""
    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {args.out}: {e.strerror}") from None
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         grad_clip=args.grad_clip, ema_decay=args.ema_decay, bf16=args.bf16, seed=args.seed,
                         sample_every=args.sample_every, save_every=args.save_every)
    pipe = None
    if args.model:
        pipe = load(args.model)
    size = pipe.default_size if pipe else args.size
    if args.data == "scenes":
        images, captions = scenes.dataset(args.scenes, scenes.split()[0], size, seed=args.seed)
    else:
        caption = "" if args.pixel and args.caption is None else args.caption  # the pixel model reads no captions
        images, captions = read_folder(Path(args.data), size, caption)
    images = to_tensor(images)
    print(f"{len(images)} images of {size} x {size}", flush=True)
    if args.pixel:
        unet = train_pixel(images, PIXEL_UNET, config, args.out)
        save_unet(unet, args.out / "unet", size, torch.float32)
        write_json(args.out / "scheduler" / "scheduler_config.json", DDPM_SCHEDULE)
        return
    if pipe is None:
        vae_training = TrainConfig(**{**asdict(config), "steps": args.vae_steps, "batch_size": args.vae_batch_size,
                                      "lr": args.vae_lr})
        vae_config = VAEConfig(**{**asdict(DEFAULT_VAE), "sample_size": size})
        vae = train_vae(images, vae_config, args.kl_weight, vae_training, args.out)
        pipe = new_pipeline(vae, size, args.seed, args.out.name)
    if args.prediction_type:
        pipe.scheduler_config["prediction_type"] = args.prediction_type
    pipe = train_text_to_image(pipe, images, captions, config, args.out, args.train_text_encoder,
                               SAMPLE_PROMPTS if args.data == "scenes" else captions[:6])
    save_folder(pipe, args.out)
    print(f"saved {args.out}", flush=True)
