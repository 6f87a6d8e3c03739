"""torch.compile (inductor, with freezing) of sdlite's UNet against sdlite's eager fast paths (runtime.running): one
guided UNet step of the random SD 1.5 (benchmarks/checkpoints.py), its compile time cold (an empty inductor cache)
and warm (a new process on the cache the cold one filled), the step's time, the process's peak memory, and where the
compiled step's time goes.
Run: python benchmarks/compile.py   (needs `pip install -e .[reference]` for the report; about 10 minutes on 2 cores)

Each measurement is a process of its own (compile caches, peak memory). Weights: the fp32 folder loaded in the row's
dtype, as openvino_speed.py's rows. The compiled UNet is the plain module (no runtime.py swaps), compiled with
`torch._inductor.config.freezing = True` (weights folded in as constants and packed for oneDNN, as inference wants).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from openvino_speed import inputs  # noqa: E402
from speed import SD1  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [("fp32", 256), ("bf16", 256), ("bf16", 512)]
STEPS = 3


def peak_gb() -> float:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) / 2**20


def worker(mode: str, name: str, side: int) -> dict:
    """One process: load, the first call (compiling, or packing), STEPS timed calls, the peak; compiled, the
    profiler's operators of one more call (the kernels inductor calls out to, and its own fused code)."""
    import sdlite
    from sdlite import runtime
    torch.set_num_threads(2)
    dtype = DTYPES[name]
    pipe = sdlite.load(SD1, dtype=dtype)
    unet = pipe.unet.eval().requires_grad_(False)
    x, t, context = inputs("unet", side)
    args = (x.to(dtype), int(t), context.to(dtype))
    if mode == "eager":
        def step():
            with runtime.running(unet):
                return unet(*args)
    else:
        from torch._inductor import config as inductor
        inductor.freezing = True
        compiled = torch.compile(unet)

        def step():
            return compiled(*args)
    result = {}
    with torch.no_grad():
        start = time.perf_counter()
        step()
        result["first"] = time.perf_counter() - start
        times = []
        for _ in range(STEPS):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result["step"] = min(times)
        result["peak"] = peak_gb()
        if mode != "eager":
            with torch.profiler.profile() as prof:
                step()
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
            result["ops"] = [(e.key, e.self_cpu_time_total / 1000) for e in ops[:5]]
    return result


def run(mode: str, name: str, side: int, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, __file__, "--worker", mode, name, str(side)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    from report import machine, table, write_section
    start, about, rows, profiles = time.perf_counter(), machine(), [], []
    for name, side in CASES:
        with tempfile.TemporaryDirectory() as cache:
            eager = run("eager", name, side, cache)
            cold = run("cold", name, side, cache)
            warm = run("warm", name, side, cache)
        print(name, side, eager, cold, warm, flush=True)
        rows.append([name, f"{side}²", f"{eager['step']:.2f} s", f"{cold['step']:.2f} s, {warm['step']:.2f} s",
                     f"{cold['step'] / eager['step']:.2f}", f"{cold['first']:.0f} s", f"{warm['first']:.1f} s",
                     f"{eager['peak']:.2f} GB", f"{max(cold['peak'], warm['peak']):.2f} GB"])
        profiles.append(f"{name} {side}²: " + ", ".join(f"{op} {ms:.0f} ms" for op, ms in cold["ops"]))
    header = ["dtype", "UNet step", "sdlite eager", "compiled (cold run, warm run)", "compiled / eager",
              "compile, cold cache", "compile, warm cache", "peak, eager", "peak, compiled"]
    text = (f"## torch.compile\n\n{about}\n\n`python benchmarks/compile.py`: one guided step of the random SD 1.5 "
            f"UNet (the fp32 folder loaded in the row's dtype), sdlite's eager fast paths (runtime.running) against "
            f"`torch.compile` of the plain UNet with inductor's freezing (weights folded in and packed for oneDNN); "
            f"each a process of its own; step: best of {STEPS} after the first call; compile: the first call's time, "
            f"with an empty inductor cache and then with the cache it filled; peak: the process's VmHWM. Took "
            f"{(time.perf_counter() - start) / 60:.0f} minutes.\n\n" + table(header, rows)
            + "\n\nThe compiled step's top operators (torch.profiler, self time):\n\n"
            + "\n".join(f"- {p}" for p in profiles))
    print(text)
    write_section("compile", text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
