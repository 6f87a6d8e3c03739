"""The command line: sdlite txt2img "a castle" --model v1-5-pruned-emaonly.safetensors --out castle.png
(`sdlite` is the console script; `python -m sdlite` is the same)."""
import os
import signal
import sys


def interrupted_while_starting(signum, frame):
    """Ctrl-C while torch is imported (the first seconds) ends at once: some imports swallow KeyboardInterrupt."""
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(130)


# Only as the program (python -m sdlite, or the `sdlite` console script, which imports this module to call main),
# and only if Ctrl-C is not ignored (as in a background job).
starting = ((__name__ == "__main__" or os.path.basename(sys.argv[0]) == "sdlite")
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
if starting:
    signal.signal(signal.SIGINT, interrupted_while_starting)

import argparse
import re
import sysconfig
import warnings
from pathlib import Path

import torch

from . import __version__, prompts, samplers, schedule
from .checkpoint import check_replaceable, load, resolve, save
from .controlnet import Control, load_controlnet
from .errors import UserError
from .formats.diffusers import read_json
from .image import check_writable, open_rgb, save_png, to_images
from .lora import find_lora
from .pixel import PixelPipeline, is_pixel_folder
from .preprocess import canny_image
from .preview import Preview, approximate_rgb
from .request import Request
from .progress import Progress

if starting:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on Ctrl-C raises KeyboardInterrupt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_HELP = ("precision of the weights and the computation; on a CPU bf16 is faster than fp32 only with AVX-512 BF16 "
              "or AMX, fp16 only with AVX-512 FP16 (elsewhere up to 100x slower, with a warning)")
GENERATION_COMMANDS = ("txt2img", "img2img", "inpaint", "depth2img", "sample", "schedule", "convert")


def default_model() -> Path:
    """weights/default of the source tree (a checkout, an editable install), or the copy that `pip install .` puts in
    the installation's data folder (setup.cfg's data_files: PREFIX/share/sdlite/weights/default)."""
    beside_package = Path(__file__).resolve().parent.parent / "weights" / "default"
    installed = [Path(sysconfig.get_path("data", scheme)) / "share" / "sdlite" / "weights" / "default"
                 for scheme in (sysconfig.get_default_scheme(), sysconfig.get_preferred_scheme("user"))]
    return next((path for path in (beside_package, *installed) if (path / "model_index.json").is_file()),
                beside_package)


def main(argv: list[str] | None = None) -> int:
    """Run the command; a mistake ends as one line on stderr and exit status 2, Ctrl-C as one line and 130."""
    argv = sys.argv[1:] if argv is None else argv
    training = not argv or argv[0] not in GENERATION_COMMANDS   # the command comes first (only -h, --version before)
    try:
        args = parser(training).parse_args(argv)
        with warnings.catch_warnings():   # (their filters and display as they were, after)
            warnings.showwarning = show_warning
            if getattr(args, "quiet", False):
                warnings.simplefilter("ignore")
            args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, MemoryError) or "can't allocate memory" in str(e)):  # torch's CPU allocator
            raise
        print("error: out of memory: choose a smaller size or batch", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (sdlite's: a slow precision on this CPU) as one line on stderr, not Python's two with a file name."""
    print(f"warning: {message}", file=sys.stderr)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default: the value, unless the help text already says what the default is (flags
    whose default is "not given" say what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parser(training: bool = True) -> argparse.ArgumentParser:
    """The command line; `train` only if `training`: generating images never imports sdlite.train."""
    p = argparse.ArgumentParser(prog="sdlite", description="Stable Diffusion in plain PyTorch",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"sdlite {__version__}")
    commands = p.add_subparsers(dest="command", required=True)
    txt2img = commands.add_parser("txt2img", help="generate images from a prompt", formatter_class=HelpFormatter)
    add_generation_flags(txt2img)
    txt2img.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's own size)")
    txt2img.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's own size)")
    add_control_flags(txt2img)
    img2img = commands.add_parser("img2img", help="redraw an image after a prompt", formatter_class=HelpFormatter)
    add_generation_flags(img2img)
    img2img.add_argument("--image", type=Path, required=True, help="the starting image (its size, cut to a "
                                                                  "multiple of 8, is the output's)")
    img2img.add_argument("--strength", type=float, default=0.8, help="how much to change it, 0 to 1")
    add_control_flags(img2img)
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
    add_control_flags(inpaint)
    depth2img = commands.add_parser("depth2img", help="redraw an image keeping its depth (SD 2 depth models)",
                                    formatter_class=HelpFormatter)
    add_generation_flags(depth2img)
    depth2img.add_argument("--image", type=Path, required=True, help="the starting image (its size, cut to a "
                                                                    "multiple of 8, is the output's)")
    depth2img.add_argument("--strength", type=float, default=0.8, help="how much to change it, 0 to 1")
    depth2img.add_argument("--depth-map", type=Path, help="the image's depth as a greyscale image, near = bright "
                                                          "(default: estimated by the DPT of --depth-model)")
    depth2img.add_argument("--depth-model", type=Path, help="a DPT folder that estimates the depth when no "
                                                            "--depth-map is given (default: the model folder's "
                                                            "depth_estimator/)")
    sample = commands.add_parser("sample", help="images from a pixel-space DDPM (a DDPMPipeline / DDIMPipeline "
                                                "folder)", formatter_class=HelpFormatter)
    sample.set_defaults(run=sample_images)
    sample.add_argument("--model", required=True, help="a diffusers folder with unet/ (a UNet2DModel) and scheduler/")
    sample.add_argument("--steps", type=int, default=1000, help="sampling steps")
    sample.add_argument("--scheduler", choices=samplers.NAMES, help="the sampler (default: the folder's own)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM's noise, 0 to 1 (1: DDPM's variance)")
    sample.add_argument("--batch-size", type=int, default=1, help="images made by one call, from one seed")
    sample.add_argument("--seed", type=int, help="the noise seed (default: a random seed, written into the PNG)")
    sample.add_argument("--dtype", choices=DTYPES, default="fp32", help=DTYPE_HELP)
    sample.add_argument("--device", default="cpu", help="torch device")
    sample.add_argument("--quiet", action="store_true", help="no progress display, no warnings")
    sample.add_argument("--out", type=Path, help="output PNG; with --batch-size N, NAME-0.png ... NAME-(N-1).png "
                                                 "(default: sample-SEED.png)")
    sample.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_preview_flags(sample, latent=False)
    plan = commands.add_parser("schedule", help="a model's noise schedule and the samplers' timesteps on it",
                               formatter_class=HelpFormatter)
    plan.set_defaults(run=show_schedule)
    plan.add_argument("--model", required=True, help="a .safetensors file, a diffusers folder or a Hub id")
    plan.add_argument("--scheduler", choices=samplers.NAMES, help="only this sampler (default: every one)")
    plan.add_argument("--steps", type=int, default=50, help="sampling steps")
    plan.add_argument("--print", action="store_true", help="list each sampler's timesteps (the default without --plot)")
    plan.add_argument("--plot", type=Path, help="write alpha_bar, sigma and SNR over the training timesteps, the "
                                                "samplers' timesteps marked, to this PNG (needs matplotlib)")
    plan.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    convert = commands.add_parser("convert", help="write a model in the other layout, or in another precision",
                                  formatter_class=HelpFormatter)
    convert.set_defaults(run=convert_model)
    convert.add_argument("model", help="a .safetensors or .ckpt file, a diffusers folder or a Hub id")
    convert.add_argument("out", type=Path, help="NAME.safetensors: one file in the original layout (A1111, ComfyUI); "
                                                "any other name: a diffusers folder")
    convert.add_argument("--dtype", choices=DTYPES, default="fp16",
                         help="precision of the written weights (a bf16 file loaded with --dtype bf16 runs on "
                              "weights packed for oneDNN: faster than bf16 cast from an fp32 file, and less memory)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUT (a folder only if it "
                                                                  "is a model folder)")
    if training:
        from .train.cli import add_command
        add_command(commands, HelpFormatter)
    preprocess = commands.add_parser("preprocess", help="make a control image for a ControlNet",
                                     formatter_class=HelpFormatter)
    kinds = preprocess.add_subparsers(dest="kind", required=True, help="the kind of control image")
    canny = kinds.add_parser("canny", help="Canny edges, as OpenCV's cv2.Canny(image, low, high)",
                             formatter_class=HelpFormatter)
    canny.set_defaults(run=make_control_image)
    canny.add_argument("image", type=Path, help="the image to find the edges of")
    canny.add_argument("--low", type=float, default=100.0, help="gradient magnitude (|dx| + |dy| of the 3x3 Sobel) "
                                                               "above which a pixel joins an edge that is found")
    canny.add_argument("--high", type=float, default=200.0, help="gradient magnitude above which an edge starts")
    canny.add_argument("--out", type=Path, help="output PNG (default: IMAGE-canny.png, IMAGE the input's name)")
    canny.add_argument("--overwrite", action="store_true", help="replace an existing output file")
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
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help=DTYPE_HELP)
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress display, no warnings")
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
    add_preview_flags(p, latent=True)


def add_preview_flags(p: argparse.ArgumentParser, latent: bool) -> None:
    p.add_argument("--preview", type=Path, metavar="FILE.gif", help="write the denoising as an animated GIF: every "
                   "--preview-every step's current image above the image the model predicts from it")
    p.add_argument("--preview-grid", type=Path, metavar="FILE.png", help="write the same frames side by side")
    p.add_argument("--preview-every", type=int, help="steps between preview frames (default: about 10 frames; the "
                                                     "last step is always one)")
    if latent:
        p.add_argument("--preview-fast", action="store_true", help="preview frames by a linear latent-to-RGB map "
                       "(SD 1.x's, as A1111's \"Approx cheap\") at 1/8 detail, instead of a VAE decode each")


def preview_for(args: argparse.Namespace) -> Preview | None:
    """The Preview the --preview flags ask for (its decoder set by the caller), its files checked up front."""
    if args.preview is None and args.preview_grid is None:
        for flag in ("preview_every", "preview_fast"):
            if getattr(args, flag, None) not in (None, False):
                raise UserError(f"--{flag.replace('_', '-')} needs --preview FILE.gif or --preview-grid FILE.png")
        return None
    if args.preview is not None:
        check_outputs(args.preview, 1, args.overwrite, "--preview", ".gif")
    if args.preview_grid is not None:
        check_outputs(args.preview_grid, 1, args.overwrite, "--preview-grid")
    return Preview(to_images, args.preview_every)


def write_preview(preview: Preview | None, args: argparse.Namespace) -> None:
    if preview is None:
        return
    for path, save in ((args.preview, preview.save_gif), (args.preview_grid, preview.save_grid)):
        if path is not None:
            save(path, args.overwrite)
            print(path)


class ControlFlag(argparse.Action):
    """--controlnet PATH starts a control; --control-image, --control-scale, --control-start and --control-end set
    those of the --controlnet before them (each once)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if namespace.controls is None:
            namespace.controls = []
        controls, key = namespace.controls, self.dest.removeprefix("control_")   # image, scale, start, end
        if self.dest == "controlnet":
            controls.append({"controlnet": Path(value)})
            return
        if not controls:
            raise UserError(f"{option_string} must follow the --controlnet it belongs to")
        if key in controls[-1]:
            raise UserError(f"{option_string} given twice for --controlnet {controls[-1]['controlnet']}: give each "
                            "--controlnet its own, after it")
        if key == "image":
            controls[-1]["image"] = Path(value)
            return
        try:
            controls[-1][key] = float(value)
        except ValueError:
            raise UserError(f"{option_string} must be a number, not {value!r}") from None


def add_control_flags(p: argparse.ArgumentParser) -> None:
    p.set_defaults(controls=None)   # the flags below fill it, in the order given
    p.add_argument("--controlnet", action=ControlFlag, metavar="PATH",
                   help="a ControlNet (a diffusers folder or a single file); repeatable, each followed by its own "
                        "--control-image and optional --control-scale / --control-start / --control-end")
    p.add_argument("--control-image", action=ControlFlag, metavar="IMG",
                   help="the control image of the --controlnet before it (edges, depth, pose, ... as it is)")
    p.add_argument("--control-scale", action=ControlFlag, metavar="S",
                   help="the weight of its residuals (default 1)")
    p.add_argument("--control-start", action=ControlFlag, metavar="A",
                   help="the fraction of the steps at which it starts acting (default 0)")
    p.add_argument("--control-end", action=ControlFlag, metavar="B",
                   help="the fraction of the steps at which it stops (default 1)")
    p.add_argument("--guess-mode", action="store_true", help="ControlNets read the image only, not the prompt "
                                                             "(their residuals scaled from 0.1 to 1)")


def check_controls(controls: list[dict]) -> None:
    """Each --controlnet has a --control-image, both exist, and its settings are in range, before any model loads."""
    for control in controls:
        name = control["controlnet"]
        if "image" not in control:
            raise UserError(f"--controlnet {name} needs its --control-image after it")
        if not control["controlnet"].exists():
            raise UserError(f"--controlnet: no such file or folder: {name}")
        if not control["image"].is_file():
            raise UserError(f"--control-image: no such file: {control['image']}")
        Control(None, control["image"], control.get("scale", 1.0), control.get("start", 0.0),
                control.get("end", 1.0))   # refuses a scale, start or end out of range


def generate(args: argparse.Namespace) -> None:
    """txt2img, img2img, inpaint and depth2img: load, generate, write the PNGs."""
    model = default_model() if args.model is None else args.model
    if args.model is None and not model.exists():
        raise UserError(f"no --model given and no default model at {model}")
    for flag in ("image", "mask", "depth_map"):
        path = getattr(args, flag, None)
        if path is not None and not path.is_file():
            raise UserError(f"--{flag.replace('_', '-')}: {'not a regular file' if path.exists() else 'no such file'}"
                            f": {path}")
    depth_model = getattr(args, "depth_model", None)
    if depth_model is not None and not depth_model.is_dir():
        raise UserError(f"--depth-model: not a folder: {depth_model} (give a DPT folder: config.json, "
                        "model.safetensors, preprocessor_config.json)")
    controls = getattr(args, "controls", None) or []
    check_controls(controls)
    request = Request(args.prompt, args.negative_prompt, args.steps, args.guidance_scale, args.guidance_rescale,
                      getattr(args, "width", None), getattr(args, "height", None), args.seed, args.scheduler,
                      args.batch_size, args.prompt_syntax, args.clip_skip, getattr(args, "strength", None),
                      guess_mode=getattr(args, "guess_mode", False))
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, not {args.threads}")
        torch.set_num_threads(args.threads)
    tagged = request.lora_tags   # <lora:NAME:WEIGHT> in the prompt (A1111's syntax), which stays as typed in the PNG
    if tagged and args.lora_dir is None:
        raise UserError(f"the prompt names LoRAs (<lora:{tagged[0][0]}:...>): give their folder with --lora-dir")
    loras = args.lora + [(find_lora(args.lora_dir, name), weight) for name, weight in tagged]
    for flag, path in [("embedding", path) for path in args.embedding] + [("lora", path) for path, _ in loras]:
        if not path.is_file():
            raise UserError(f"--{flag}: no such file: {path}")
    out = args.out or Path(f"{args.command}-{request.seed}.png")
    check_outputs(out, args.batch_size, args.overwrite)
    preview = preview_for(args)
    pipe = load(model, dtype=DTYPES[args.dtype], device=args.device, prediction_type=args.prediction_type)
    if isinstance(pipe, PixelPipeline):
        raise UserError(f"{model} is a pixel-space model without text: use `sdlite sample --model {model}`")
    pipe.vae_tiling = args.vae_tiling
    for path in args.embedding:
        pipe.load_embedding(path)
    for path, weight in loras:
        pipe.load_lora(path, weight)
    request.controls = [Control(load_controlnet(c["controlnet"], DTYPES[args.dtype], args.device), c["image"],
                                c.get("scale", 1.0), c.get("start", 0.0), c.get("end", 1.0)) for c in controls]
    for name, text in (("prompt", request.text), ("negative prompt", request.negative_prompt)):
        if args.show_tokens:
            print(f"{name}: {prompts.describe(pipe.tokenizer, text, args.prompt_syntax)}")
        dropped = prompts.windows(pipe.tokenizer, text, args.prompt_syntax)[2]
        if dropped and not args.quiet:
            print(f"warning: the {name}'s last {dropped} tokens are past the 75 that --prompt-syntax "
                  f"{args.prompt_syntax} keeps (--prompt-syntax a1111 encodes them all)", file=sys.stderr)
    if preview:
        preview.decode = approximate_rgb if args.preview_fast else pipe.decode
    images = pipe.generate(request, getattr(args, "image", None), getattr(args, "mask", None),
                           getattr(args, "mask_blur", 0), getattr(args, "keep_unmasked", False),
                           Progress(args.command, quiet=args.quiet), depth=args.command == "depth2img",
                           depth_map=getattr(args, "depth_map", None), depth_model=depth_model, on_step=preview)
    write_images(images, out, args.overwrite)
    write_preview(preview, args)


def write_images(images: list, out: Path, overwrite: bool) -> None:
    """OUT, or OUT-0.png ... for a batch: all images or none (replaced files cannot be put back)."""
    written = []
    try:
        for i, image in enumerate(images):
            path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
            save_png(image, path, overwrite=overwrite)
            written.append(path)
    except BaseException:
        if not overwrite:
            for path in written:
                path.unlink(missing_ok=True)
        raise
    for path in written:
        print(path)


def sample_images(args: argparse.Namespace) -> None:
    """sample: load a pixel-space model, sample, write the PNGs."""
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**32, ()).item())
    out = args.out or Path(f"sample-{seed}.png")
    check_outputs(out, args.batch_size, args.overwrite)
    preview = preview_for(args)
    pipe = load(args.model, dtype=DTYPES[args.dtype], device=args.device)
    if not isinstance(pipe, PixelPipeline):
        raise UserError(f"{args.model} is a text-to-image model: use `sdlite txt2img PROMPT --model {args.model}`")
    images = pipe.sample(steps=args.steps, scheduler=args.scheduler, batch_size=args.batch_size, seed=seed,
                         eta=args.eta, progress=Progress("sample", quiet=args.quiet), on_step=preview)
    write_images(images, out, args.overwrite)
    write_preview(preview, args)


def show_schedule(args: argparse.Namespace) -> None:
    """schedule: the model's training schedule and the samplers' timesteps, listed and/or plotted."""
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, not {args.steps}")
    if args.plot is not None:
        check_outputs(args.plot, 1, args.overwrite)
    path = resolve(args.model)
    if path.is_dir():   # the config alone: no weights read
        index = read_json(path / "model_index.json")
        pixel, config = is_pixel_folder(path, index), read_json(path / "scheduler" / "scheduler_config.json")
    else:
        pixel, config = False, load(path).scheduler_config
    names = [args.scheduler] if args.scheduler else list(samplers.NAMES)
    timesteps = schedule.sampler_timesteps(config, names, args.steps, pixel)
    if args.print or args.plot is None:
        print(schedule.listing(timesteps))
    if args.plot is not None:
        title = (f"{path.name}: {config.get('beta_schedule', 'linear')} betas, "
                 f"T = {config.get('num_train_timesteps', 1000)}, {args.steps} steps")
        schedule.plot(schedule.training_alphas_cumprod(config), timesteps, title, args.plot, args.overwrite)
        print(args.plot)


def convert_model(args: argparse.Namespace) -> None:
    """convert: load a model in the precision asked for, write it in the layout OUT names."""
    check_replaceable(args.out, args.overwrite)   # before the weights are read
    save(load(args.model, dtype=DTYPES[args.dtype]), args.out, DTYPES[args.dtype], args.overwrite)
    print(args.out)


def make_control_image(args: argparse.Namespace) -> None:
    """preprocess canny: the edges of an image, written as a greyscale PNG."""
    out = args.out or Path(f"{args.image.stem}-canny.png")
    check_outputs(out, 1, args.overwrite)
    if not args.image.is_file():
        raise UserError(f"{args.image}: {'not a regular file' if args.image.exists() else 'no such file'}")
    edges = canny_image(open_rgb(args.image), args.low, args.high)
    save_png(edges, out, overwrite=args.overwrite)
    print(out)


def lora_flag(text: str) -> tuple[Path, float]:
    """--lora PATH or PATH:WEIGHT; a path may hold colons itself, so only a number after the last one is a weight."""
    path, _, weight = text.rpartition(":")
    try:
        return Path(path), float(weight)
    except ValueError:
        return Path(text), 1.0


def check_outputs(out: Path, batch_size: int, overwrite: bool, flag: str = "--out", suffix: str = ".png") -> None:
    """Refuse up front an --out that cannot be written, and one whose file is already there (without --overwrite):
    `out`, or with a batch OUT-0.png ... OUT-(N-1).png (found by reading the folder, whatever N)."""
    if out.suffix.lower() != suffix:
        raise UserError(f"{flag} must name a {suffix} file, not {out}")
    try:
        out.exists()                             # a name too long, a file where a folder should be, ...
    except OSError as e:
        raise UserError(f"{flag}: {out}: {e.strerror}") from None
    if not out.parent.is_dir():
        raise UserError(f"{flag}: folder {out.parent} does not exist")
    check_writable(out.parent)
    if batch_size == 1:
        taken = [out] if os.path.lexists(out) else []
    else:
        pattern = re.compile(re.escape(out.stem) + r"-(0|[1-9]\d*)" + re.escape(out.suffix))
        taken = sorted(p for p in out.parent.iterdir()
                       if (match := pattern.fullmatch(p.name)) and int(match[1]) < batch_size)
    for path in taken:
        if path.is_dir():
            raise UserError(f"{flag}: {path} is a folder: name a {suffix} file")
        if not overwrite:
            raise UserError(f"{path} exists: choose another {flag} or pass --overwrite")


if __name__ == "__main__":
    sys.exit(main())
