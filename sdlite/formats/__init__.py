"""Checkpoint formats, read and written side by side, and the model families' conventions.

  families.py   one record per model family: pad id, scheduler config, prediction type, image size, UNet inputs
  ldm.py        the original single file (model.diffusion_model.* ...): key mappers to sdlite's modules and back
  diffusers.py  the diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/): its files read and written

sdlite.checkpoint opens a checkpoint, tells its layout and family, and builds the modules with these.
"""
