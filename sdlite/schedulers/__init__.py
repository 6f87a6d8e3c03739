"""The samplers ("schedulers" in diffusers), by name, built from a checkpoint's scheduler_config.json.

Every sampler has the same small interface, so the denoising loop never asks which one it has:

    sampler = make(name, config)                        # or make(CLASS_NAMES[config["_class_name"]], config)
    timesteps = sampler.set_timesteps(n, strength)      # the timesteps to run; strength < 1 (img2img) skips the first
    x = noise * sampler.init_sigma                      # txt2img; img2img: x = sampler.add_noise(x0, noise,
                                                        #   timesteps[:1].repeat(batch))
    for t in timesteps:
        model_output = unet(sampler.scale_input(x, t), t)   # eps, v or x_0, as the config's prediction_type says
        x = sampler.step(model_output, t, x, generator)     # DDPM and Euler ancestral draw noise from generator

set_timesteps resets the sampler's state (its place in the schedule, the multistep methods' history, and for the
k-diffusion samplers init_sigma): call it before each run, then step once per timestep, in order.
add_noise(x0, noise, t) noises x0 to the timesteps t (one per batch item). The samplers that step through sigmas
(LMS, Euler, Euler ancestral, DPM-Solver++, UniPC) use the noise level of their current step instead, as the
reference does: the same when t is the current timestep (img2img's first, or the inpainting loop's next after a step).
"""
import dataclasses

from .ddim import DDIM, DDIMConfig
from .ddpm import DDPM, DDPMConfig
from .dpm_solver import DPMSolver, DPMSolverConfig
from .euler import Euler, EulerConfig
from .euler_ancestral import EulerAncestral, EulerAncestralConfig
from .lms import LMS, LMSConfig
from .pndm import PNDM, PNDMConfig
from . import schedule
from .unipc import UniPC, UniPCConfig

# name -> (sampler, its config, the config values the name fixes)
SAMPLERS = {
    "pndm": (PNDM, PNDMConfig, {}),
    "lms": (LMS, LMSConfig, {}),
    "ddim": (DDIM, DDIMConfig, {}),
    "unipc": (UniPC, UniPCConfig, {}),
    "euler": (Euler, EulerConfig, {}),
    "euler_a": (EulerAncestral, EulerAncestralConfig, {}),
    "dpmpp_2m": (DPMSolver, DPMSolverConfig, {}),
    "dpmpp_2m_karras": (DPMSolver, DPMSolverConfig, {"use_karras_sigmas": True}),
    "ddpm": (DDPM, DDPMConfig, {}),
}
NAMES = tuple(SAMPLERS)

# A scheduler_config.json's _class_name -> the name of our sampler that reproduces it.
CLASS_NAMES = {
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms",
    "DDIMScheduler": "ddim",
    "UniPCMultistepScheduler": "unipc",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DDPMScheduler": "ddpm",
}


def make(name: str, config: dict):
    """The sampler `name` for a diffusers scheduler config (of any scheduler class), as diffusers'
    TargetClass.from_config(config) builds it: the keys the sampler knows are taken from config, the others keep the
    sampler's own defaults (which differ between samplers, e.g. timestep_spacing). Keys listed in the config's
    _use_default_values count as absent. Options of the reference that sdlite does not implement are refused.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: one of {', '.join(NAMES)}")
    sampler, config_class, fixed = SAMPLERS[name]
    given = {k: v for k, v in config.items() if k not in config.get("_use_default_values", [])}
    for key, accepted in config_class.only.items():
        if key in given and given[key] not in accepted:
            raise schedule.NotImplementedOption(f"scheduler config: {name} does not implement {key}={given[key]!r} "
                                                f"(only {', '.join(map(repr, accepted))}): choose another --scheduler")
    known = {f.name for f in dataclasses.fields(config_class)}
    return sampler(config_class(**{**{k: v for k, v in given.items() if k in known}, **fixed}))


def as_pipelines_see_it(name: str, config: dict, inpainting: bool = False) -> dict:
    """The scheduler config that diffusers' Stable Diffusion pipelines give the sampler `name`: their __init__
    rewrites the checkpoint's scheduler config to steps_offset 1 and (txt2img and img2img, not inpainting)
    clip_sample off where the checkpoint's own scheduler would clip. A rewritten key reaches another sampler (one
    swapped in with from_config) only if the file gave it; keys the file left out take that sampler's defaults."""
    given = {k: v for k, v in config.items() if k not in config.get("_use_default_values", [])}
    own = CLASS_NAMES.get(given.get("_class_name", "PNDMScheduler"))
    own_defaults = SAMPLERS[own][1] if own else None
    rewrites = {"steps_offset": 1}
    if not inpainting and given.get("clip_sample", getattr(own_defaults, "clip_sample", False)):
        rewrites["clip_sample"] = False
    return {**given, **{k: v for k, v in rewrites.items() if k in given or name == own}}
