"""The generated data set and its detector: the detector must read every rendered scene back exactly, since the
default model's prompt-following score is measured with it."""
import random

import numpy as np
from PIL import Image

from sdlite.train import scenes


def test_detector_reads_back_every_scene():
    rng = random.Random(0)
    for scene in scenes.all_scenes():
        image = scenes.render(scene, 64, rng)
        found = scenes.detect(image)
        assert (found.colour, found.shape, found.size, found.row, found.column) == \
            (scene.colour, scene.shape, scene.size, scene.row, scene.column), scene


def test_score_notices_each_wrong_attribute():
    image = scenes.render(scenes.Scene("red", "circle", "large", "top", "left"))
    assert all(scenes.score(scenes.Scene("red", "circle", "large", "top", "left"), image).values())
    wrong = scenes.score(scenes.Scene("blue", "square", "small", "bottom", "left"), image)
    assert wrong == {"colour": False, "shape": False, "size": False, "position": False}


def test_blank_image_has_no_shape():
    assert scenes.detect(Image.new("RGB", (64, 64), "white")).colour is None


def test_detector_ignores_specks():
    """A few stray pixels beside the shape, as a sampler may leave, do not move its position or change its shape."""
    pixels = np.asarray(scenes.render(scenes.Scene("green", "square", "small", "middle", "center"))).copy()
    pixels[2:4, 60:62] = (0, 0, 0)
    found = scenes.detect(pixels)
    assert (found.colour, found.shape, found.row, found.column) == ("green", "square", "middle", "center")


def test_captions():
    scene = scenes.Scene("blue", "square", "small", "top", "right")
    assert scene.caption() == "a small blue square at the top right on a white background"
    assert scene.caption(with_size=False, with_position=False, with_background=False) == "a blue square"


def test_split_holds_out_whole_combinations():
    train, held_out = scenes.split()
    assert len(train) + len(held_out) == len(scenes.all_scenes()) == 324
    assert not set(train) & set(held_out)
    assert len(held_out) == 32
    assert {s.colour for s in held_out} == set(scenes.COLOURS)  # every colour is asked for


def test_dataset_is_seeded_and_captions_name_what_is_drawn():
    images, captions = scenes.dataset(30, scenes.all_scenes(), size=64, seed=3)
    again, _ = scenes.dataset(30, scenes.all_scenes(), size=64, seed=3)
    assert images.shape == (30, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again)
    for image, caption in zip(images, captions):
        found = scenes.detect(image)
        words = caption.split()
        assert found.colour in words and found.shape in words
        if "small" in words or "large" in words:
            assert found.size in words
