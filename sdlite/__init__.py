"""sdlite: Stable Diffusion written by hand in plain PyTorch.

    import sdlite
    pipe = sdlite.load("v1-5-pruned-emaonly.safetensors")     # or a diffusers folder, or a Hub id
    images = pipe.txt2img("a castle", steps=30, seed=42)      # -> list of PIL images
    sdlite.save_png(images[0], "castle.png")                  # with its generation parameters
"""
import importlib

# Imported at first use rather than here, so that importing the package does not import torch: `python -m sdlite`
# then imports torch in sdlite/__main__.py, where a Ctrl-C during those first seconds ends as one line, not a traceback.
WHERE = {"load": ".checkpoint", "Pipeline": ".pipeline", "PixelPipeline": ".pixel", "UserError": ".errors",
         "save_png": ".image", "Request": ".request", "load_controlnet": ".controlnet", "Control": ".controlnet",
         "load_depth_estimator": ".dpt", "save": ".checkpoint"}
__version__ = "0.1.0"
__all__ = list(WHERE)


def __getattr__(name: str):
    """sdlite.load, sdlite.Pipeline, ... (PEP 562: called for names the module does not define)."""
    if name not in WHERE:
        raise AttributeError(f"module 'sdlite' has no attribute {name!r}")
    return getattr(importlib.import_module(WHERE[name], __name__), name)
