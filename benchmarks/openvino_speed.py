"""OpenVINO as a third system next to diffusers and sdlite: one guided UNet step, one VAE decode and one whole txt2img
(speed.py's: 2 PNDM steps at 512x512, guided, PIL image out), fp32 and bf16.
Run: python benchmarks/openvino_speed.py   (needs `pip install -e .[reference]`; about 10 minutes on 2 cores, plus
about 5 the first time, to convert the models)
     python benchmarks/openvino_speed.py --profile   (where the time goes: oneDNN verbose and OpenVINO's layer counters)

All three load the random-weight SD 1.5 diffusers folder (benchmarks/checkpoints.py). OpenVINO runs diffusers' own
UNet and VAE decoder and transformers' text encoder (in txt2img, in diffusers' loop: openvino_txt2img), converted
once with `openvino.convert_model` from fp32 PyTorch and kept, fp32 weights, as IR in /tmp/sdbench/openvino, then
compiled for the CPU: "fp32" with INFERENCE_PRECISION_HINT f32, "bf16" with the
runtime's default hint when that is bf16 (it is on CPUs with AVX512-BF16 or AMX), else with bf16 asked for; the table
names what the compiled model reports. sdlite runs as in its sampling loop (runtime.running: UNet convolutions and
bf16 linear layers packed for oneDNN, other linear layers on oneDNN, channels-last VAE, a bf16 one with its blocks
reused from malloc's heap), loaded with `sdlite.load(folder, dtype=dtype)`; diffusers with
`from_pretrained(torch_dtype=)`.
In bf16 a fourth column, "sdlite, bf16 file": sdlite loading the bf16 single file that `sdlite convert --dtype bf16`
writes (sdlite.save, at the first run), whose weights it packs (cast at load from the fp32 folder, it does not).

Times: every stage is called on the same inputs by diffusers, sdlite, OpenVINO, diffusers, ... (REPEATS each); a
stage's time is its best (as speed.py). FLOPs are counted as speed.py does (FlopCounterMode on sdlite's modules on
the meta device); the machine's peaks are a 4096^3 matrix product and a 3x3 convolution of SD's 640-channel 32x32
shape (batch 2, channels-last), timed in this run before each stage, the best over the run. "error" is the largest
absolute difference from diffusers' fp32 output on the same inputs.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import GUIDANCE, NEGATIVE, PROMPT, SD1, SIDE, STEPS, matmul_peak, seconds  # noqa: E402
from speed import flops as speed_flops  # noqa: E402

IR = Path("/tmp/sdbench/openvino")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SYSTEMS = ("diffusers", "sdlite", "sdlite, bf16 file", "OpenVINO")
BF16_FILE = Path("/tmp/sdbench/sd1-bf16.safetensors")   # the folder as `sdlite convert --dtype bf16` writes it
STAGES = {"UNet step 256²": ("unet", 256), "UNet step 512²": ("unet", 512), "VAE decode 512²": ("vae", 512),
          "txt2img 512², 2 steps": ("txt2img", 512)}
REPEATS = int(os.environ.get("REPEATS", 2))   # REPEATS=1 on a busy machine


class UNetCall(nn.Module):
    """diffusers' UNet as a function of tensors, for tracing."""
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, latents, timestep, context):
        return self.unet(latents, timestep, context, return_dict=False)[0]


class TextCall(nn.Module):
    """transformers' CLIP text encoder as a function of the token ids, for tracing."""
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, ids):
        return self.text_encoder(ids, return_dict=False)[0]


class DecoderCall(nn.Module):
    """diffusers' VAE decode (post-quant convolution and decoder) as a function of tensors, for tracing."""
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


def inputs(kind: str, side: int) -> tuple[torch.Tensor, ...]:
    """The same fp32 inputs for every system: a guided batch of 2 latents, the timestep, the context; or 1 latent;
    the token ids of the negative prompt and the prompt; none for txt2img (its prompt: speed.py's)."""
    g = torch.Generator().manual_seed(side)
    if kind == "txt2img":
        return ()
    if kind == "text":
        return (torch.randint(49408, (2, 77), generator=g),)
    if kind == "unet":
        return torch.randn(2, 4, side // 8, side // 8, generator=g), torch.tensor(500), torch.randn(2, 77, 768,
                                                                                                  generator=g)
    return (torch.randn(1, 4, side // 8, side // 8, generator=g),)


def converted(kind: str) -> Path:
    """The IR of diffusers' fp32 UNet, VAE decoder or text encoder (transformers'), converted at the first use
    (dynamic shapes: one IR for all sizes) and kept with fp32 weights."""
    import openvino as ov
    path = IR / f"{kind}.xml"
    if path.exists():
        return path
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel
    module = (UNetCall(UNet2DConditionModel.from_pretrained(SD1 / "unet")) if kind == "unet"
              else TextCall(CLIPTextModel.from_pretrained(SD1 / "text_encoder")) if kind == "text"
              else DecoderCall(AutoencoderKL.from_pretrained(SD1 / "vae")))
    with torch.no_grad():
        model = ov.convert_model(module.eval(), example_input=inputs(kind, 256))
    IR.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, path, compress_to_fp16=False)
    return path


def openvino_calls(name: str) -> tuple[dict, str]:
    """OpenVINO's call of each kind, compiled for the CPU in `name`, and the precision the runtime reports."""
    import openvino as ov
    core = ov.Core()
    default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    hint = {"INFERENCE_PRECISION_HINT": "f32"} if name == "fp32" else \
        {} if default == "bf16" else {"INFERENCE_PRECISION_HINT": "bf16"}
    compiled = {kind: core.compile_model(core.read_model(converted(kind)), "CPU", hint)
                for kind in ("unet", "vae", "text")}
    used = compiled["unet"].get_property("INFERENCE_PRECISION_HINT").to_string()
    report = f"{used} ({'the default' if not hint else f'asked for; the default is {default}'})"
    requests = {kind: c.create_infer_request() for kind, c in compiled.items()}

    def call(kind):
        return lambda *x: torch.from_numpy(requests[kind].infer([t.numpy() for t in x])[0].copy())
    calls = {kind: call(kind) for kind in compiled}
    return {**calls, "txt2img": openvino_txt2img(calls)}, report


def openvino_txt2img(calls: dict):
    """txt2img as diffusers' StableDiffusionPipeline computes it (its tokenizer, PNDM scheduler and initial noise),
    with OpenVINO's text encoder, UNet and decoder: the loop of optimum-intel's OVStableDiffusionPipeline."""
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(SD1 / "tokenizer")
    scheduler = PNDMScheduler.from_pretrained(SD1 / "scheduler")

    def txt2img() -> torch.Tensor:
        ids = tokenizer([NEGATIVE, PROMPT], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        context = calls["text"](ids)
        scheduler.set_timesteps(STEPS)
        latents = torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(0))
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            uncond, cond = calls["unet"](scheduler.scale_model_input(torch.cat([latents, latents]), t), t,
                                         context).chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
        image = calls["vae"](latents / 0.18215)   # the VAE's scaling factor
        return ((image[0] / 2 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 0)
    return txt2img


def pixels(images) -> torch.Tensor:
    """The first PIL image, (H, W, 3) uint8 levels as floats."""
    return torch.from_numpy(np.asarray(images[0])).float()


def bf16_file() -> Path:
    """The random SD 1.5 as a bf16 single file, written by sdlite.save (`sdlite convert`) at the first use."""
    if not BF16_FILE.exists():
        import sdlite
        sdlite.save(sdlite.load(SD1, dtype=torch.bfloat16), BF16_FILE, torch.bfloat16)
    return BF16_FILE


def torch_calls(system: str, dtype: torch.dtype) -> dict:
    """The UNet call and the VAE decode of diffusers or sdlite in `dtype`, on fp32 inputs, fp32 outputs; "sdlite,
    bf16 file" is sdlite loading the bf16 file rather than casting the fp32 folder's weights at load."""
    if system.startswith("sdlite"):
        import sdlite
        from sdlite import runtime
        pipe = sdlite.load(bf16_file() if system == "sdlite, bf16 file" else SD1, dtype=dtype)

        def unet(latents, t, context):   # as in the sampling loop: the fast paths of runtime.py
            with runtime.running(pipe.unet):
                return pipe.unet(latents.to(dtype), int(t), context.to(dtype)).float()

        def vae(z):
            with runtime.running(pipe.vae):
                return pipe.vae.decode(z.to(dtype)).float()
        return {"unet": unet, "vae": vae,
                "txt2img": lambda: pixels(pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE,
                                                       width=SIDE, height=SIDE, seed=0))}
    from diffusers import StableDiffusionPipeline
    d = StableDiffusionPipeline.from_pretrained(SD1, torch_dtype=dtype, safety_checker=None)
    d.set_progress_bar_config(disable=True)
    return {"unet": lambda x, t, c: d.unet(x.to(dtype), t, c.to(dtype)).sample.float(),
            "vae": lambda z: d.vae.decode(z.to(dtype)).sample.float(),
            "txt2img": lambda: pixels(d(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                                        guidance_scale=GUIDANCE, width=SIDE, height=SIDE,
                                        generator=torch.Generator().manual_seed(0)).images)}


def conv_peak(dtype: torch.dtype) -> float:
    """FLOP/s of a 3x3 convolution of SD's 640-channel 32x32 shape (the UNet's second level at 512²), best of 3."""
    x = torch.randn(2, 640, 32, 32).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(640, 640, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    f = lambda: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
    f()
    return 2 * 2 * 640 * 640 * 9 * 32 * 32 / min(seconds(f) for _ in range(3))


def flops() -> dict[str, float]:
    """FLOPs of each stage, counted on sdlite's SD 1.5 modules moved to the meta device."""
    import sdlite
    pipe = sdlite.load(SD1).to(device="meta")
    counted = {"txt2img 512², 2 steps": speed_flops()["txt2img"]}   # speed.py's txt2img, the same work
    for stage, (kind, side) in STAGES.items():
        if kind == "txt2img":
            continue
        x = [t.to("meta") if t.dim() else int(t) for t in inputs(kind, side)]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            pipe.unet(*x) if kind == "unet" else pipe.vae.decode(*x)
        counted[stage] = counter.get_total_flops()
    return counted


def alternated(name: str, reference: dict, peak: dict) -> tuple[dict, dict, str]:
    """Best time and max error against `reference` (filled in from diffusers when empty) of every stage and system,
    the systems alternating call by call."""
    dtype = DTYPES[name]
    systems = systems_of(name)
    calls = {system: torch_calls(system, dtype) for system in systems if system != "OpenVINO"}
    calls["OpenVINO"], precision = openvino_calls(name)
    best, error = {}, {}
    with torch.no_grad():
        for stage, (kind, side) in STAGES.items():
            x = inputs(kind, side)
            for peak_name, measure in (("matmul", matmul_peak), ("conv", conv_peak)):
                peak[name, peak_name] = max(peak.get((name, peak_name), 0.0), measure(dtype))
            for system in systems:   # the first call of each (packing, oneDNN's kernels) is not timed
                out = calls[system][kind](*x)
                reference.setdefault(stage, out)
                error[system, stage] = (out - reference[stage]).abs().max().item()
            for _ in range(REPEATS):
                for system in systems:
                    t = seconds(lambda: calls[system][kind](*x))
                    best[system, stage] = min(best.get((system, stage), t), t)
                    print(f"{name} {stage} {system}: {t:.2f} s", flush=True)
    return best, error, precision


def systems_of(name: str) -> tuple[str, ...]:
    """The systems measured in `name`: in fp32 the fp32 folder is already what a file in the dtype used gives."""
    return SYSTEMS if name == "bf16" else tuple(s for s in SYSTEMS if s != "sdlite, bf16 file")


def main() -> None:
    from report import machine, table, write_section
    import openvino as ov
    start, about = time.perf_counter(), machine()
    for kind in ("unet", "vae", "text"):
        converted(kind)
    counted, reference, peak, rows, precisions = flops(), {}, {}, [], {}
    for name in DTYPES:
        best, error, precisions[name] = alternated(name, reference, peak)
        for stage in STAGES:
            cells, o = [], best["OpenVINO", stage]
            for system in SYSTEMS:
                if (system, stage) not in best:
                    cells.append("(= sdlite)")
                    continue
                rate = counted[stage] / best[system, stage]
                cells.append(f"{best[system, stage]:.2f} s, {rate / 1e12:.2f} TF/s, "
                             f"{100 * rate / peak[name, 'conv']:.0f}%, err {error[system, stage]:.1e}")
            ratios = [f"{best[system, stage] / o:.2f}" if (system, stage) in best else "-"
                      for system in ("sdlite", "sdlite, bf16 file")]
            rows.append([name, stage, f"{counted[stage] / 1e9:.0f}", *cells, *ratios])
    header = ["dtype", "stage", "GFLOP", *(f"{s}: s, TFLOP/s, % conv peak, max error" for s in SYSTEMS),
              "sdlite / OpenVINO", "sdlite, bf16 file / OpenVINO"]
    peaks = "; ".join(f"{name}: matmul {peak[name, 'matmul'] / 1e12:.2f}, 3x3 conv {peak[name, 'conv'] / 1e12:.2f} "
                      f"TFLOP/s" for name in DTYPES)
    text = (f"## Next to OpenVINO\n\n{about} OpenVINO {ov.__version__}.\n\n`python benchmarks/openvino_speed.py`: "
            f"random-weight SD 1.5 from its diffusers folder; UNet step: a guided batch of 2 (timestep 500, context "
            f"2x77x768); VAE decode: one image; txt2img: speed.py's ({STEPS} PNDM steps at {SIDE}x{SIDE}, guidance "
            f"{GUIDANCE}). OpenVINO runs diffusers' UNet and decoder and transformers' text encoder converted with "
            f"`openvino.convert_model` (fp32 IR), compiled with INFERENCE_PRECISION_HINT f32 for fp32, and for bf16 "
            f"running in {precisions['bf16']}. sdlite as in its sampling loop (runtime.running: UNet "
            f"convolutions (and bf16 linear layers) packed for oneDNN where the weights are used from the file as "
            f"stored, "
            f"other linear layers on oneDNN, GEGLU's gelu and product fused into its projections, attention in "
            f"blocks, channels-last VAE with its resnets' SiLU and sums in place, heap reuse in bf16); "
            f"\"sdlite, bf16 file\": sdlite loading the same weights from the bf16 single file `sdlite convert "
            f"--dtype bf16` writes (packed; loaded in bf16 from the fp32 folder, sdlite casts at load and does not "
            f"pack). Times: best of {REPEATS} calls, the systems alternating call by call; inputs and outputs fp32 "
            f"(the casts are in the time). "
            f"Measured peaks: {peaks}; % is of the 3x3 convolution peak of the row's dtype. Max error: against "
            f"diffusers fp32 on the same inputs (txt2img: in uint8 levels of the image). Took "
            f"{(time.perf_counter() - start) / 60:.0f} minutes.\n\n" + table(header, rows))
    print(text)
    write_section("openvino", text)


def onednn_worker() -> None:
    """One sdlite bf16 UNet step at 256² from the bf16 file (after a first, untimed one) under oneDNN's verbose mode
    and torch's profiler; prints the verbose lines, then the step's time and the profiler's top operators."""
    import sdlite
    from sdlite import runtime
    pipe = sdlite.load(bf16_file(), dtype=torch.bfloat16)
    latents, t, context = inputs("unet", 256)
    step = lambda: pipe.unet(latents.bfloat16(), int(t), context.bfloat16())  # noqa: E731
    with torch.no_grad(), runtime.running(pipe.unet):
        step()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            took = seconds(step)
        with torch.profiler.profile() as prof:
            step()
    print(f"STEP {took}", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8), flush=True)


def onednn_summary() -> str:
    import subprocess
    out = subprocess.run([sys.executable, __file__, "--onednn"], capture_output=True, text=True, check=True).stdout
    by_kind, by_impl, calls, total = {}, {}, {}, 0.0
    for line in out.splitlines():
        fields = line.split(",")
        if line.startswith("onednn_verbose") and len(fields) > 8 and fields[3] == "exec":
            ms = float(fields[-1])
            kind, impl = fields[5], fields[6]
            by_kind[kind] = by_kind.get(kind, 0.0) + ms
            calls[kind] = calls.get(kind, 0) + 1
            by_impl[kind, impl] = by_impl.get((kind, impl), 0.0) + ms
            total += ms
    step = float(next(line.split()[1] for line in out.splitlines() if line.startswith("STEP "))) * 1000
    rows = [[kind, calls[kind], f"{ms:.0f}", f"{100 * ms / step:.0f}%",
             ", ".join(f"{impl} {v:.0f}" for (k, impl), v in sorted(by_impl.items(), key=lambda i: -i[1]) if k == kind)]
            for kind, ms in sorted(by_kind.items(), key=lambda i: -i[1])]
    rows.append(["(not oneDNN: attention, GroupNorm, elementwise, ...)", "-", f"{step - total:.0f}",
                 f"{100 * (step - total) / step:.0f}%", "-"])
    profiler = out[out.index("STEP "):].split("\n", 1)[1]
    from report import table
    return (f"sdlite, bf16 from the bf16 file, one guided UNet step at 256² under ONEDNN_VERBOSE ({step:.0f} ms with "
            f"the verbose output on):\n\n"
            + table(["oneDNN primitive", "calls", "ms", "% of step", "implementations (ms)"], rows)
            + f"\n\ntorch's profiler, the same step (top operators by self time):\n\n```\n{profiler.strip()}\n```")


def openvino_summary() -> str:
    import openvino as ov
    core = ov.Core()
    default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    hint = {} if default == "bf16" else {"INFERENCE_PRECISION_HINT": "bf16"}
    compiled = core.compile_model(core.read_model(converted("unet")), "CPU", {**hint, "PERF_COUNT": True})
    request, x = compiled.create_infer_request(), [t.numpy() for t in inputs("unet", 256)]
    request.infer(x)
    took = seconds(lambda: request.infer(x)) * 1000
    by_type, impls = {}, {}
    for info in request.get_profiling_info():
        if info.status != info.Status.EXECUTED:
            continue
        ms = info.real_time.total_seconds() * 1000
        by_type[info.node_type] = by_type.get(info.node_type, 0.0) + ms
        key = (info.node_type, info.exec_type)
        impls[key] = impls.get(key, 0.0) + ms
    total = sum(by_type.values())
    rows = [[kind, f"{ms:.0f}", f"{100 * ms / total:.0f}%",
             ", ".join(f"{impl} {v:.0f}" for (k, impl), v in sorted(impls.items(), key=lambda i: -i[1])[:40]
                       if k == kind)]
            for kind, ms in sorted(by_type.items(), key=lambda i: -i[1])[:12]]
    from report import table
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return (f"OpenVINO {ov.__version__}, {precision}, the same step with PERF_COUNT ({took:.0f} ms; "
            f"layer times sum to {total:.0f} ms), by layer type (top 12):\n\n"
            + table(["layer type", "ms", "% of layers", "implementations (ms)"], rows))


def profile() -> None:
    from report import machine, write_section
    text = (f"## Next to OpenVINO: where the time goes\n\n{machine()}\n\n`python benchmarks/openvino_speed.py "
            f"--profile`.\n\n{onednn_summary()}\n\n{openvino_summary()}")
    print(text)
    write_section("openvino-profile", text)


if __name__ == "__main__":
    {"--onednn": onednn_worker, "--profile": profile}.get(sys.argv[1] if sys.argv[1:] else "", main)()
