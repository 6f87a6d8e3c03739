"""Speed and memory of sdlite next to diffusers, on the same work, at full Stable Diffusion 1.5 size.
Run: python benchmarks/speed.py   (needs `pip install -e .[reference]`; about 12 minutes on 2 cores)

Both systems load the random-weight SD 1.5 diffusers folder (benchmarks/checkpoints.py).

Times: both pipelines are loaded in this process, and every stage is run by sdlite, then diffusers, then sdlite, ...
(REPEATS each); a stage's time is its best. Calls that alternate see the same machine, which matters on a shared
one: a busy moment only ever makes one call slower. Stages: prompt encoding (the prompt and the negative prompt), one
UNet step on a guided batch of 2 (sdlite's as in its sampling loop: convolution weights packed for oneDNN, which the
first loop of a pipeline does once), one VAE decode, and one whole txt2img call.

Load time, first call and peak memory: a new process per system (`speed.py --worker SYSTEM DTYPE`), alternated for
ROUNDS rounds, that loads the folder and makes one txt2img image (a single step: the peak is the same as with more).
The first call pays what each system does once (oneDNN compiling its kernels, sdlite packing its weights). Peak
memory is the process's VmHWM (benchmarks/memory.py), the most it held at once from start-up on; times are the best
over rounds.

FLOPs are counted by torch's FlopCounterMode on sdlite's modules on the meta device (convolutions, matrix products
and attention; the two libraries do the same arithmetic). The machine's peak is a 4096^3 matrix product timed in this
run in each dtype (the best over the run, measured before each stage); "% peak" is the share of it a stage reaches.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from memory import peak_gb, warm_page_cache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
SD1 = Path("/tmp/sdbench/sd1")   # checkpoints.folder("sd1"), which main() writes first if missing: the workers and
                                 # the sdlite side import neither diffusers nor transformers, whose modules would
                                 # count in their memory

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
SIDE, STEPS, GUIDANCE = 512, 2, 7.5          # txt2img: 2 steps at 512x512 (PNDM: 3 UNet calls)
REPEATS, ROUNDS = 2, 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SYSTEMS = ("sdlite", "diffusers")
STAGES = ("load", "first txt2img", "prompt encoding", "UNet step", "VAE decode", "txt2img")
MEASURED_APART = ("load", "first txt2img")   # in new processes; the other stages alternate in one
TARGETS = {("txt2img", "fp32"): 0.9, ("txt2img", "bf16"): 0.5, ("load", "fp32"): 0.5, ("load", "bf16"): 0.5}
MEMORY_TARGET = 0.7


def seconds(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def load(system: str, dtype: torch.dtype):
    if system == "sdlite":
        import sdlite
        return sdlite.load(SD1, dtype=dtype)
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(SD1, torch_dtype=dtype, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stages(system: str, pipe, dtype: torch.dtype, steps: int = STEPS) -> dict:
    """The timed calls of one system, on the same inputs in both."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, SIDE // 8, SIDE // 8, generator=g).to(dtype)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    z = torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=g).to(dtype)
    if system == "sdlite":
        from sdlite import Request, runtime

        def running(module, call):   # as in the pipeline's stages: the fast paths of runtime.py
            with runtime.running(module):
                return call()
        return {"prompt encoding": lambda: pipe.encode_prompt(Request(PROMPT, NEGATIVE, guidance_scale=GUIDANCE)),
                "UNet step": lambda: running(pipe.unet, lambda: pipe.unet(latents, 500, context)),
                "VAE decode": lambda: running(pipe.vae, lambda: pipe.vae.decode(z)),
                "txt2img": lambda: pipe.txt2img(PROMPT, NEGATIVE, steps=steps, guidance_scale=GUIDANCE, width=SIDE,
                                                height=SIDE, seed=0)}
    return {"prompt encoding": lambda: pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE),
            "UNet step": lambda: pipe.unet(latents, 500, context).sample,
            "VAE decode": lambda: pipe.vae.decode(z).sample,
            "txt2img": lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                                    guidance_scale=GUIDANCE, width=SIDE, height=SIDE,
                                    generator=torch.Generator().manual_seed(0)).images}


def worker(system: str, dtype: torch.dtype) -> dict:
    """Load time, the time of the first txt2img call after it (1 step), and peak memory (GB) of one system in a
    process of its own. The library is imported before the clock starts."""
    if system == "sdlite":
        import sdlite  # noqa: F401
    else:
        from diffusers import StableDiffusionPipeline  # noqa: F401
    start = time.perf_counter()
    pipe = load(system, dtype)
    load_time = time.perf_counter() - start
    first_call = seconds(stages(system, pipe, dtype, steps=1)["txt2img"])
    return {"load": load_time, "first txt2img": first_call,
            "peak GB": peak_gb()}


def alternated(dtype: torch.dtype, peak: dict) -> dict[tuple[str, str], float]:
    """Best time of every stage and system, the systems alternating call by call; updates the matmul peak."""
    calls = {system: stages(system, load(system, dtype), dtype) for system in SYSTEMS}
    best = {}
    with torch.no_grad():
        for stage in STAGES:
            if stage in MEASURED_APART:
                continue
            peak[dtype] = max(peak.get(dtype, 0.0), matmul_peak(dtype))
            for _ in range(REPEATS):
                for system in SYSTEMS:
                    t = seconds(calls[system][stage])
                    best[system, stage] = min(best.get((system, stage), t), t)
                    print(f"{dtype} {stage} {system}: {t:.2f} s", flush=True)
    return best


def run_worker(system: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", system, dtype], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{system} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def flops() -> dict[str, float]:
    """FLOPs of each stage, counted on sdlite's SD 1.5 modules moved to the meta device (no memory, no time)."""
    import sdlite
    from sdlite import samplers
    pipe = sdlite.load(SD1).to(device="meta")   # loading on "meta" is refused as a user mistake
    meta = dict(device="meta")
    calls = {"prompt encoding": lambda: [pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long, **meta))
                                         for _ in range(2)],
             "UNet step": lambda: pipe.unet(torch.zeros(2, 4, SIDE // 8, SIDE // 8, **meta), 500,
                                            torch.zeros(2, 77, 768, **meta)),
             "VAE decode": lambda: pipe.vae.decode(torch.zeros(1, 4, SIDE // 8, SIDE // 8, **meta))}
    counted = {}
    for name, f in calls.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            f()
        counted[name] = counter.get_total_flops()
    unet_calls = len(samplers.make(pipe.default_sampler, pipe.scheduler_config).set_timesteps(STEPS))  # PNDM: 3
    counted["txt2img"] = counted["prompt encoding"] + unet_calls * counted["UNet step"] + counted["VAE decode"]
    return counted


def matmul_peak(dtype: torch.dtype) -> float:
    """FLOP/s of a 4096^3 matrix product, best of 3."""
    a = torch.randn(4096, 4096).to(dtype)
    return 2 * 4096**3 / min(seconds(lambda: a @ a) for _ in range(3))


def main() -> None:
    from checkpoints import folder
    from report import machine, table, write_section
    start, about = time.perf_counter(), machine()
    assert folder("sd1") == SD1
    for path in SD1.rglob("*.safetensors"):   # in the page cache before the first load
        warm_page_cache(path)
    counted = flops()
    best, peak = {}, {}   # best[system, dtype][stage or "peak GB"]; peak[dtype]: matmul FLOP/s
    for round_ in range(ROUNDS):
        for name, dtype in DTYPES.items():
            for system in SYSTEMS:
                result = run_worker(system, name)
                print(f"round {round_ + 1} {system} {name}: {json.dumps(result)}", flush=True)
                old = best.setdefault((system, name), result)
                for stage in MEASURED_APART:
                    old[stage] = min(old[stage], result[stage])
                old["peak GB"] = max(old["peak GB"], result["peak GB"])
    for name, dtype in DTYPES.items():
        for (system, stage), t in alternated(dtype, peak).items():
            best[system, name][stage] = t
    peak = {name: peak[dtype] for name, dtype in DTYPES.items()}
    rows = []
    for name in DTYPES:
        for stage in STAGES:
            s, d = best["sdlite", name][stage], best["diffusers", name][stage]
            ratio, target = s / d, TARGETS.get((stage, name))
            verdict = "-" if target is None else f"<= {target}: {'met' if ratio <= target else 'missed'}"
            share = [f"{100 * counted[stage] / t / peak[name]:.0f}%" if stage in counted else "-" for t in (s, d)]
            gflop = f"{counted[stage] / 1e9:.0f}" if stage in counted else "-"
            rows.append([name, stage, gflop, f"{s:.2f}", f"{d:.2f}", f"{ratio:.2f}", *share, verdict])
        s, d = best["sdlite", name]["peak GB"], best["diffusers", name]["peak GB"]
        verdict = f"<= {MEMORY_TARGET}: {'met' if s / d <= MEMORY_TARGET else 'missed'}"
        rows.append([name, "peak memory (GB)", "-", f"{s:.2f}", f"{d:.2f}", f"{s / d:.2f}", "-", "-", verdict])
    header = ["dtype", "stage", "GFLOP", "sdlite s", "diffusers s", "sdlite / diffusers", "sdlite % peak",
              "diffusers % peak", "target"]
    peaks = ", ".join(f"{name} {peak[name] / 1e9:.0f} GFLOP/s" for name in DTYPES)
    text = (f"## Speed and memory next to diffusers\n\n{about}\n\n`python benchmarks/speed.py`: random-weight SD 1.5 "
            f"at full size from its diffusers folder; sdlite with `sdlite.load(folder, dtype)`, diffusers "
            f"with `StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)`. UNet step: a guided batch of "
            f"2 at {SIDE}x{SIDE} (sdlite's with its convolution weights packed, as in its sampling loop); VAE decode: one {SIDE}x{SIDE} image; txt2img: {STEPS} steps at {SIDE}x{SIDE}, "
            f"guidance {GUIDANCE}, the PNDM scheduler, PIL images out. Stage times: best of {REPEATS} calls, the "
            f"systems alternating call by call in one process; load and first txt2img (1 step, right after loading): "
            f"best of {ROUNDS} new processes per system; peak memory: VmHWM of such a process. Measured matmul peak: "
            f"{peaks}. "
            f"Took {(time.perf_counter() - start) / 60:.0f} minutes.\n\n" + table(header, rows))
    print(text)
    write_section("speed", text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2], DTYPES[sys.argv[3]])))
    else:
        main()
