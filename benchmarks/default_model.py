"""How well the shipped default model follows prompts, and how fast it is. Run: python benchmarks/default_model.py

For every held-out combination of colour, shape, size and position (scenes.split(): 32 of the 324, never in the
training set) it generates images from the full caption at the command line's defaults (its DDIM scheduler, 50
steps, guidance 7.5), and for comparison from 32 combinations that were trained on; sdlite.train.scenes.detect reads each
image back. Then it times `python -m sdlite txt2img "a red circle"` as a user runs it (a new process: start-up,
loading and generation, PNG written). Writes benchmarks/DEFAULT_MODEL.md and prints the table.
"""
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sdlite  # noqa: E402
from sdlite.train import scenes  # noqa: E402

MODEL = ROOT / "weights" / "default"
SEEDS = (0, 1, 2, 3)
CLI_RUNS = 3
ATTRIBUTES = ("colour", "shape", "size", "position")


def accuracy(pipe: sdlite.Pipeline, prompts: list[tuple[scenes.Scene, str]]) -> tuple[dict[str, float], float]:
    """Share of images whose detected attribute matches the caption, and seconds per image (in-process)."""
    right = dict.fromkeys(ATTRIBUTES, 0)
    start = time.perf_counter()
    for scene, caption in prompts:
        for seed in SEEDS:
            for attribute, ok in scenes.score(scene, pipe.txt2img(caption, seed=seed)[0]).items():
                right[attribute] += ok
    n = len(prompts) * len(SEEDS)
    return {a: right[a] / n for a in ATTRIBUTES}, (time.perf_counter() - start) / n


def cli_seconds(threads: str | None) -> list[float]:
    """Wall-clock seconds of the command, with torch's default number of threads or OMP_NUM_THREADS=threads."""
    times = []
    env = {**os.environ, "OMP_NUM_THREADS": threads} if threads else None
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(CLI_RUNS):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sdlite", "txt2img", "a red circle", "--seed", str(i),
                            "--out", f"{tmp}/{i}.png"], cwd=ROOT, check=True, capture_output=True, env=env)
            times.append(time.perf_counter() - start)
    return times


def main():
    torch.set_num_threads(1)  # small convolutions gain nothing from a second thread on a busy machine
    pipe = sdlite.load(MODEL)
    train_scenes, held_out = scenes.split()
    rows = {
        "held-out, full caption": [(s, s.caption()) for s in held_out],
        "trained-on, full caption": [(s, s.caption()) for s in train_scenes[:len(held_out)]],
    }
    results = {name: accuracy(pipe, prompts) for name, prompts in rows.items()}
    cli = {"torch's default threads": cli_seconds(None), "OMP_NUM_THREADS=1": cli_seconds("1")}
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    parameters = {name: sum(p.numel() for p in module.parameters())
                  for name, module in (("UNet", pipe.unet), ("VAE", pipe.vae), ("text encoder", pipe.text_encoder))}

    lines = [
        "# The default model (weights/default)",
        "",
        "Written by `python benchmarks/default_model.py`. Images from the command line's defaults (DDIM, 50 steps, "
        "guidance 7.5), 64 x 64, seeds " + ", ".join(map(str, SEEDS)) + " for each caption; `sdlite.train.scenes.detect` "
        "reads colour, shape, size and position back (it reads every rendered training scene exactly: "
        "tests/test_scenes.py). Held-out captions name combinations never trained on (`scenes.split()`). "
        "Position counts as right when both the row and the column (of a 3 x 3 grid) are.",
        "",
        "| prompts | images | colour | shape | size | position | s / image (in-process) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (acc, seconds) in results.items():
        n = len(rows[name]) * len(SEEDS)
        lines.append(f"| {name} | {n} | " + " | ".join(f"{100 * acc[a]:.0f}%" for a in ATTRIBUTES)
                     + f" | {seconds:.2f} |")
    lines += [
        "",
        "`python -m sdlite txt2img \"a red circle\"` (a new process: start-up, loading, 50 steps, PNG), "
        f"{CLI_RUNS} runs: " + "; ".join(f"{name}: " + ", ".join(f"{t:.1f}" for t in times) + " s"
                                         for name, times in cli.items()) + ".",
        "",
        f"Size on disk: {size / 2**20:.1f} MB (fp16). Parameters: "
        + ", ".join(f"{name} {n / 1e6:.2f} M" for name, n in parameters.items()) + ".",
        "",
        f"In-process generation on {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; the "
        "machine (2 cores) was shared with other jobs, so the times are upper bounds.",
    ]
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "DEFAULT_MODEL.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
