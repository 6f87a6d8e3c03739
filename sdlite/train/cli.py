"""`python -m sdlite train`: the flags, the checks that refuse a run before it starts, and which stages run.

    python -m sdlite train --data scenes --out weights/my-default         # VAE, then text-to-image UNet, from scratch
    python -m sdlite train --data photos/ --model weights/default --out weights/photos    # fine-tune a model's UNet
    python -m sdlite train --data digits/ --pixel --out runs/digits       # unconditional UNet on pixels (plain DDPM)

A new latent model is a VAE (stages.train_vae) and then a text-to-image UNet on its latents; --model fine-tunes a
checkpoint's UNet; --pixel trains DDPM on the images themselves. What --out/train/ holds is resumed.
"""
import argparse
import gc
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import load
from ..errors import UserError
from ..formats.diffusers import save_folder, save_pixel_folder
from ..formats.families import SDLITE_TINY
from ..image import to_tensor
from ..request import check_text
from ..unet2d import UNet2DConfig
from ..vae import VAEConfig
from . import scenes
from .data import read_folder, with_channels
from .loop import TrainConfig, process_group
from .objectives import DISTANCES
from .stages import (DEFAULT_VAE, PIXEL_UNET, new_pipeline, train_pixel, train_text_to_image,
                     train_vae)

SAMPLE_PROMPTS = ["a red circle", "a blue square on the left", "a small green triangle at the top right",
                  "a large yellow circle at the bottom", "a purple square in the middle", "a small orange circle"]


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
    p.add_argument("--size", type=int, default=SDLITE_TINY.image_size, help="image side in pixels for a new model, a multiple of 16 "
                   "(4 with --pixel; default: 64; fine-tuning uses the checkpoint's own size)")
    p.add_argument("--scenes", type=int, default=10000, help="number of generated scene images (--data scenes)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=3500, help="UNet training steps")
    length.add_argument("--epochs", type=float, help="UNet training length in passes over the data instead of "
                                                     "--steps: epochs x images / batch size steps, rounded up")
    p.add_argument("--vae-steps", type=int, default=2000, help="VAE training steps (new latent models)")
    p.add_argument("--batch-size", type=int, default=32, help="UNet batch size")
    p.add_argument("--vae-batch-size", type=int, default=16, help="VAE batch size")
    p.add_argument("--vae-lr", type=float, default=2e-3, help="the VAE's peak learning rate")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the VAE's KL term")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (fine-tuning: use ~1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    p.add_argument("--loss", choices=list(DISTANCES), default="mse", help="the UNet's error: squared (DDPM's), "
                   "absolute, or Huber's")
    p.add_argument("--flip", action="store_true", help="mirror each training image left-right at random (--pixel)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="--pixel: the image channels (default: 1 if every "
                   "image of --data is grey, else 3)")
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
    if args.epochs is not None and not 0 < args.epochs < math.inf:
        raise UserError(f"--epochs must be a finite number above 0, not {args.epochs}")
    if not 0 <= args.weight_decay < math.inf:
        raise UserError(f"--weight-decay must be a finite number of 0 or more, not {args.weight_decay}")
    if not args.pixel and (args.flip or args.channels):
        raise UserError(f"{'--flip' if args.flip else '--channels'} is an option of --pixel training only")
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
    """Whatever --out/train/ holds is resumed: a finished stage is not trained again. Started by torchrun (WORLD_SIZE
    processes), the run is data-parallel over them (loop.py); process 0 writes the files."""
    check_arguments(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")   # torchrun's rendezvous (MASTER_ADDR, RANK, ...); the trainer runs on the CPU
        try:
            train(args)
            gc.collect()   # the trainers' DistributedDataParallel freed while the process group lives (freed at exit,
            dist.barrier()  # after it, one aborts the process: 'terminate called without an active exception')
        finally:
            dist.destroy_process_group()
    else:
        train(args)


def train(args: argparse.Namespace) -> None:
    """Read the data, train the stages, save the model."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {args.out}: {e.strerror}") from None
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         weight_decay=args.weight_decay, grad_clip=args.grad_clip, ema_decay=args.ema_decay,
                         bf16=args.bf16, seed=args.seed, sample_every=args.sample_every, save_every=args.save_every)
    pipe = None
    if args.model:
        pipe = load(args.model)
    size = pipe.default_size if pipe else args.size
    if args.data == "scenes":
        images, captions = scenes.dataset(args.scenes, scenes.split()[0], size, seed=args.seed)
    else:
        caption = "" if args.pixel and args.caption is None else args.caption  # the pixel model reads no captions
        images, captions = read_folder(Path(args.data), size, caption)
    images = to_tensor(with_channels(images, args.channels) if args.pixel else images)
    if process_group()[0] == 0:
        print(f"{len(images)} images of {size} x {size}", flush=True)
    if args.epochs is not None:
        config.steps = math.ceil(args.epochs * len(images) / args.batch_size)
    if args.pixel:
        channels = images.shape[1]
        unet_config = UNet2DConfig(**{**asdict(PIXEL_UNET), "sample_size": (size, size), "in_channels": channels,
                                      "out_channels": channels})
        pipe = train_pixel(images, unet_config, config, args.out, args.loss, args.flip)
        if process_group()[0] == 0:
            save_pixel_folder(pipe, args.out)
            print(f"saved {args.out}", flush=True)
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
                               SAMPLE_PROMPTS if args.data == "scenes" else captions[:6], args.loss)
    if process_group()[0] == 0:
        save_folder(pipe, args.out)
        print(f"saved {args.out}", flush=True)
