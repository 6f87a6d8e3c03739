"""Canny edges (sdlite/preprocess.py) on images whose edges can be worked out by hand; benchmarks/canny.py compares
with OpenCV on real images. A step of contrast c has the 3x3 Sobel magnitude 4c on both pixels beside it."""
import numpy as np
import pytest
from PIL import Image

from sdlite import UserError
from sdlite.__main__ import main
from sdlite.preprocess import canny


def step(height=30, width=40, at=20, contrast=255, horizontal=False) -> np.ndarray:
    """Black left of column `at` (above row `at`), grey `contrast` from there."""
    image = np.zeros((height, width), np.uint8)
    if horizontal:
        image[at:] = contrast
    else:
        image[:, at:] = contrast
    return image


def test_a_step_edge_is_one_pixel_wide_on_its_dark_side():
    # columns 19 and 20 both have magnitude 4 * 255; of equals across the edge the left (upper) one stays
    expected = np.zeros((30, 40), np.uint8)
    expected[:, 19] = 255
    assert np.array_equal(canny(step(), 100, 200), expected)
    expected = np.zeros((30, 40), np.uint8)
    expected[19] = 255
    assert np.array_equal(canny(step(horizontal=True), 100, 200), expected)


def test_a_flat_image_has_no_edges():
    assert not canny(np.full((17, 23), 130, np.uint8), 0, 0).any()
    assert not canny(np.full((17, 23, 3), 7, np.uint8), 1, 2).any()


def test_a_thin_line_has_an_edge_on_each_side():
    image = np.zeros((25, 40), np.uint8)
    image[:, 20] = 255                 # the line's own column has dx = 0: a minimum, between two edges
    edges = canny(image, 100, 200)
    assert set(np.nonzero(edges.any(axis=0))[0]) == {19, 21} and edges[:, [19, 21]].all()


def test_thresholds_compare_magnitude_above_their_integer_part():
    image = step(contrast=50)          # magnitude 200 beside the step
    assert not canny(image, 100, 200).any()
    assert canny(image, 100, 199.5).any()        # above 199
    assert not canny(image, 200, 200.9).any()


def test_weak_edges_stay_only_where_connected_to_strong_ones():
    image = np.zeros((40, 60), np.uint8)
    image[:20, 30:] = 40               # magnitude 160: weak between 100 and 200 ...
    image[20:, 30:] = 200              # ... continued below by a strong edge in the same column (800)
    image[:, 10:20] = 40               # a bar of weak edges on their own (columns 9 and 19, magnitude 160)
    edges = canny(image, 100, 200)
    assert edges[:15, 29].all() and edges[25:, 29].all()
    assert not edges[:, :25].any()


def test_colour_images_take_the_channel_of_largest_gradient():
    grey = step(contrast=90)
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 2] = grey                 # the step in blue only
    rgb[..., 0] = 10                   # flat red
    assert np.array_equal(canny(rgb, 100, 200), canny(grey, 100, 200))


@pytest.mark.parametrize("low, high", [(200, 100), (-1, 10), (float("nan"), 10)])
def test_bad_thresholds_are_one_line(low, high):
    with pytest.raises(UserError) as e:
        canny(step(), low, high)
    assert "\n" not in str(e.value)


def test_command_writes_the_edges_and_never_overwrites(tmp_path, capsys):
    Image.fromarray(step()).convert("RGB").save(tmp_path / "in.png")
    out = tmp_path / "edges.png"
    assert main(["preprocess", "canny", str(tmp_path / "in.png"), "--low", "100", "--high", "200",
                 "--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), canny(step(), 100, 200))
    before = out.read_bytes()
    assert main(["preprocess", "canny", str(tmp_path / "in.png"), "--low", "1", "--out", str(out)]) == 2
    assert out.read_bytes() == before
    assert main(["preprocess", "canny", str(tmp_path / "in.png"), "--low", "1", "--out", str(out),
                 "--overwrite"]) == 0
    assert main(["preprocess", "canny", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert main(["preprocess", "canny", str(tmp_path / "in.png"), "--low", "300",
                 "--out", str(tmp_path / "y.png")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
