"""sdlite's Canny edges (sdlite/preprocess.py) next to OpenCV's cv2.Canny, which the ControlNet examples call.
Run: python benchmarks/canny.py [IMAGE ...]   (needs `pip install -e .[reference]` for opencv-python-headless; a few
seconds)

For each image (the given ones, else a few made here: drawn shapes with anti-aliased edges and text, smooth random
"terrain" upscaled bicubically, noisy gradients, and the pipelines fixture's init.png) and each pair of thresholds it
prints the share of pixels on which the two agree, the share of edge pixels, and both times. Both run on the RGB
array as the examples pass it (np.array of a PIL image).
"""
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sdlite.image import open_rgb  # noqa: E402
from sdlite.preprocess import canny  # noqa: E402

THRESHOLDS = [(100, 200), (50, 150), (20, 60), (80.5, 160.9)]


def made_images() -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    shapes = Image.new("RGB", (640, 448), (40, 60, 90))
    draw = ImageDraw.Draw(shapes)
    for _ in range(25):
        x, y = rng.randint(0, 600), rng.randint(0, 420)
        box = [x, y, x + rng.randint(10, 200), y + rng.randint(10, 150)]
        colour = tuple(int(c) for c in rng.randint(0, 256, 3))
        (draw.ellipse if rng.rand() < 0.5 else draw.rectangle)(box, fill=colour)
    draw.text((30, 30), "sdlite canny 0123456789", fill=(250, 250, 250))
    shapes = shapes.filter(ImageFilter.GaussianBlur(1.2))          # anti-aliased, as photographed edges are
    terrain = Image.fromarray(rng.randint(0, 256, (24, 32, 3)).astype(np.uint8)).resize((512, 384), Image.BICUBIC)
    gradient = np.linspace(0, 255, 500)[None, :, None] * np.ones((300, 1, 3)) + rng.normal(0, 12, (300, 500, 3))
    return {"shapes 640x448": np.asarray(shapes), "terrain 512x384": np.asarray(terrain),
            "noisy gradient 500x300": gradient.clip(0, 255).astype(np.uint8),
            "init.png 61x43": np.asarray(open_rgb(ROOT / "tests" / "fixtures" / "pipelines" / "init.png"))}


def main() -> None:
    images = {path: np.asarray(open_rgb(path)) for path in sys.argv[1:]} or made_images()
    print(f"OpenCV {cv2.__version__}")
    print(f"{'image':<24} {'low':>6} {'high':>6} {'agree %':>9} {'edges %':>8} {'sdlite s':>9} {'OpenCV s':>9}")
    for name, image in images.items():
        for low, high in THRESHOLDS:
            start = time.perf_counter()
            ours = canny(image, low, high)
            ours_time = time.perf_counter() - start
            start = time.perf_counter()
            theirs = cv2.Canny(image, low, high)
            their_time = time.perf_counter() - start
            agree = 100 * (ours == theirs).mean()
            print(f"{str(name)[:24]:<24} {low:>6} {high:>6} {agree:>9.4f} {100 * (theirs > 0).mean():>8.2f} "
                  f"{ours_time:>9.3f} {their_time:>9.4f}")


if __name__ == "__main__":
    main()
