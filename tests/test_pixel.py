"""Pixel-space DDPM models (unet2d.py, pixel.py) against diffusers' UNet2DModel, DDPMPipeline and DDIMPipeline, on the
block layouts of the published models with their widths cut down (tests/fixtures/make_pixel.py)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import sdlite
from sdlite import UserError, runtime
from sdlite.__main__ import main
from sdlite.pixel import PixelPipeline
from sdlite.train import cli
from sdlite.unet2d import UNET2D_IMPLEMENTED, UNET2D_REFUSED, UNet2DConfig, renamed_old_attention_keys

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_unet import random_weights  # noqa: E402  (the weights are redrawn from a seed, not stored)
import make_pixel_roundtrip as roundtrip  # noqa: E402  (its tiny UNet, images and train arguments)
from tolerances import float_rounding_tolerance  # noqa: E402

CASES = ["cifar10", "cat", "celebahq", "butterflies", "improved", "plain"]
FOLDER_FILES = ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json")


class Case:
    """One fixture: the reference's folder (written to `folder` with the weights redrawn) and its recorded outputs."""

    def __init__(self, name: str, tmp_path: Path):
        with safe_open(FIXTURES / f"pixel_{name}.safetensors", "pt") as f:
            self.meta, self.tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
        self.seed = int(self.meta["seed"])
        self.folder = tmp_path / name
        for part in FOLDER_FILES:
            (self.folder / part).parent.mkdir(parents=True, exist_ok=True)
            (self.folder / part).write_text(self.meta[part])
        shapes = dict(json.loads(self.meta["weights"]))
        save_file(random_weights(shapes, self.seed), self.folder / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("name", CASES)
def test_unet2d_matches_reference(name, tmp_path):
    case = Case(name, tmp_path)
    pipe = sdlite.load(case.folder)
    assert isinstance(pipe, PixelPipeline)
    out = case.tensors["out"]
    x = torch.randn(out.shape[0], pipe.unet.config.in_channels, *out.shape[2:],
                    generator=torch.Generator().manual_seed(case.seed))
    with torch.no_grad():
        ours = pipe.unet(x, case.tensors["t"])
    error = ((ours - out).abs().max() / out.abs().max()).item()
    # float32 rounding along the network's chain of layers, both sides (tolerances.py)
    assert error <= float_rounding_tolerance(pipe.unet), f"{name}: relative error {error:.2e}"


# DDIMPipeline cannot run the learned-variance UNet ("improved"): its DDIMScheduler takes all 2x channels as eps
@pytest.mark.parametrize("name, sampler", [(name, "ddpm") for name in CASES]
                         + [(name, "ddim") for name in CASES if name != "improved"])
def test_images_match_reference_pipelines(name, sampler, tmp_path):
    """DDPMPipeline (the folder's own scheduler) and DDIMPipeline (DDIMScheduler.from_config of it), same seed."""
    case = Case(name, tmp_path)
    steps = int(case.meta[f"{sampler}_steps"])
    eta = float(case.meta["eta"]) if sampler == "ddim" else 0.0
    pipe = sdlite.load(case.folder)
    images = pipe.sample(steps=steps, scheduler=None if sampler == "ddpm" else "ddim", batch_size=2,
                         seed=case.seed, eta=eta)
    ours = torch.from_numpy(np.stack([np.array(image) for image in images])).int()
    reference = case.tensors[sampler].int()
    assert ours.shape == reference.shape
    # the same float computation to float rounding (test above), rounded to uint8 at the end: a rounding difference
    # may change a pixel by one level, and the few steps amplify it at most to a second one
    assert (ours - reference).abs().max() <= 2


def test_every_sampler_samples_a_learned_variance_model(tmp_path):
    """The samplers other than DDPM get the eps half of a learned-variance UNet's output."""
    pipe = sdlite.load(Case("improved", tmp_path).folder)
    for name in sdlite.samplers.NAMES:
        images = pipe.sample(steps=4, scheduler=name, seed=1)
        assert len(images) == 1 and images[0].size == (16, 8), name


def test_sample_refuses_bad_settings(tmp_path):
    pipe = sdlite.load(Case("plain", tmp_path).folder)
    for settings, words in [({"steps": 0}, "steps"), ({"steps": 1001}, "steps"), ({"batch_size": 0}, "batch size"),
                            ({"scheduler": "nope"}, "unknown scheduler"), ({"eta": 0.5}, "eta"),
                            ({"scheduler": "ddim", "eta": 2.0}, "eta"), ({"seed": -1}, "seed")]:
        with pytest.raises(UserError, match=words):
            pipe.sample(**settings)


def test_sampling_in_a_precision_this_cpu_lacks_warns(tmp_path, monkeypatch):
    """As the text-to-image pipelines: the warning of runtime.slow_precision (here fp16 made slow on any CPU)."""
    monkeypatch.setattr(runtime, "onednn_takes", lambda dtype: dtype != torch.float16)
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    pipe = sdlite.load(Case("plain", tmp_path).folder, dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="fp16 runs on PyTorch's generic kernels"):
        pipe.sample(steps=1, seed=0)


def test_old_attention_names_are_renamed():
    """query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0 inside attentions; other keys unchanged."""
    tensor = torch.zeros(1)
    old = {"mid_block.attentions.0.query.weight": tensor, "down_blocks.1.attentions.1.proj_attn.bias": tensor,
           "up_blocks.2.attentions.0.key.weight": tensor, "up_blocks.2.attentions.0.value.bias": tensor,
           "conv_in.weight": tensor, "time_embedding.linear_1.bias": tensor}
    assert list(renamed_old_attention_keys(old)) == [
        "mid_block.attentions.0.to_q.weight", "down_blocks.1.attentions.1.to_out.0.bias",
        "up_blocks.2.attentions.0.to_k.weight", "up_blocks.2.attentions.0.to_v.bias",
        "conv_in.weight", "time_embedding.linear_1.bias"]


@pytest.mark.parametrize("key, value", [("time_embedding_type", "fourier"), ("class_embed_type", "timestep"),
                                        ("resnet_time_scale_shift", "spatial"), ("mystery", 1),
                                        ("down_block_types", ["SkipDownBlock2D"] * 4),
                                        ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("norm_num_groups", 5),
                                        ("sample_size", 36)])
def test_config_refuses_by_name(key, value):
    with pytest.raises(UserError) as refused:
        UNet2DConfig.from_json({key: value})
    assert key in str(refused.value) and "\n" not in str(refused.value)


def test_config_keys_are_those_of_the_reference():
    """Every UNet2DModel argument recorded in a fixture's config is honoured or refused by name."""
    config = {}
    for name in CASES:
        with safe_open(FIXTURES / f"pixel_{name}.safetensors", "pt") as f:
            config |= json.loads(f.metadata()["unet/config.json"])
    assert {k for k in config if not k.startswith("_")} <= UNET2D_IMPLEMENTED | set(UNET2D_REFUSED)


def test_latent_folder_still_loads_as_text_to_image(tmp_path):
    """A folder with a text encoder is not taken for a pixel model (the dispatch in checkpoint.load_folder)."""
    from sdlite.pixel import is_pixel_folder
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    assert is_pixel_folder(tmp_path, {"_class_name": "DDPMPipeline"})
    assert is_pixel_folder(tmp_path, {})
    (tmp_path / "text_encoder").mkdir()
    assert not is_pixel_folder(tmp_path, {"_class_name": "StableDiffusionPipeline"})


def test_sample_command_writes_the_images_once(tmp_path, capsys):
    """`sample` writes the batch as OUT-0.png, OUT-1.png, the same images as PixelPipeline.sample; a second run
    without --overwrite is one line and exit status 2, the files untouched."""
    case = Case("cifar10", tmp_path)
    out = tmp_path / "cat.png"
    argv = ["sample", "--model", str(case.folder), "--steps", "4", "--scheduler", "ddim", "--batch-size", "2",
            "--seed", "5", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    expected = sdlite.load(case.folder).sample(steps=4, scheduler="ddim", batch_size=2, seed=5)
    written = [tmp_path / "cat-0.png", tmp_path / "cat-1.png"]
    for path, image in zip(written, expected):
        assert np.array_equal(np.array(Image.open(path)), np.array(image))   # the same code path, the same process
    capsys.readouterr()
    before = [path.read_bytes() for path in written]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "exists" in err and "--overwrite" in err and "\n" not in err
    assert [path.read_bytes() for path in written] == before


def test_commands_refuse_the_other_kind_of_model(tmp_path, capsys):
    """txt2img on a pixel model and sample on a text-to-image one: one line each, exit status 2, no file."""
    case = Case("plain", tmp_path)
    latent = Path(__file__).parent.parent / "weights" / "default"
    for argv, words in [(["txt2img", "a cat", "--model", str(case.folder)], "sample"),
                        (["sample", "--model", str(latent)], "txt2img")]:
        capsys.readouterr()
        assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()


def test_schedule_prints_ddpm_timesteps(tmp_path, capsys):
    """DDPMScheduler.set_timesteps(50) gives 980, 960, ..., 0 (the leading spacing of T = 1000 by 20)."""
    case = Case("cat", tmp_path)
    assert main(["schedule", "--model", str(case.folder), "--scheduler", "ddpm", "--steps", "50", "--print"]) == 0
    assert capsys.readouterr().out.strip() == "ddpm (50): " + ", ".join(str(t) for t in range(980, -1, -20))


def test_schedule_of_a_latent_model_lists_every_sampler(capsys):
    """Through the SD pipelines' rewrite (steps_offset 1): DDIM's 10 steps on SD's schedule are 901, 801, ..., 1."""
    latent = Path(__file__).parent.parent / "weights" / "default"
    assert main(["schedule", "--model", str(latent), "--steps", "10"]) == 0
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert list(lines) == list(sdlite.samplers.NAMES)
    assert lines["ddim"] == "(10): " + ", ".join(str(t) for t in range(901, 0, -100))


def test_schedule_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib now raises ImportError
    case = Case("plain", tmp_path)
    assert main(["schedule", "--model", str(case.folder), "--plot", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install" in err and "matplotlib" in err and "\n" not in err
    assert not (tmp_path / "s.png").exists()


def test_schedule_plot_is_written(tmp_path, capsys):
    # matplotlib: the optional extra sdlite[plot], which the test extra includes
    case = Case("improved", tmp_path)
    plot = tmp_path / "schedule.png"
    assert main(["schedule", "--model", str(case.folder), "--steps", "20", "--plot", str(plot)]) == 0
    assert Image.open(plot).size[0] > 0
    assert main(["schedule", "--model", str(case.folder), "--plot", str(plot)]) == 2   # never overwritten silently


def test_denoise_yields_each_step_and_the_images_come_from_the_last(tmp_path):
    """PixelPipeline.denoise yields one Step per timestep (x and the predicted image, of x's shape); sample's images
    are the last step's x, rounded."""
    pipe = sdlite.load(Case("improved", tmp_path).folder)
    sampler = pipe.build_sampler("ddpm", 0.0)
    timesteps = sampler.set_timesteps(5)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 8, 16, generator=generator)
    with torch.no_grad():
        steps = list(pipe.denoise(x, timesteps, sampler, generator))
    assert [(step.i, step.total, int(step.t)) for step in steps] == [(i, 5, int(t)) for i, t in enumerate(timesteps)]
    assert all(step.x.shape == step.x0.shape == x.shape for step in steps)
    images = pipe.sample(steps=5, batch_size=2, seed=7)
    last = ((steps[-1].x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(np.stack([np.array(image) for image in images]), last.numpy())


def roundtrip_fixture(name: str) -> tuple[dict, dict]:
    with safe_open(FIXTURES / f"pixel_roundtrip_{name}.safetensors", "pt") as f:
        return f.metadata(), {key: f.get_tensor(key) for key in f.keys()}


def roundtrip_folder(meta: dict, tensors: dict, folder: Path) -> Path:
    """The folder the fixture's train command wrote, from its recorded files and weights."""
    for part in roundtrip.FOLDER_FILES:
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        (folder / part).write_text(meta[part])
    save_file({key[5:]: value for key, value in tensors.items() if key.startswith("unet.")},
              folder / "unet" / "diffusion_pytorch_model.safetensors")
    return folder


@pytest.mark.parametrize("name", ["rgb", "grey"])
def test_trained_folder_samples_as_the_reference_does(name, tmp_path, capsys):
    """The folder `train --pixel` wrote, read by diffusers' DDPMPipeline (make_pixel_roundtrip.py): sdlite.load and
    `python -m sdlite sample` give its images, same seed."""
    meta, tensors = roundtrip_fixture(name)
    folder = roundtrip_folder(meta, tensors, tmp_path / "run")
    seed, steps = int(meta["seed"]), int(meta["steps"])
    images = sdlite.load(folder).sample(steps=steps, batch_size=2, seed=seed)
    ours = torch.from_numpy(np.stack([np.array(image) for image in images])).int()
    reference = tensors["ddpm"].int()
    assert ours.shape == reference.shape
    # float rounding of the same computation, rounded to uint8 at the end: one level, at most two after a few steps
    # (as test_images_match_reference_pipelines)
    assert (ours - reference).abs().max() <= 2
    assert main(["sample", "--model", str(folder), "--steps", str(steps), "--batch-size", "2", "--seed", str(seed),
                 "--out", str(tmp_path / "s.png"), "--quiet"]) == 0
    for i, image in enumerate(images):   # the same code path in the same process: the same pixels
        assert np.array_equal(np.array(Image.open(tmp_path / f"s-{i}.png")), np.array(image))


@pytest.mark.parametrize("name", ["rgb", "grey"])
def test_train_pixel_writes_the_layout_the_reference_read(name, tmp_path, monkeypatch):
    """`train --pixel` writes the DDPMPipeline folder the fixture's diffusers read: the same model_index.json,
    unet/config.json (a UNet2DModel) and scheduler config, the same weight names and shapes."""
    meta, tensors = roundtrip_fixture(name)
    monkeypatch.setattr(cli, "PIXEL_UNET", roundtrip.TINY_UNET)
    roundtrip.write_images(tmp_path / "data", grey=name == "grey")
    channels = roundtrip.CASES[name]
    assert main(roundtrip.train_arguments(tmp_path / "data", tmp_path / "run", channels)) == 0
    for part in roundtrip.FOLDER_FILES:
        assert json.loads((tmp_path / "run" / part).read_text()) == json.loads(meta[part]), part
    with safe_open(tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    assert shapes == {key[5:]: list(value.shape) for key, value in tensors.items() if key.startswith("unet.")}
    pipe = sdlite.load(tmp_path / "run")
    assert isinstance(pipe, PixelPipeline) and pipe.unet.config.in_channels == int(channels)


def test_sample_writes_previews(tmp_path, capsys):
    """sample --preview / --preview-grid: a frame every 2nd step and the last; the last frame's top row holds the
    images written."""
    folder = roundtrip_folder(*roundtrip_fixture("grey"), tmp_path / "run")
    assert main(["sample", "--model", str(folder), "--steps", "5", "--batch-size", "2", "--seed", "4", "--out",
                 str(tmp_path / "s.png"), "--preview", str(tmp_path / "s.gif"), "--preview-grid",
                 str(tmp_path / "g.png"), "--preview-every", "2", "--quiet"]) == 0
    with Image.open(tmp_path / "s.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (16, 16)   # steps 2, 4, 5; two 8 x 8 images side by side, 2 rows
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (16, 48)
    for i in range(2):
        assert np.array_equal(grid[:8, 32 + 8 * i:40 + 8 * i], np.asarray(Image.open(tmp_path / f"s-{i}.png")))
