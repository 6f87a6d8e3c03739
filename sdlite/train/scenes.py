"""The data set sdlite trains its default model on, and the detector that checks what the model draws.

A scene is one flat-coloured shape on a white background, described by a caption that names its colour, shape,
size and position: "a small blue square at the top right on a white background". Scenes are drawn with PIL at
four times the image size and reduced, so edges are anti-aliased as in a photograph of a drawing.

The detector reads a scene back from an image: the pixels far from white are the shape, and of them it keeps the
largest connected blob. Its median colour's nearest palette colour is the colour; the centre of its bounding box gives
the position (the image cut in thirds); the share of the bounding box that it fills gives the shape (a square fills
all of it, a circle pi/4, a triangle half); its area gives the size. It is exact on rendered scenes, and it is how
the benchmark and the tests score whether a generated image follows its prompt.
"""
import math
import random
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (240, 200, 30), "purple": (140, 50, 170), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.4}  # width of the shape, as a fraction of the image side
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
POSITIONS = {  # (row, column) -> the words of the caption
    ("top", "left"): "at the top left", ("top", "center"): "at the top", ("top", "right"): "at the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the middle", ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}
BACKGROUND = "on a white background"
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    row: str
    column: str

    def caption(self, with_size: bool = True, with_position: bool = True, with_background: bool = True) -> str:
        """ "a small blue square at the top right on a white background", or a shorter caption leaving words out."""
        words = ["a", self.size if with_size else "", self.colour, self.shape,
                 POSITIONS[self.row, self.column] if with_position else "", BACKGROUND if with_background else ""]
        return " ".join(w for w in words if w)


def all_scenes() -> list[Scene]:
    """Every combination of colour, shape, size and position: 6 x 3 x 2 x 9 = 324 scenes."""
    return [Scene(c, s, z, r, col) for c in COLOURS for s in SHAPES for z in SIZES for r in ROWS for col in COLUMNS]


def split(held_out_share: float = 0.1, seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes): a fixed random share of the combinations is never trained on, so the
    benchmark asks for combinations of words the model has seen only apart."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    n = round(held_out_share * len(scenes))
    return scenes[n:], scenes[:n]


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """The scene as an RGB image of size x size. With `rng`, the shape is moved by up to 4% of the side in each
    direction, so that the images of one caption are not all alike."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), "white")
    width = SIZES[scene.size] * big
    jitter = 0.04 * big
    dx, dy = (rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)) if rng else (0.0, 0.0)
    margin = 0.05 * big + width / 2  # the centre of an edge cell, so that the largest shape stays inside
    cx = [margin, big / 2, big - margin][COLUMNS.index(scene.column)] + dx
    cy = [margin, big / 2, big - margin][ROWS.index(scene.row)] + dy
    box = (cx - width / 2, cy - width / 2, cx + width / 2, cy + width / 2)
    draw = ImageDraw.Draw(image)
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif scene.shape == "square":
        draw.rectangle(box, fill=colour)
    else:  # an upright isosceles triangle filling the box
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return image.resize((size, size), Image.Resampling.BOX)


def dataset(n: int, scenes: list[Scene], size: int = 64, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """n training pairs: uint8 images (n, size, size, 3) and their captions. Each caption names colour and shape;
    the size, the position and the background are each left out of some captions (30%, 30%, 50%), so the model
    also learns prompts as short as "a red circle", and draws any size or position for them."""
    rng = random.Random(seed)
    images, captions = np.empty((n, size, size, 3), dtype=np.uint8), []
    for i in range(n):
        scene = rng.choice(scenes)
        images[i] = np.asarray(render(scene, size, rng))
        captions.append(scene.caption(with_size=rng.random() > 0.3, with_position=rng.random() > 0.3,
                                      with_background=rng.random() > 0.5))
    return images, captions


@dataclass(frozen=True)
class Detection:
    colour: str | None  # None: no shape found
    shape: str | None
    size: str | None
    row: str | None
    column: str | None


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Colour, shape, size and position of the one shape on a white background, read back from the pixels."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    side = pixels.shape[0]
    # a pixel belongs to the shape if it is far from white; anti-aliased edges (half white) do not
    mask = (255 - pixels.min(axis=2)) > 100
    blob = largest_blob(mask)
    if blob.sum() < 0.003 * side * side:
        return Detection(None, None, None, None, None)
    colour = np.median(pixels[blob], axis=0)
    nearest = min(COLOURS, key=lambda name: np.sum((np.array(COLOURS[name]) - colour) ** 2))
    ys, xs = np.nonzero(blob)
    fill = blob.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"  # 1, pi/4 = 0.79, 1/2
    width = math.sqrt(blob.sum() / {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}[shape])
    size = "large" if width / side > sum(SIZES.values()) / 2 else "small"
    centre_y, centre_x = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2  # of the bounding box
    row, column = ROWS[min(int(3 * centre_y / side), 2)], COLUMNS[min(int(3 * centre_x / side), 2)]
    return Detection(nearest, shape, size, row, column)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask, found by breadth-first search."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    h, w = mask.shape
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label += 1
        labels[start], queue, count = label, deque([start]), 0
        while queue:
            y, x = queue.popleft()
            count += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if count > best_size:
            best, best_size = label, count
    return labels == best if best else np.zeros_like(mask)


def score(scene: Scene, image: Image.Image) -> dict[str, bool]:
    """Whether the image shows the scene's colour, shape, size and position (row and column both right)."""
    found = detect(image)
    return {"colour": found.colour == scene.colour, "shape": found.shape == scene.shape,
            "size": found.size == scene.size, "position": (found.row, found.column) == (scene.row, scene.column)}
