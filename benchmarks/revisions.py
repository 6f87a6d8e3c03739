"""sdlite against itself at another git revision, on the same work in the same run: the check that a change (a
refactor, say) made no stage slower. Run: python benchmarks/revisions.py OLD_REV [NEW_REV]   (NEW_REV: the work tree)

Each revision is checked out into a temporary git worktree; a worker process per revision and round loads the random
SD 1.5 folder (benchmarks/checkpoints.py) and times, on the sampling loop's path, one UNet step on a guided batch of 2
and one VAE decode, at SIDE x SIDE. The revisions alternate round by round, so that a busy moment of a shared machine
slows one call, not one revision; a stage's time is its best over the rounds.
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SD1 = Path("/tmp/sdbench/sd1")
SIDE, ROUNDS, REPEATS = 256, 3, 2


def worker(dtype_name: str) -> None:
    """Runs inside a revision's tree: prints {stage: best seconds}."""
    import torch
    import sdlite
    dtype = getattr(torch, dtype_name)
    pipe = sdlite.load(SD1, dtype=dtype)
    torch.manual_seed(0)
    x = torch.randn(2, 4, SIDE // 8, SIDE // 8, dtype=dtype)
    context = torch.randn(2, 77, 768, dtype=dtype)
    try:                                    # the runtime seam (sdlite/runtime.py)
        from sdlite import runtime
        unet_path, vae_path = runtime.running(pipe.unet), runtime.running(pipe.vae)
    except ImportError:                     # before it: packing and streaming called by the pipeline
        from sdlite.onednn import pack_convolutions
        from sdlite.weights import streaming
        pack_convolutions(pipe.unet)
        unet_path, vae_path = streaming(pipe.unet), streaming(pipe.vae)
    times = {}
    with torch.no_grad():
        with unet_path:
            pipe.unet(x, 500, context)      # the first call packs the weights: not timed
            times["UNet step"] = best(lambda: pipe.unet(x, 500, context))
        with vae_path:
            times["VAE decode"] = best(lambda: pipe.vae.decode(x[:1]))
    print(json.dumps(times))


def best(f) -> float:
    result = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        f()
        result.append(time.perf_counter() - start)
    return min(result)


def tree(rev: str | None, where: Path) -> Path:
    if rev is None:
        return ROOT
    path = where / rev
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def main() -> None:
    old, new = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory() as where:
        trees = {old: tree(old, Path(where)), new or "work tree": tree(new, Path(where))}
        try:
            for dtype in ("float32", "bfloat16"):
                results = {name: {} for name in trees}
                for _ in range(ROUNDS):
                    for name, path in trees.items():
                        out = subprocess.run([sys.executable, __file__, "--worker", dtype], cwd=path,
                                             capture_output=True, text=True, env={"PYTHONPATH": str(path),
                                                                                  "PATH": "/usr/bin:/bin"})
                        if out.returncode:
                            raise RuntimeError(out.stderr[-2000:])
                        for stage, seconds in json.loads(out.stdout.strip().splitlines()[-1]).items():
                            results[name][stage] = min(seconds, results[name].get(stage, float("inf")))
                (a, b) = results.values()
                for stage in a:
                    print(f"{dtype} {stage} at {SIDE}x{SIDE}: {old} {a[stage]:.2f} s, {new or 'work tree'} "
                          f"{b[stage]:.2f} s, ratio {b[stage] / a[stage]:.3f}", flush=True)
        finally:
            for name, path in trees.items():
                if path != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main()
