"""VAE tiling: the memory and time of decoding a large image whole and in tiles, sdlite next to diffusers.
Run: python benchmarks/tiling.py   (needs `pip install -e .[reference]`; about 6 minutes on 2 cores)

Each system decodes one latent of a SIDE x SIDE image with SD 1.5's VAE (random weights, benchmarks/checkpoints.py)
in fp32, untiled and with tiling on (sdlite: `tiling.tiled_decode(vae, z)` within `runtime.running(vae)`; diffusers:
`pipe.vae.enable_tiling()`; both use 512-pixel tiles that start every 384 pixels), each run in a new process whose
peak memory (VmHWM, benchmarks/memory.py) is taken after the decode. The tiled outputs of the two systems are
compared too.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from memory import peak_gb  # noqa: E402

SD1 = Path("/tmp/sdbench/sd1")   # checkpoints.folder("sd1"); the workers import only the library they measure
SIDE = 1024
OUT = Path("/tmp/sdbench/tiling")


def worker(system: str, tiled: bool) -> dict:
    z = torch.randn(1, 4, SIDE // 8, SIDE // 8, generator=torch.Generator().manual_seed(0))
    if system == "sdlite":
        import sdlite
        from sdlite import runtime, tiling
        vae = sdlite.load(SD1).vae

        def decode(z):
            with runtime.running(vae):   # as the pipeline runs it
                return tiling.tiled_decode(vae, z) if tiled else vae.decode(z)
    else:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(SD1 / "vae")
        if tiled:
            vae.enable_tiling()
        decode = lambda z: vae.decode(z).sample  # noqa: E731
    before = peak_gb()
    with torch.no_grad():
        start = time.perf_counter()
        image = decode(z)
        seconds = time.perf_counter() - start
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(image, OUT / f"{system}-{'tiled' if tiled else 'whole'}.pt")
    return {"seconds": seconds, "peak GB": peak_gb(), "before GB": before}


def main() -> None:
    from checkpoints import folder
    from report import machine, table, write_section
    assert folder("sd1") == SD1
    start, about = time.perf_counter(), machine()
    rows, results = [], {}
    for tiled in (False, True):
        for system in ("sdlite", "diffusers"):
            out = subprocess.run([sys.executable, __file__, "--worker", system, str(int(tiled))], capture_output=True,
                                 text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            results[system, tiled] = r = json.loads(out.stdout.strip().splitlines()[-1])
            print(system, tiled, r, flush=True)
            rows.append([system, "tiles" if tiled else "whole", f"{r['seconds']:.1f}", f"{r['peak GB']:.2f}",
                         f"{r['peak GB'] - r['before GB']:.2f}"])
    a, b = (torch.load(OUT / f"{system}-tiled.pt") for system in ("sdlite", "diffusers"))
    whole = torch.load(OUT / "sdlite-whole.pt")
    header = ["system", "decode", "seconds", "peak memory (GB)", "added by the decode (GB)"]
    text = (f"## VAE tiling\n\n{about}\n\n`python benchmarks/tiling.py`: one {SIDE}x{SIDE} decode with SD 1.5's VAE "
            f"in fp32, whole and in 512-pixel tiles, each in a new process (peak memory: VmHWM; 'added': over "
            f"the process before the decode). sdlite's tiled image against diffusers' tiled image: max abs "
            f"difference {(a - b).abs().max().item():.1e} (values up to {b.abs().max().item():.1f}); tiled against "
            f"whole (what tiling changes): max {(a - whole).abs().max().item():.2f}, mean "
            f"{(a - whole).abs().mean().item():.1e}. Took {(time.perf_counter() - start) / 60:.0f} minutes.\n\n"
            + table(header, rows))
    print(text)
    write_section("tiling", text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2], bool(int(sys.argv[3])))))
    else:
        main()
