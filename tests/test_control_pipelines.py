"""The parity contract for ControlNet and depth-to-image: sdlite gives the uint8 images of diffusers'
StableDiffusionControlNet(|Img2Img|Inpaint)Pipeline and StableDiffusionDepth2ImgPipeline within test_pipeline's
rule (at most 2 levels apart on any pixel, 0.05 on average): one and two ControlNets from folders and single files,
scale / start / end, guess mode, SD1-like and SD2-like models, 4- and 9-channel inpainting; depth-to-image from SD 2
depth's folder and single file, with the depth map given and estimated by the folder's DPT. The reference images and
the models' seeds come from make_control_pipelines.py."""
import hashlib
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sdlite
from sdlite.__main__ import main
from sdlite.dpt import read_depth_map

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


def legacy_hash(path) -> str:
    """A1111's short hash (sd_models.model_hash): SHA-256 of the 64 KiB at 1 MiB, 8 hex digits."""
    return hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


def extension_unit(text: str) -> dict:
    """The ControlNet extension's parse_unit (scripts/infotext.py): `Key: value` items split at ", "."""
    return dict(item.strip().split(": ") for item in text.split(","))


def test_cli_controls_match_the_api_and_png_reads_back(models, capsys, tmp_path):
    """Two --controlnet groups in order, with --guess-mode: the image is the API's with the same Controls, and the
    PNG names each ControlNet as A1111's ControlNet extension does, which A1111's parser and the extension's read."""
    case = CASES["txt2img-sd1-two-dpmpp_2m"]
    a, b = (INPUTS / c["image"] for c in case["controls"])
    out = tmp_path / "c.png"
    code = main(["txt2img", case["prompt"], "--model", str(models / "sd1"), "--steps", "3", "--width", "56",
                 "--height", "40", "--seed", "5", "--scheduler", "euler", "--guidance-scale", "6.5",
                 "--controlnet", str(models / "cn-sd1"), "--control-image", str(a), "--control-scale", "0.7",
                 "--control-start", "0.2", "--control-end", "0.8",
                 "--controlnet", str(models / "cn-sd1b.safetensors"), "--control-image", str(b), "--guess-mode",
                 "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    controls = [sdlite.Control(sdlite.load_controlnet(models / "cn-sd1"), a, 0.7, 0.2, 0.8),
                sdlite.Control(sdlite.load_controlnet(models / "cn-sd1b.safetensors"), b)]
    expected = load(models, "sd1").txt2img(case["prompt"], steps=3, width=56, height=40, seed=5, scheduler="euler",
                                           guidance_scale=6.5, control=controls, guess_mode=True)[0]
    written = Image.open(out)
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))
    got = a1111_parse(written.text["parameters"])
    first, second = extension_unit(got["ControlNet 0"]), extension_unit(got["ControlNet 1"])
    assert first["Model"] == f"cn-sd1 [{legacy_hash(models / 'cn-sd1' / 'diffusion_pytorch_model.safetensors')}]"
    assert second["Model"] == f"cn-sd1b [{legacy_hash(models / 'cn-sd1b.safetensors')}]"
    assert (first["Module"], first["Weight"], first["Guidance Start"], first["Guidance End"]) == \
        ("none", "0.7", "0.2", "0.8")
    assert (second["Weight"], second["Guidance Start"], second["Guidance End"]) == ("1.0", "0.0", "1.0")
    assert first["Control Mode"] == second["Control Mode"] == "ControlNet is more important"   # guess mode
    assert got["Steps"] == "3" and got["Seed"] == "5"


def test_cli_depth2img_matches_reference(models, capsys, tmp_path):
    c = CASES["depth2img-file-map-euler"]
    out = tmp_path / "d.png"
    code = main(["depth2img", c["prompt"], "--model", str(models / "512-depth-ema.safetensors"), "--image", str(INIT),
                 "--depth-map", str(INPUTS / c["depth_map"]), "--strength", str(c["strength"]),
                 "--negative-prompt", c["negative_prompt"], "--steps", str(c["steps"]),
                 "--guidance-scale", str(c["guidance_scale"]), "--seed", str(c["seed"]), "--scheduler", c["scheduler"],
                 "--prompt-syntax", "plain", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert_same_images([Image.open(out).convert("RGB")], REFERENCE["depth2img-file-map-euler"])


def test_depth_single_file_is_sd2_depth(models):
    """The 5-channel single file is SD 2 depth's family: PNDM, epsilon prediction, 512 pixels (its folder's own
    scheduler_config.json and sample size), not the 768 v-prediction model's."""
    single, folder = load(models, "512-depth-ema.safetensors"), load(models, "sd2-depth")
    assert single.unet.config.in_channels == folder.unet.config.in_channels == 5
    assert single.scheduler_config["_class_name"] == folder.scheduler_config["_class_name"] == "PNDMScheduler"
    assert single.scheduler_config["prediction_type"] == folder.scheduler_config["prediction_type"] == "epsilon"
    assert single.default_size == 512
    assert single.depth_model is None and folder.depth_model == models / "sd2-depth"


def test_unets_refuse_the_calls_their_inputs_do_not_fit(models):
    """A 5-channel UNet is sent to depth2img (inpaint included, which crashed on it), depth2img needs one."""
    depth = load(models, "sd2-depth")
    calls = {"txt2img": lambda: depth.txt2img("a", steps=1, width=16, height=16),
             "img2img": lambda: depth.img2img("a", INIT, steps=1),
             "inpaint": lambda: depth.inpaint("a", INIT, MASK, steps=1)}
    for name, call in calls.items():
        with pytest.raises(sdlite.UserError, match="depth-to-image checkpoint .*use depth2img"):
            call()
    with pytest.raises(sdlite.UserError, match="depth2img needs a depth-to-image checkpoint .* has 4"):
        load(models, "sd1").depth2img("a", INIT, depth_map=INPUTS / "depth.png", steps=1)


def assert_refused(code, err, *words):
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("flags, words", [
    (["--control-image", "{a}", "--controlnet", "{cn}"], ["--control-image must follow the --controlnet"]),
    (["--controlnet", "{cn}"], ["needs its --control-image"]),
    (["--controlnet", "{cn}", "--control-image", "{a}", "--control-scale", "strong"], ["--control-scale", "'strong'"]),
    (["--controlnet", "{cn}", "--control-image", "{a}", "--control-scale", "1", "--control-scale", "2"],
     ["--control-scale given twice"]),
    (["--controlnet", "{cn}", "--control-image", "{a}", "--control-start", "0.9", "--control-end", "0.1"],
     ["start 0.9", "end 0.1"]),
    (["--controlnet", "{cn}", "--control-image", "{a}", "--control-scale", "nan"], ["scale", "finite"]),
    (["--controlnet", "{root}/nope", "--control-image", "{a}"], ["--controlnet", "nope"]),
    (["--controlnet", "{cn}", "--control-image", "{root}/nope.png"], ["--control-image", "nope.png"]),
    (["--controlnet", "{root}/cn-sd2", "--control-image", "{a}"], ["ControlNet 0 (cn-sd2)", "made for this model"]),
])
def test_cli_bad_control_flags(models, capsys, tmp_path, flags, words):
    out = tmp_path / "x.png"
    fill = dict(a=INPUTS / "control_a.png", cn=models / "cn-sd1", root=models)
    code = main(["txt2img", "a castle", "--model", str(models / "sd1"), "--steps", "1", "--width", "16",
                 "--height", "16", "--out", str(out), "--quiet"] + [flag.format(**fill) for flag in flags])
    assert_refused(code, capsys.readouterr().err.strip(), *words)
    assert not out.exists()


@pytest.mark.parametrize("model, flags, words", [
    ("512-depth-ema.safetensors", [], ["no depth map and no depth estimator", "--depth-map", "--depth-model"]),
    ("512-depth-ema.safetensors", ["--depth-model", "{root}/nope"], ["--depth-model", "not a folder"]),
    ("512-depth-ema.safetensors", ["--depth-map", "{root}/nope.png"], ["--depth-map", "no such file"]),
    ("sd1", ["--depth-map", "{depth}"], ["depth2img needs a depth-to-image checkpoint"]),
])
def test_cli_bad_depth2img_input(models, capsys, tmp_path, model, flags, words):
    out = tmp_path / "x.png"
    fill = dict(root=models, depth=INPUTS / "depth.png")
    code = main(["depth2img", "a castle", "--model", str(models / model), "--image", str(INIT), "--steps", "2",
                 "--out", str(out), "--quiet"] + [flag.format(**fill) for flag in flags])
    assert_refused(code, capsys.readouterr().err.strip(), *words)
    assert not out.exists()


def test_cli_txt2img_on_a_depth_model_names_depth2img(models, capsys, tmp_path):
    code = main(["txt2img", "a castle", "--model", str(models / "sd2-depth"), "--steps", "1", "--width", "16",
                 "--height", "16", "--out", str(tmp_path / "x.png"), "--quiet"])
    assert_refused(code, capsys.readouterr().err.strip(), "use depth2img")


def test_depth_maps_are_read_as_their_levels(tmp_path):
    """8-bit grey levels, 16-bit ones as they are (not cut to 8 bits), colour maps as luma; a tensor (H, W) or
    (1, H, W) as it is, another shape refused."""
    levels = np.asarray(Image.open(INPUTS / "depth.png"))
    assert np.array_equal(read_depth_map(INPUTS / "depth.png")[0].numpy(), levels)
    wide = levels.astype(np.uint16) * 257 + 3                         # 16-bit: the low byte matters too
    Image.fromarray(wide).save(tmp_path / "d16.png")
    assert np.array_equal(read_depth_map(tmp_path / "d16.png")[0].numpy(), wide)
    grey_rgb = Image.fromarray(np.repeat(levels[..., None], 3, axis=2))
    assert np.array_equal(read_depth_map(grey_rgb)[0].numpy(), levels)
    depth = torch.rand(43, 61)
    assert torch.equal(read_depth_map(depth), depth[None]) and torch.equal(read_depth_map(depth[None]), depth[None])
    with pytest.raises(sdlite.UserError, match=r"\(H, W\) or \(1, H, W\), not \(2, 43, 61\)"):
        read_depth_map(torch.rand(2, 43, 61))
    with pytest.raises(sdlite.UserError, match="cannot be read as an image"):
        read_depth_map(tmp_path / "missing.png")
