"""The samplers ("schedulers" in diffusers), one registry entry each, built from a checkpoint's scheduler_config.json.

    sampler = make(name, config)        # or make(CLASS_NAMES[config["_class_name"]], config): the checkpoint's own

Every sampler keeps the contract of base.Sampler (set_timesteps, init_sigma, scale_input, step, add_noise), which
base.py states with the loop that drives it. A new sampler is one module here and one Entry in SAMPLERS.
"""
from dataclasses import dataclass, field, fields

from .base import Sampler
from .ddim import DDIM, DDIMConfig
from .ddpm import DDPM, DDPMConfig
from .dpm_solver import DPMSolver, DPMSolverConfig
from .euler import Euler, EulerConfig
from .euler_ancestral import EulerAncestral, EulerAncestralConfig
from .lms import LMS, LMSConfig
from .pndm import PNDM, PNDMConfig
from .training_schedule import NotImplementedOption, TrainingSchedule
from .unipc import UniPC, UniPCConfig


@dataclass(frozen=True)
class Entry:
    """One sampler, as sdlite, diffusers and AUTOMATIC1111 name it."""
    name: str                       # sdlite's: --scheduler NAME, scheduler="NAME"
    sampler: type[Sampler]
    config: type[TrainingSchedule]  # the scheduler_config.json keys the sampler reads, with its defaults
    reproduces: str                 # the diffusers scheduler class it matches (a scheduler_config.json's _class_name)
    a1111: str                      # AUTOMATIC1111's sampler name, for the PNG metadata (image.py)
    schedule_type: str | None       # and A1111's "Schedule type", None where it does not apply
    fixed: dict = field(default_factory=dict)  # the config values the name fixes


# A1111 (>= 1.9) runs DDIM, PLMS and UniPC on timesteps, where a schedule type does not apply (it writes none that
# means anything); Euler, Euler a, LMS and DPM++ 2M step through sigmas spaced as the timesteps are ("Uniform") or
# Karras's. A1111 has no DDPM: its name is written as it is, which A1111's parser keeps as the sampler's name.
SAMPLERS = {entry.name: entry for entry in [
    Entry("pndm", PNDM, PNDMConfig, "PNDMScheduler", "PLMS", None),
    Entry("lms", LMS, LMSConfig, "LMSDiscreteScheduler", "LMS", "Uniform"),
    Entry("ddim", DDIM, DDIMConfig, "DDIMScheduler", "DDIM", None),
    Entry("unipc", UniPC, UniPCConfig, "UniPCMultistepScheduler", "UniPC", None),
    Entry("euler", Euler, EulerConfig, "EulerDiscreteScheduler", "Euler", "Uniform"),
    Entry("euler_a", EulerAncestral, EulerAncestralConfig, "EulerAncestralDiscreteScheduler", "Euler a", "Uniform"),
    Entry("dpmpp_2m", DPMSolver, DPMSolverConfig, "DPMSolverMultistepScheduler", "DPM++ 2M", "Uniform"),
    Entry("dpmpp_2m_karras", DPMSolver, DPMSolverConfig, "DPMSolverMultistepScheduler", "DPM++ 2M", "Karras",
          fixed={"use_karras_sigmas": True}),
    Entry("ddpm", DDPM, DDPMConfig, "DDPMScheduler", "DDPM", None),
]}
NAMES = tuple(SAMPLERS)
# A scheduler_config.json's _class_name -> the sampler that reproduces that class as the config says (nothing fixed).
CLASS_NAMES = {entry.reproduces: entry.name for entry in SAMPLERS.values() if not entry.fixed}


def own(config: dict, default_class: str) -> str:
    """The sampler that reproduces a scheduler config's own class (its _class_name, default_class if absent: the
    class the model's diffusers pipeline would have built); a class sdlite has none for is refused in one line."""
    class_name = config.get("_class_name", default_class)
    if class_name not in CLASS_NAMES:
        raise NotImplementedOption(f"the model's scheduler {class_name} is not implemented: choose one with "
                                   "--scheduler")
    return CLASS_NAMES[class_name]


def make(name: str, config: dict) -> Sampler:
    """The sampler `name` for a diffusers scheduler config (of any scheduler class), as diffusers'
    TargetClass.from_config(config) builds it: the keys the sampler knows are taken from config, the others keep the
    sampler's own defaults (which differ between samplers, e.g. timestep_spacing). Keys listed in the config's
    _use_default_values count as absent. Options of the reference that sdlite does not implement are refused.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: one of {', '.join(NAMES)}")
    entry = SAMPLERS[name]
    given = {k: v for k, v in config.items() if k not in config.get("_use_default_values", [])}
    for key, accepted in entry.config.only.items():
        if key in given and given[key] not in accepted:
            raise NotImplementedOption(f"scheduler config: {name} does not implement {key}={given[key]!r} "
                                     f"(only {', '.join(map(repr, accepted))}): choose another --scheduler")
    known = {f.name for f in fields(entry.config)}
    return entry.sampler(entry.config(**{**{k: v for k, v in given.items() if k in known}, **entry.fixed}))


def as_pipelines_see_it(name: str, config: dict, inpainting: bool = False) -> dict:
    """The scheduler config that diffusers' Stable Diffusion pipelines give the sampler `name`: their __init__
    rewrites the checkpoint's scheduler config to steps_offset 1 and (txt2img and img2img, not inpainting)
    clip_sample off where the checkpoint's own scheduler would clip. A rewritten key reaches another sampler (one
    swapped in with from_config) only if the file gave it; keys the file left out take that sampler's defaults."""
    given = {k: v for k, v in config.items() if k not in config.get("_use_default_values", [])}
    own = CLASS_NAMES.get(given.get("_class_name", "PNDMScheduler"))
    own_defaults = SAMPLERS[own].config if own else None
    rewrites = {"steps_offset": 1}
    if not inpainting and given.get("clip_sample", getattr(own_defaults, "clip_sample", False)):
        rewrites["clip_sample"] = False
    return {**given, **{k: v for k, v in rewrites.items() if k in given or name == own}}
