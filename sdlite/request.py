"""What one generation is asked for: the settings, checked once when the request is made, used by the API and the
command line alike, and written into the PNG at save time.

    request = Request("a castle", negative_prompt="blurry", steps=30, seed=42)
    images = pipe.generate(request)                          # txt2img; image=... img2img; image=..., mask=... inpaint

A setting that the loop would silently replace or turn into garbage is refused here (UserError, one line). What
depends on the model is left None until the pipeline fills it in (Pipeline.complete): the sampler (the checkpoint's
own) and the size (the model's own, or the input image's), which it checks against the model.
"""
import math
import random
from dataclasses import dataclass, field

from . import samplers
from .errors import UserError
from .controlnet import Control
from .image import generation_parameters
from .lora import split_lora_tags


@dataclass
class Request:
    prompt: str                       # as typed: A1111's <lora:NAME:WEIGHT> tags stay in it (and in the PNG)
    negative_prompt: str = ""         # unused (and not written) at guidance_scale 1 or less
    steps: int = 50
    guidance_scale: float = 7.5       # classifier-free guidance (Ho & Salimans 2022, eq. 6); 1 or less: unguided
    guidance_rescale: float = 0.0     # Lin et al. 2023, sec. 3.4 (rescale_guidance); 0: off
    width: int | None = None          # pixels; None: the model's own size, or the input image's
    height: int | None = None
    seed: int | None = None           # None: a random seed, drawn here (so that the PNG can name it)
    sampler: str | None = None        # a name of samplers.NAMES; None: the checkpoint's own
    batch_size: int = 1               # images from one seed
    prompt_syntax: str = "plain"      # prompts.SYNTAXES: "plain", "a1111" or "compel"
    clip_skip: int = 1                # the text encoder's output taken this many layers from the end
    strength: float | None = None     # img2img and inpainting: how far into the schedule the image is noised
    controls: list[Control] = field(default_factory=list)   # ControlNets and their images (controlnet.py)
    guess_mode: bool = False          # ControlNets on the conditional half only, residuals scaled 0.1 .. 1

    def __post_init__(self):
        check_text("prompt", self.prompt)
        check_text("negative prompt", self.negative_prompt)
        if self.sampler is not None and self.sampler not in samplers.NAMES:
            raise UserError(f"unknown scheduler {self.sampler!r}: choose one of {', '.join(samplers.NAMES)}")
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, not {self.steps}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, not {self.batch_size}")
        if self.strength is not None and not 0 <= self.strength <= 1:
            raise UserError(f"strength must be between 0 and 1, not {self.strength}")
        if not (isinstance(self.guidance_scale, (int, float)) and 0 <= self.guidance_scale < math.inf):
            raise UserError(f"guidance scale must be a finite number of 0 or more (1 or less: unguided), "
                            f"not {self.guidance_scale}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise UserError(f"seed must be an integer from 0 to 2**64 - 1, not {self.seed}")
        if not 0 <= self.guidance_rescale <= 1:
            raise UserError(f"guidance rescale must be between 0 and 1, not {self.guidance_rescale}")
        if not all(isinstance(control, Control) for control in self.controls):
            raise UserError("control must be a list of sdlite.Control(controlnet, image, scale, start, end)")
        if not isinstance(self.guess_mode, bool):
            raise UserError(f"guess mode must be True or False, not {self.guess_mode!r}")
        if self.prompt_syntax == "a1111":
            split_lora_tags(self.prompt)   # a malformed <lora:...> tag is refused now, not after the model loads
        if self.seed is None:
            self.seed = random.randrange(2**32)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1

    @property
    def lora_tags(self) -> list[tuple[str, float]]:
        """The (name, weight) of each <lora:NAME:WEIGHT> in the prompt (A1111's syntax only)."""
        return split_lora_tags(self.prompt)[1] if self.prompt_syntax == "a1111" else []

    @property
    def text(self) -> str:
        """The prompt the text encoder reads: without the <lora:...> tags, which A1111 takes out (A1111's syntax)."""
        return split_lora_tags(self.prompt)[0] if self.prompt_syntax == "a1111" else self.prompt

    def parameters(self, model: dict, extensions: dict | None = None) -> str:
        """The PNG "parameters" text A1111 writes for this request; `model` holds the fields the pipeline knows
        (Model hash, Model, Lora hashes, TI hashes), `extensions` those A1111's extensions add after them
        ("ControlNet 0", ...). The size and sampler must have been filled in."""
        fields = {"Steps": self.steps, "Sampler": self.sampler, "CFG scale": self.guidance_scale, "Seed": self.seed,
                  "Size": f"{self.width}x{self.height}", "Model hash": model.get("Model hash"),
                  "Model": model.get("Model"), "Denoising strength": self.strength,
                  "Clip skip": self.clip_skip if self.clip_skip > 1 else None,
                  "Guidance rescale": self.guidance_rescale or None,
                  "Lora hashes": model.get("Lora hashes"), "TI hashes": model.get("TI hashes")} | (extensions or {})
        return generation_parameters(self.prompt, self.negative_prompt if self.guided else "", fields)


def check_text(what: str, text: str) -> None:
    if not isinstance(text, str):
        raise UserError(f"the {what} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:   # bytes that were not UTF-8 in argv arrive as lone surrogates
        raise UserError(f"the {what} is not valid UTF-8 text: {text.encode('utf-8', 'replace')[:60]!r}") from None
