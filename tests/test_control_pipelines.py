"""The parity contract for ControlNet and depth-to-image: sdlite gives the uint8 images of diffusers'
StableDiffusionControlNet(|Img2Img|Inpaint)Pipeline and StableDiffusionDepth2ImgPipeline within test_pipeline's
rule (at most 2 levels apart on any pixel, 0.05 on average): one and two ControlNets from folders and single files,
scale / start / end, guess mode, SD1-like and SD2-like models, 4- and 9-channel inpainting; depth-to-image from SD 2
depth's folder and single file, with the depth map given and estimated by the folder's DPT. The reference images and
the models' seeds come from make_control_pipelines.py."""
import json
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import sdlite
from sdlite.__main__ import main

from conftest import FIXTURES
from test_pipeline import assert_same_images
from test_png_info import a1111_parse

sys.path.insert(0, str(FIXTURES))
import make_control_pipelines  # noqa: E402  (the ControlNets and the depth model are redrawn from seeds)

INPUTS = FIXTURES / "control_pipelines"
with safe_open(INPUTS / "images.safetensors", "np") as f:
    REFERENCE = {name: f.get_tensor(name) for name in f.keys()}
    CASES = json.loads(f.metadata()["cases"])
INIT, MASK = FIXTURES / "pipelines" / "init.png", FIXTURES / "pipelines" / "mask.png"
_loaded = {}


@pytest.fixture(scope="module")
def models(checkpoints, tmp_path_factory):
    """checkpoints' sd1, sd2 and sd1-inpaint beside the ControlNets (cn-*/ and cn-*.safetensors), SD 2 depth's folder
    (sd2-depth/) and its single file (512-depth-ema.safetensors)."""
    root = tmp_path_factory.mktemp("control")
    make_control_pipelines.write_models(checkpoints, root)
    for name in ("sd1", "sd2", "sd1.safetensors", "sd2.safetensors", "sd1-inpaint.safetensors"):
        (root / name).symlink_to(checkpoints / name)
    return root


def load(root, path: str):
    if path not in _loaded:
        _loaded[path] = sdlite.load(root / path)
    return _loaded[path]


def controls(root, case: dict) -> list[sdlite.Control]:
    return [sdlite.Control(sdlite.load_controlnet(root / (c["controlnet"] + (".safetensors" if c["layout"] == "file"
                                                                               else ""))),
                           INPUTS / c["image"], c["scale"], c["start"], c["end"]) for c in case["controls"]]


def settings(case: dict) -> dict:
    return dict(negative_prompt=case["negative_prompt"], steps=case["steps"], guidance_scale=case["guidance_scale"],
                seed=case["seed"], scheduler=case["scheduler"], batch_size=case["batch_size"])


@pytest.mark.parametrize("case", [name for name, case in CASES.items() if case["kind"] != "depth2img"])
def test_controlnet_matches_reference(models, case):
    c = CASES[case]
    family = "sd1-inpaint.safetensors" if c["family"] == "sd1-inpaint" else c["family"]
    pipe = load(models, family)
    control = dict(control=controls(models, c), guess_mode=c["guess_mode"])
    if c["kind"] == "txt2img":
        images = pipe.txt2img(c["prompt"], width=c["width"], height=c["height"], **settings(c), **control)
    elif c["kind"] == "img2img":
        images = pipe.img2img(c["prompt"], INIT, strength=c["strength"], **settings(c), **control)
    else:
        images = pipe.inpaint(c["prompt"], INIT, MASK, strength=c["strength"], **settings(c), **control)
    assert_same_images(images, REFERENCE[case])


@pytest.mark.parametrize("case", [name for name, case in CASES.items() if case["kind"] == "depth2img"])
def test_depth2img_matches_reference(models, case):
    c = CASES[case]
    pipe = load(models, "sd2-depth" if c["layout"] == "folder" else "512-depth-ema.safetensors")
    depth_map = c["depth_map"] and INPUTS / c["depth_map"]
    images = pipe.depth2img(c["prompt"], INIT, depth_map=depth_map, strength=c["strength"], **settings(c))
    assert_same_images(images, REFERENCE[case])
