"""sdlite: Stable Diffusion written by hand in plain PyTorch.

    import sdlite
    pipe = sdlite.load("v1-5-pruned-emaonly.safetensors")     # or a diffusers folder, or a Hub id
    images = pipe.txt2img("a castle", steps=30, seed=42)      # -> list of PIL images
    sdlite.save_png(images[0], "castle.png")                  # with its generation parameters
"""
from .checkpoint import load
from .errors import UserError
from .image import save_png
from .pipeline import Pipeline

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "UserError", "save_png"]
