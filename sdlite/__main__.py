"""The command line: sdlite txt2img "a castle" --model v1-5-pruned-emaonly.safetensors --out castle.png
(`sdlite` is the console script; `python -m sdlite` is the same)."""
import argparse
import sys
from pathlib import Path

import torch

from . import __version__, prompts, samplers, train
from .checkpoint import load
from .errors import UserError
from .image import save_png
from .lora import find_lora, split_lora_tags
from .progress import Progress

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "default"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default: the value, unless the help text already says what the default is (flags
    whose default is "not given" say what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdlite", description="Stable Diffusion in plain PyTorch",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"sdlite {__version__}")
    commands = p.add_subparsers(dest="command", required=True)
    txt2img = commands.add_parser("txt2img", help="generate images from a prompt", formatter_class=HelpFormatter)
    add_generation_flags(txt2img)
    txt2img.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's own size)")
    txt2img.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's own size)")
    img2img = commands.add_parser("img2img", help="redraw an image after a prompt", formatter_class=HelpFormatter)
    add_generation_flags(img2img)
    img2img.add_argument("--image", type=Path, required=True, help="the starting image (its size, cut to a "
                                                                  "multiple of 8, is the output's)")
    img2img.add_argument("--strength", type=float, default=0.8, help="how much to change it, 0 to 1")
    inpaint = commands.add_parser("inpaint", help="repaint the masked part of an image", formatter_class=HelpFormatter)
    add_generation_flags(inpaint)
    inpaint.add_argument("--image", type=Path, required=True, help="the image to repaint (its size, cut to a "
                                                                  "multiple of 8, is the output's)")
    inpaint.add_argument("--mask", type=Path, required=True, help="white = repaint, black = keep; the image's size")
    inpaint.add_argument("--strength", type=float, default=1.0, help="how much to change the masked part, 0 to 1 "
                                                                     "(1: from pure noise)")
    inpaint.add_argument("--mask-blur", type=float, default=0.0, help="Gaussian blur radius of the mask, in pixels")
    inpaint.add_argument("--keep-unmasked", action="store_true",
                         help="paste the input back outside the mask, so those pixels stay exactly as they were")
    train.add_command(commands, HelpFormatter)
    return p


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.set_defaults(run=generate)
    p.add_argument("prompt", help="what to draw, in the syntax --prompt-syntax names")
    p.add_argument("--model", help="a .safetensors file, a diffusers folder or a Hub id "
                                   "(default: the small model in weights/default)")
    p.add_argument("--negative-prompt", default="",
                   help="what to steer away from (default: none; unused at --guidance-scale 1)")
    p.add_argument("--prompt-syntax", choices=prompts.SYNTAXES, default="a1111",
                   help="a1111: (word) (word:1.3) [word] BREAK, prompts past 75 tokens in chunks; compel: word+ "
                        "(words)1.4 (\"a\", \"b\").blend(0.7, 0.3); plain: the text as it is, cut at 75 tokens")
    p.add_argument("--clip-skip", type=int, default=1, help="take the text encoder's output this many layers from "
                                                            "the end (1: the last layer, 2: the penultimate)")
    p.add_argument("--show-tokens", action="store_true", help="print the prompts' token counts and chunks first")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale (1: none)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="0-1: rescale the guided prediction's spread to the prompt's (Lin et al. 2023), "
                        "for zero-terminal-SNR models (0: off)")
    p.add_argument("--seed", type=int, help="the noise seed (default: a random seed, written into the PNG)")
    p.add_argument("--scheduler", choices=samplers.NAMES, help="the sampler (default: the checkpoint's own)")
    p.add_argument("--batch-size", type=int, default=1, help="images made by one call, from one seed")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override what the checkpoint is taken to predict (default: the checkpoint's own; SD 2.x "
                        "single files: v_prediction)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="precision of the weights and the computation")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--vae-tiling", action="store_true",
                   help="encode and decode images larger than the model's own size in tiles: memory bounded by one "
                        "tile, with possible seams")
    p.add_argument("--embedding", type=Path, action="append", default=[], metavar="PATH",
                   help="a textual-inversion embedding (.pt, .safetensors, .bin), called in the prompt by its file "
                        "name's stem (A1111 files) or the token stored in it (diffusers files); repeatable")
    p.add_argument("--lora", type=lora_flag, action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA (kohya/A1111 or diffusers/PEFT .safetensors) merged at WEIGHT (default 1); repeatable")
    p.add_argument("--lora-dir", type=Path, help="the folder where <lora:NAME:WEIGHT> in the prompt finds "
                                                 "NAME.safetensors (A1111's models/Lora)")
    p.add_argument("--out", type=Path, help="output PNG; with --batch-size N, NAME-0.png ... NAME-(N-1).png "
                                            "(default: COMMAND-SEED.png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def generate(args: argparse.Namespace) -> None:
    """txt2img, img2img and inpaint: load, generate, write the PNGs."""
    model = args.model or DEFAULT_MODEL
    if args.model is None and not DEFAULT_MODEL.exists():
        raise UserError(f"no --model given and no default model at {DEFAULT_MODEL}")
    for flag in ("image", "mask"):
        path = getattr(args, flag, None)
        if path is not None and not path.is_file():
            raise UserError(f"--{flag}: no such file: {path}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tagged = []
    if args.prompt_syntax == "a1111":   # <lora:NAME:WEIGHT> is A1111's syntax
        args.prompt, tagged = split_lora_tags(args.prompt)
    if tagged and args.lora_dir is None:
        raise UserError(f"the prompt names LoRAs (<lora:{tagged[0][0]}:...>): give their folder with --lora-dir")
    loras = args.lora + [(find_lora(args.lora_dir, name), weight) for name, weight in tagged]
    for flag, path in [("embedding", path) for path in args.embedding] + [("lora", path) for path, _ in loras]:
        if not path.is_file():
            raise UserError(f"--{flag}: no such file: {path}")
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**32, ()).item())
    outputs = output_paths(args.out or Path(f"{args.command}-{seed}.png"), args.batch_size, args.overwrite)
    pipe = load(model, dtype=DTYPES[args.dtype], device=args.device, prediction_type=args.prediction_type)
    pipe.vae.tiling = args.vae_tiling
    for path in args.embedding:
        pipe.load_embedding(path)
    for path, weight in loras:
        pipe.load_lora(path, weight)
    for name, text in (("prompt", args.prompt), ("negative prompt", args.negative_prompt)):
        if args.show_tokens:
            print(f"{name}: {prompts.describe(pipe.tokenizer, text, args.prompt_syntax)}")
        dropped = prompts.windows(pipe.tokenizer, text, args.prompt_syntax)[2]
        if dropped and not args.quiet:
            print(f"warning: the {name}'s last {dropped} tokens are past the 75 that --prompt-syntax "
                  f"{args.prompt_syntax} keeps (--prompt-syntax a1111 encodes them all)", file=sys.stderr)
    settings = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                    guidance_rescale=args.guidance_rescale, seed=seed, scheduler=args.scheduler,
                    batch_size=args.batch_size, progress=Progress(args.command, quiet=args.quiet),
                    prompt_syntax=args.prompt_syntax, clip_skip=args.clip_skip)
    if args.command == "txt2img":
        images = pipe.txt2img(args.prompt, width=args.width, height=args.height, **settings)
    elif args.command == "img2img":
        images = pipe.img2img(args.prompt, args.image, strength=args.strength, **settings)
    else:
        images = pipe.inpaint(args.prompt, args.image, args.mask, strength=args.strength, mask_blur=args.mask_blur,
                              keep_unmasked=args.keep_unmasked, **settings)
    for image, path in zip(images, outputs):
        save_png(image, path, overwrite=args.overwrite)
        print(path)


def lora_flag(text: str) -> tuple[Path, float]:
    """--lora PATH or PATH:WEIGHT; a path may hold colons itself, so only a number after the last one is a weight."""
    path, _, weight = text.rpartition(":")
    try:
        return Path(path), float(weight)
    except ValueError:
        return Path(text), 1.0


def output_paths(out: Path, batch_size: int, overwrite: bool) -> list[Path]:
    """Where each image goes, refused up front if a file is already there (and --overwrite not given)."""
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, not {out}")
    if not out.parent.is_dir():
        raise UserError(f"--out: folder {out.parent} does not exist")
    paths = [out] if batch_size == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(batch_size)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists: choose another --out or pass --overwrite")
    return paths


if __name__ == "__main__":
    sys.exit(main())
