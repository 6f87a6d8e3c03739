"""Training Stable Diffusion's three networks, from scratch or from a checkpoint, on a 2-core CPU if need be.

    python -m sdlite train --data scenes --out weights/my-default         # VAE, then text-to-image UNet, from scratch
    python -m sdlite train --data photos/ --model weights/default --out weights/photos    # fine-tune a model's UNet
    python -m sdlite train --data digits/ --pixel --out runs/digits       # unconditional UNet on pixels (plain DDPM)

Read in this order:
  objectives.py  what each stage minimises, as equations: the VAE's reconstruction + KL, DDPM's noise-prediction MSE
                 (or v-prediction), with x_t drawn by the samplers' own forward-noising function
  loop.py        the loop every stage shares (Trainer): AdamW, warm-up then cosine learning rate, gradient clipping,
                 bf16 autocast, EMA weights, a state that resumes where it stopped, data-parallel under torchrun
  stages.py      the stages: a new VAE, a text-to-image UNet on its latents, fine-tuning, a pixel-space DDPM
  data.py        folders of images with captions beside them; scenes.py, the generated shapes the default model was
                 trained on (and the detector that scores what a model draws)
  cli.py         `python -m sdlite train`: flags, checks, which stages run
The trained pipeline is written as a diffusers folder by sdlite/formats/diffusers.py (save_folder; a pixel model as
a DDPMPipeline folder, save_pixel_folder).
Only `python -m sdlite train` imports this package; generation never does.
"""
