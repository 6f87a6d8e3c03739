"""Parity of sdlite with the reference (diffusers and transformers) at full Stable Diffusion size.
Run: python benchmarks/parity.py   (needs `pip install -e .[reference]`; about 25 minutes on 2 cores)

For SD 1.5 and SD 2.1 (random weights, benchmarks/checkpoints.py), the reference loads the diffusers folder and
sdlite loads the folder, and in fp32 also the original single file (the key mapping does not depend on the dtype).
Each module gets the same inputs in both: the text encoder a prompt's ids, the UNet a guided batch of 2 latents at
one timestep, the VAE an image to encode and latents to decode; then one whole txt2img call from the folder, with
the checkpoint's own scheduler. sdlite's UNet runs twice: as a module, and with its convolution weights packed for
oneDNN, as its sampling loop runs it (when the weights are a view of the file, so in fp32). The table gives the
largest and the mean absolute difference to the reference, next to the reference's own size (max |ref|): in fp32,
and in bf16 against the reference in bf16. For scale, the last column gives how far the reference is from itself:
in fp32 with its modules and inputs in channels-last memory (the same arithmetic summed in another order: float
rounding), in bf16 from its own fp32. Images are compared in uint8 levels. Prints the table and writes it to
benchmarks/RESULTS.md.
"""
import gc
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import sdlite  # noqa: E402
from sdlite.runtime import PackedConv2d, running, use_onednn  # noqa: E402
from checkpoints import FAMILIES, folder, single_file  # noqa: E402
from report import machine, table, write_section  # noqa: E402

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
UNET_SIDE, VAE_SIDE = 512, 256         # image sides of the module inputs (the UNet's latents are 1/8 of it)
TXT2IMG = dict(steps=2, guidance_scale=7.5, width=512, height=512, seed=1234)   # SD 2.1 at 512 too, to save time
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIMESTEP = 500


def inputs(family: str) -> dict[str, torch.Tensor]:
    """The modules' inputs, in fp32: a guided UNet batch, an image in [-1, 1] and latents."""
    g = torch.Generator().manual_seed(0)
    width = FAMILIES[family]["text"]["hidden_size"]
    return {"latents": torch.randn(2, 4, UNET_SIDE // 8, UNET_SIDE // 8, generator=g),
            "context": torch.randn(2, 77, width, generator=g),
            "image": torch.rand(1, 3, VAE_SIDE, VAE_SIDE, generator=g) * 2 - 1,
            "z": torch.randn(1, 4, VAE_SIDE // 8, VAE_SIDE // 8, generator=g)}


def reference_outputs(family: str, dtype: torch.dtype,
                      channels_last: bool = False) -> dict[str, torch.Tensor | np.ndarray]:
    """The reference's outputs; with `channels_last`, of its modules and inputs in that memory format, and no
    txt2img."""
    pipe = StableDiffusionPipeline.from_pretrained(folder(family), torch_dtype=dtype, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    x = {k: v.to(dtype) for k, v in inputs(family).items()}
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        x = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in x.items()}
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        posterior = pipe.vae.encode(x["image"]).latent_dist
        out = {"ids": ids,
               "text encoder": pipe.text_encoder(ids).last_hidden_state,
               "UNet": pipe.unet(x["latents"], TIMESTEP, x["context"]).sample,
               "VAE encode (mean)": posterior.mean,
               "VAE encode (log-variance)": posterior.logvar,
               "VAE decode": pipe.vae.decode(x["z"]).sample}
    out["UNet (packed, as in the loop)"] = out["UNet"]
    out["VAE encode (mean), as in the pipeline"] = out["VAE encode (mean)"]
    out["VAE decode, as in the pipeline"] = out["VAE decode"]
    if channels_last:
        return out
    c = TXT2IMG
    images = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=c["steps"], guidance_scale=c["guidance_scale"],
                  width=c["width"], height=c["height"], generator=torch.Generator().manual_seed(c["seed"]),
                  output_type="np").images
    out["txt2img (uint8)"] = (images * 255).round().astype(np.uint8)
    return out


def sdlite_outputs(path: Path, family: str, dtype: torch.dtype,
                   with_txt2img: bool) -> dict[str, torch.Tensor | np.ndarray]:
    pipe = sdlite.load(path, dtype=dtype)
    x = {k: v.to(dtype) for k, v in inputs(family).items()}
    with torch.no_grad():
        ids = pipe.tokenizer([PROMPT])
        posterior = pipe.vae.encode(x["image"])
        out = {"ids": ids,
               "text encoder": pipe.text_encoder(ids),
               "UNet": pipe.unet(x["latents"], TIMESTEP, x["context"]),
               "VAE encode (mean)": posterior.mean,
               "VAE encode (log-variance)": posterior.logvar,
               "VAE decode": pipe.vae.decode(x["z"])}
        with running(pipe.vae):  # channels-last, attention in blocks, resnets in place, heap reuse in bf16
            out["VAE encode (mean), as in the pipeline"] = pipe.vae.encode(x["image"]).mean
            out["VAE decode, as in the pipeline"] = pipe.vae.decode(x["z"])
        use_onednn(pipe.unet)   # each convolution packs its weight at its first call, if it is a view
        packed = pipe.unet(x["latents"], TIMESTEP, x["context"])
        if any(m.packed is not None for m in pipe.unet.modules() if isinstance(m, PackedConv2d)):
            out["UNet (packed, as in the loop)"] = packed
    if with_txt2img:
        images = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, **TXT2IMG)
        out["txt2img (uint8)"] = np.stack([np.asarray(image) for image in images])
    return out


def difference(a, b) -> tuple[float, float]:
    """Largest and mean absolute difference, in fp32 (uint8 images in levels)."""
    d = (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs()
    return d.max().item(), d.mean().item()


def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2g}" if x >= 0.01 else f"{x:.1e}"


def main() -> None:
    torch.manual_seed(0)
    start, about = time.perf_counter(), machine()
    rows = []
    for family in FAMILIES:
        runs = {}
        for name, dtype in DTYPES.items():
            runs["ref", name] = reference_outputs(family, dtype)
            gc.collect()
            if name == "fp32":
                runs["ref channels-last", name] = reference_outputs(family, dtype, channels_last=True)
                gc.collect()
            layouts = {"folder": folder(family)} | ({"single file": single_file(family)} if name == "fp32" else {})
            for layout, path in layouts.items():
                runs[layout, name] = sdlite_outputs(path, family, dtype, with_txt2img=layout == "folder")
                gc.collect()
            print(f"{family} {name} done after {time.perf_counter() - start:.0f} s", flush=True)
        for (layout, name), out in ((k, v) for k, v in runs.items() if not k[0].startswith("ref")):
            ref = runs["ref", name]
            same = torch.equal(torch.as_tensor(out["ids"]).long(), ref["ids"].long())
            rows.append([family, "token ids", layout, name, "identical" if same else "DIFFER", "-", "-", "-"])
            for module, value in out.items():
                if module == "ids":
                    continue
                scale = torch.as_tensor(ref[module]).float().abs().max().item()
                row = [family, module, layout, name, *map(fmt, difference(value, ref[module])), fmt(scale)]
                itself = runs["ref", "fp32"] if name == "bf16" else runs["ref channels-last", "fp32"]
                rounding = difference(ref[module], itself[module]) if module in itself else None
                rows.append(row + (["%s / %s" % tuple(map(fmt, rounding))] if rounding else ["-"]))
                print(" | ".join(map(str, rows[-1])), flush=True)
    header = ["model", "output", "sdlite loads", "dtype", "max abs error", "mean abs error", "max abs ref",
              "ref vs itself: fp32 channels-last, bf16 vs fp32 (max / mean)"]
    text = (f"## Parity with diffusers\n\n{about}\n\n"
            f"`python benchmarks/parity.py`: random-weight SD 1.5 and SD 2.1 at full size "
            f"(benchmarks/checkpoints.py). UNet on a batch of 2 latents of a {UNET_SIDE}x{UNET_SIDE} image at "
            f"t={TIMESTEP}; VAE encode of one {VAE_SIDE}x{VAE_SIDE} image and decode of one latent of that size; "
            f"txt2img: {TXT2IMG['steps']} steps at {TXT2IMG['width']}x{TXT2IMG['height']}, guidance "
            f"{TXT2IMG['guidance_scale']}, each checkpoint's scheduler (PNDM for SD 1.5, DDIM v-prediction for "
            f"SD 2.1). Errors are against the reference in the same dtype. \"UNet (packed, as in the loop)\": "
            f"sdlite's UNet with its convolution weights packed for oneDNN, as its sampling loop runs it (fp32: the "
            f"weights are views of the file). \"as in the pipeline\": sdlite's VAE within runtime.running, as "
            f"the pipeline runs it (channels-last, attention in blocks, its resnets' SiLU and sums in place). "
            f"Last column, for scale: how far the reference is from itself, in fp32 "
            f"with its modules and inputs in channels-last memory (float rounding), in bf16 from its own fp32. "
            f"Took {(time.perf_counter() - start) / 60:.0f} minutes.\n\n"
            + table(header, rows))
    print(text)
    write_section("parity", text)


if __name__ == "__main__":
    main()
