"""Speed and memory of sdlite next to diffusers, on the same work, at full Stable Diffusion 1.5 size.
Run: python benchmarks/speed.py   (needs `pip install -e .[reference]`; about 15 minutes on 2 cores)

Every measurement is a new process (`speed.py --worker SYSTEM DTYPE`), so that each system's peak memory (ru_maxrss,
the most memory it held at once, from start-up on) is its own. The workers alternate, sdlite then diffusers, for
ROUNDS rounds in each dtype, and each time in the table is the best over the rounds: a shared machine only ever makes
a run slower. A worker loads the random-weight SD 1.5 diffusers folder (benchmarks/checkpoints.py), runs one whole
txt2img call first (so sdlite's memory-mapped weights are paged in inside that call, not before it), then times
prompt encoding (the prompt and the negative prompt), one UNet step on a guided batch of 2, and one VAE decode.

FLOPs are counted by torch's FlopCounterMode on sdlite's modules on the meta device (convolutions, matrix products
and attention; the two libraries do the same arithmetic). The machine's peak is a 4096^3 matrix product timed in this
run, in each dtype; "% peak" is the share of it a stage reaches.
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from checkpoints import folder  # noqa: E402
from report import machine, table, write_section  # noqa: E402

PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry, low quality"
SIDE, STEPS, GUIDANCE = 512, 2, 7.5          # txt2img: 2 steps at 512x512 (each step is one UNet call)
ROUNDS = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SYSTEMS = ("sdlite", "diffusers")
STAGES = ("load", "prompt encoding", "UNet step", "VAE decode", "txt2img")
TARGETS = {("txt2img", "fp32"): 0.9, ("txt2img", "bf16"): 0.5, ("load", "fp32"): 0.5, ("load", "bf16"): 0.5}
MEMORY_TARGET = 0.7


def seconds(f, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def worker(system: str, dtype: torch.dtype) -> dict:
    """Times of every stage in one process, and the process's peak memory in GB."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, SIDE // 8, SIDE // 8, generator=g).to(dtype)
    context = torch.randn(2, 77, 768, generator=g).to(dtype)
    z = torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=g).to(dtype)
    start = time.perf_counter()
    if system == "sdlite":
        import sdlite
        pipe = sdlite.load(folder("sd1"), dtype=dtype)
        load = time.perf_counter() - start
        encode = lambda: pipe.encode_prompt(PROMPT, NEGATIVE, 1, GUIDANCE)
        unet = lambda: pipe.unet(latents, 500, context)
        decode = lambda: pipe.vae.decode(z)
        txt2img = lambda: pipe.txt2img(PROMPT, NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE, width=SIDE,
                                       height=SIDE, seed=0)
    else:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(folder("sd1"), torch_dtype=dtype, safety_checker=None)
        load = time.perf_counter() - start
        pipe.set_progress_bar_config(disable=True)
        encode = lambda: pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        unet = lambda: pipe.unet(latents, 500, context).sample
        decode = lambda: pipe.vae.decode(z).sample
        txt2img = lambda: pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                               width=SIDE, height=SIDE, generator=torch.Generator().manual_seed(0)).images
    times = {"load": load, "txt2img": seconds(txt2img)}
    with torch.no_grad():
        times |= {"prompt encoding": seconds(encode, 3), "UNet step": seconds(unet), "VAE decode": seconds(decode)}
    return {"times": times, "peak GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_worker(system: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", system, dtype], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{system} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def flops() -> dict[str, float]:
    """FLOPs of each stage, counted on sdlite's SD 1.5 modules built on the meta device (no memory, no time)."""
    import sdlite
    pipe = sdlite.load(folder("sd1"), device="meta")
    meta = dict(device="meta")
    stages = {"prompt encoding": lambda: [pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long, **meta))
                                          for _ in range(2)],
              "UNet step": lambda: pipe.unet(torch.zeros(2, 4, SIDE // 8, SIDE // 8, **meta), 500,
                                             torch.zeros(2, 77, 768, **meta)),
              "VAE decode": lambda: pipe.vae.decode(torch.zeros(1, 4, SIDE // 8, SIDE // 8, **meta))}
    counted = {}
    for name, f in stages.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            f()
        counted[name] = counter.get_total_flops()
    counted["txt2img"] = counted["prompt encoding"] + STEPS * counted["UNet step"] + counted["VAE decode"]
    return counted


def matmul_peak(dtype: torch.dtype) -> float:
    """FLOP/s of a 4096^3 matrix product, best of 3."""
    a = torch.randn(4096, 4096).to(dtype)
    return 2 * 4096**3 / seconds(lambda: a @ a, 3)


def main() -> None:
    start, about = time.perf_counter(), machine()
    for path in folder("sd1").rglob("*.safetensors"):   # in the page cache before the first worker
        path.read_bytes()
    counted = flops()
    best = {}   # (system, dtype) -> {stage: seconds, "peak GB": GB}
    peak = dict.fromkeys(DTYPES, 0.0)
    for round_ in range(ROUNDS):
        for name, dtype in DTYPES.items():
            peak[name] = max(peak[name], matmul_peak(dtype))
            for system in SYSTEMS:
                result = run_worker(system, name)
                print(f"round {round_ + 1} {system} {name}: {json.dumps(result)}", flush=True)
                old = best.setdefault((system, name), {**result["times"], "peak GB": result["peak GB"]})
                for key, value in {**result["times"], "peak GB": result["peak GB"]}.items():
                    old[key] = min(old[key], value)
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
            f"2 at {SIDE}x{SIDE}; VAE decode: one {SIDE}x{SIDE} image; txt2img: {STEPS} steps at {SIDE}x{SIDE}, "
            f"guidance {GUIDANCE}, the PNDM scheduler, PIL images out. Seconds are the best of {ROUNDS} processes "
            f"per system, alternated; peak memory is each process's ru_maxrss. Measured matmul peak: {peaks}. "
            f"Took {(time.perf_counter() - start) / 60:.0f} minutes.\n\n" + table(header, rows))
    print(text)
    write_section("speed", text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2], DTYPES[sys.argv[3]])))
    else:
        main()
