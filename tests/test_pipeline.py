"""The parity contract: for the same checkpoint, prompt, settings and seed, sdlite gives the uint8 images of
diffusers' StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline (with the
scheduler swapped in by from_config): at most 2 levels apart on any pixel and 0.05 on average. For SD1-like and
SD2-like (v-prediction) checkpoints, both layouts, 4- and 9-channel inpainting, every sampler, a batch of 2 and
non-square sizes. The reference images come from make_pipelines.py."""
import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import sdlite
from sdlite import runtime

from conftest import FIXTURES

with safe_open(FIXTURES / "pipelines" / "images.safetensors", "np") as f:
    REFERENCE = {name: f.get_tensor(name) for name in f.keys()}
    CASES = json.loads(f.metadata()["cases"])

LAYOUTS = {"folder": "{family}", "single file": "{family}.safetensors"}
INPUTS = FIXTURES / "pipelines"
_loaded = {}


def pipeline(checkpoints, family: str, layout: str) -> sdlite.Pipeline:
    key = (family, layout)
    if key not in _loaded:
        _loaded[key] = sdlite.load(checkpoints / LAYOUTS[layout].format(family=family))
    return _loaded[key]


def assert_same_images(images, reference: np.ndarray) -> None:
    got = np.stack([np.asarray(image) for image in images])
    assert got.shape == reference.shape
    diff = np.abs(got.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 2 and diff.mean() <= 0.05, f"max {diff.max()}, mean {diff.mean():.4f}"


def settings(case: dict) -> dict:
    return dict(negative_prompt=case["negative_prompt"], steps=case["steps"], guidance_scale=case["guidance_scale"],
                seed=case["seed"], scheduler=case["scheduler"], batch_size=case["batch_size"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [name for name, case in CASES.items() if case["kind"] == "txt2img"])
def test_txt2img_matches_reference(checkpoints, case, layout):
    c = CASES[case]
    pipe = pipeline(checkpoints, c["family"], layout)
    images = pipe.txt2img(c["prompt"], width=c["width"], height=c["height"], **settings(c))
    assert_same_images(images, REFERENCE[case])


@pytest.mark.parametrize("case", [name for name, case in CASES.items() if case["kind"] == "img2img"])
def test_img2img_matches_reference(checkpoints, case):
    c = CASES[case]
    pipe = pipeline(checkpoints, c["family"], "folder")
    images = pipe.img2img(c["prompt"], INPUTS / "init.png", strength=c["strength"], **settings(c))
    assert_same_images(images, REFERENCE[case])


@pytest.mark.parametrize("case", [name for name, case in CASES.items() if case["kind"] == "inpaint"])
def test_inpaint_matches_reference(checkpoints, case):
    """4-channel checkpoints (sd1, sd2 folders) blend the known region back; sd1-inpaint is a 9-channel file."""
    c = CASES[case]
    pipe = pipeline(checkpoints, c["family"], "single file" if c["family"] == "sd1-inpaint" else "folder")
    images = pipe.inpaint(c["prompt"], INPUTS / "init.png", INPUTS / "mask.png", strength=c["strength"],
                          mask_blur=c["mask_blur"], **settings(c))
    assert_same_images(images, REFERENCE[case])


def test_onednn_and_plain_layers_both_give_the_reference_images(checkpoints):
    """The sd1 folder is fp32, so its UNet weights are views of the file and the sampling loop packs them, and the
    stages run their linear layers as oneDNN's inner product (the path every case above takes); pipe.onednn = False
    runs plain nn.Conv2d and nn.Linear instead."""
    name = next(n for n, c in CASES.items() if c["kind"] == "txt2img" and c["family"] == "sd1")
    c = CASES[name]
    pipe = sdlite.load(checkpoints / "sd1")
    convs = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    unet_linears = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear)]
    linears = [m for net in (pipe.text_encoder, pipe.vae) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    for onednn in (True, False):
        pipe.onednn = onednn
        images = pipe.txt2img(c["prompt"], width=c["width"], height=c["height"], **settings(c))
        assert_same_images(images, REFERENCE[name])
        if onednn and runtime.AVAILABLE:
            assert all(isinstance(conv, runtime.PackedConv2d) and conv.packed is not None for conv in convs)
            assert all(type(linear) is runtime.PackedLinear for linear in unet_linears)
            assert all(type(linear) is runtime.OneDNNLinear for linear in linears)
        else:
            assert all(type(conv) is torch.nn.Conv2d for conv in convs)
            assert all(type(linear) is torch.nn.Linear for linear in linears + unet_linears)


def test_a_seed_means_one_image_and_another_seed_another(checkpoints):
    pipe = pipeline(checkpoints, "sd1", "folder")
    settings = dict(steps=2, width=40, height=32, scheduler="ddim")
    a, b, c = (pipe.txt2img("a castle", seed=s, **settings)[0] for s in (5, 5, 6))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_default_sampler_and_size_come_from_the_checkpoint(checkpoints):
    """The folder's scheduler_config.json and unet sample_size; for single files, the family's convention."""
    assert pipeline(checkpoints, "sd1", "folder").default_sampler == "pndm"
    assert pipeline(checkpoints, "sd2", "folder").default_sampler == "ddim"
    assert pipeline(checkpoints, "sd1", "folder").default_size == 6 * 8
    assert pipeline(checkpoints, "sd1", "single file").default_size == 512
    assert pipeline(checkpoints, "sd2", "single file").default_size == 768


def test_parameters_text_is_what_automatic1111_writes(checkpoints):
    pipe = pipeline(checkpoints, "sd2", "folder")
    images = pipe.txt2img("a castle", negative_prompt="blurry", steps=1, guidance_scale=7.0, width=32, height=24,
                          seed=3, scheduler="euler_a", batch_size=2)
    unet = checkpoints / "sd2" / "unet" / "diffusion_pytorch_model.fp16.safetensors"  # a folder's hash: its UNet's
    model_hash = hashlib.sha256(unet.read_bytes()).hexdigest()[:10]
    assert [im.info["parameters"] for im in images] == [
        "a castle\nNegative prompt: blurry\nSteps: 1, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.0, "
        f"Seed: 3, Size: 32x24, Model hash: {model_hash}, Model: sd2, Batch size: 2, Batch pos: {i}" for i in range(2)]


def test_progress_is_reported_each_step(checkpoints):
    calls = []
    pipeline(checkpoints, "sd1", "folder").txt2img("a castle", steps=3, width=32, height=32, scheduler="ddim",
                                                   progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("scheduler", ["pndm", "euler", "dpmpp_2m"])
def test_bf16_runs_every_task(checkpoints, scheduler):
    """In bf16 the samplers keep the latents in bf16 (the UNet would refuse fp32 input next to bf16 weights)."""
    import torch
    pipe = sdlite.load(checkpoints / "sd2.safetensors", dtype=torch.bfloat16)
    settings = dict(steps=3, seed=1, scheduler=scheduler)
    images = [pipe.txt2img("a castle", width=56, height=40, **settings)[0],
              pipe.img2img("a castle", INPUTS / "init.png", strength=0.7, **settings)[0],
              pipe.inpaint("a cat", INPUTS / "init.png", INPUTS / "mask.png", strength=0.7, **settings)[0]]
    assert [image.size for image in images] == [(56, 40)] * 3


def test_the_loop_yields_each_step_and_stops_when_the_caller_does(checkpoints):
    """Pipeline.denoise yields one Step per timestep; the last one's x is what txt2img decodes. Euler's last step
    (to sigma 0) lands on the step's predicted x_0, x - sigma eps: Step.x0 is that prediction. Stopping early leaves
    the UNet as it was before the loop (the runtime's hooks are gone)."""
    pipe = pipeline(checkpoints, "sd1", "folder")
    request = pipe.complete(sdlite.Request("a castle", steps=4, width=40, height=32, seed=5, sampler="euler"), None)

    def loop():
        sampler = pipe.build_sampler(request.sampler, request.steps, inpainting=False)
        generator = torch.Generator().manual_seed(request.seed)
        context = pipe.encode_prompt(request)
        x, timesteps, _ = pipe.start_txt2img(request, sampler, generator)
        return pipe.denoise(x, timesteps, sampler, context, request, generator)
    with torch.no_grad():
        steps = list(loop())
        assert [(s.i, s.total) for s in steps] == [(i, 4) for i in range(4)]
        image = pipe.decode(steps[-1].x)[0]
        first = next(iter(loop()))                      # one step, then the generator is dropped
    assert np.array_equal(np.asarray(image), np.asarray(pipe.generate(request)[0]))
    # x0 - x_last is fp32 rounding of x + (x - x0) / sigma * (0 - sigma): a few ulps of values of order 1
    torch.testing.assert_close(steps[-1].x, steps[-1].x0, rtol=0, atol=1e-5)
    assert torch.equal(first.x, steps[0].x)
    del first
    assert not any(m._forward_hooks for m in pipe.unet.modules())
