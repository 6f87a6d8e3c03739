"""Control images made without a model, so that ControlNet works offline: Canny edges.

Canny (1986, "A Computational Approach to Edge Detection"), as OpenCV's cv2.Canny(image, low, high) computes it, which
is what the ControlNet authors' and diffusers' examples call on the image (no blur first, 3x3 Sobel, L1 magnitude):

    image (H, W, C) uint8 -> Sobel dx, dy per channel (borders replicated) -> per pixel the channel of the largest
    |dx| + |dy| -> non-maximum suppression across the edge (one of 4 directions) -> magnitude > high: an edge,
    > low: an edge if 8-connected to one (hysteresis) -> (H, W) uint8, 255 on edges

All of it is integer arithmetic, as in OpenCV, so the two agree pixel for pixel (benchmarks/canny.py measures it).
"""
import numpy as np
from PIL import Image

from .errors import UserError

# tan(22.5 degrees) in fixed point with 15 fractional bits, as OpenCV compares directions without division
TAN_22_5 = round(0.4142135623730950488 * (1 << 15))


def sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C) -> the 3x3 Sobel derivatives d/dx and d/dy, (H, W, C) int32, the border pixels repeated outward."""
    p = np.pad(image.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def local_maxima(magnitude: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: a pixel stays if its magnitude is a maximum among its two neighbours across the edge,
    along the gradient's direction rounded to 0, 45, 90 or 135 degrees (outside the image: magnitude 0). The ties go
    as in OpenCV: greater than the left / upper neighbour and at least the right / lower one; strictly greater than
    both diagonal neighbours."""
    m = np.pad(magnitude, 1)
    centre = magnitude
    x, y = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << 15
    tan22 = x * TAN_22_5
    horizontal = y < tan22                          # |dy| / |dx| < tan 22.5: the gradient points along x
    vertical = ~horizontal & (y > tan22 + (x << 16))   # |dy| / |dx| > tan 67.5 = tan 22.5 + 2
    same_sign = (dx ^ dy) >= 0                      # the gradient points down-right or up-left
    along_x = (centre > m[1:-1, :-2]) & (centre >= m[1:-1, 2:])
    along_y = (centre > m[:-2, 1:-1]) & (centre >= m[2:, 1:-1])
    falling = (centre > m[:-2, :-2]) & (centre > m[2:, 2:])    # up-left and down-right neighbours
    rising = (centre > m[:-2, 2:]) & (centre > m[2:, :-2])     # up-right and down-left neighbours
    return np.where(horizontal, along_x, np.where(vertical, along_y, np.where(same_sign, falling, rising)))


def hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The pixels of `weak` (which holds `strong`) 8-connected to a pixel of `strong` through pixels of `weak`."""
    edges = strong.copy()
    height, width = edges.shape
    stack = list(zip(*np.nonzero(strong)))
    while stack:
        y, x = stack.pop()
        for ny in range(max(y - 1, 0), min(y + 2, height)):
            for nx in range(max(x - 1, 0), min(x + 2, width)):
                if weak[ny, nx] and not edges[ny, nx]:
                    edges[ny, nx] = True
                    stack.append((ny, nx))
    return edges


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (H, W) uint8 edges (255) on 0, as cv2.Canny(image, low, high): L1 gradient
    magnitude |dx| + |dy|, of the channel where it is largest (the first of equals); thresholds compared as
    magnitude > floor(threshold)."""
    if not (0 <= low <= high < float("inf")):
        raise UserError(f"canny thresholds low {low} and high {high}: need 0 <= low <= high")
    channels = image.reshape(*image.shape[:2], -1)
    dx, dy = sobel(channels)
    magnitude = np.abs(dx) + np.abs(dy)
    best = magnitude.argmax(axis=2)[..., None]      # the first channel of the largest magnitude
    magnitude, dx, dy = (np.take_along_axis(a, best, axis=2)[..., 0] for a in (magnitude, dx, dy))
    candidates = local_maxima(magnitude, dx, dy)
    weak = candidates & (magnitude > int(low))
    strong = weak & (magnitude > int(high))
    return hysteresis(strong, weak).astype(np.uint8) * 255


def canny_image(image: Image.Image, low: float, high: float) -> Image.Image:
    """An RGB image -> its Canny edges as a greyscale image (white on black), the control image of a canny
    ControlNet."""
    return Image.fromarray(canny(np.asarray(image), low, high), mode="L")
