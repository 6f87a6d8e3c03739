"""Pixel-space DDPM models (unet2d.py, pixel.py) against diffusers' UNet2DModel, DDPMPipeline and DDIMPipeline, on the
block layouts of the published models with their widths cut down (tests/fixtures/make_pixel.py)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdlite
from sdlite import UserError
from sdlite.pixel import PixelPipeline
from sdlite.unet2d import UNET2D_IMPLEMENTED, UNET2D_REFUSED, UNet2DConfig, renamed_old_attention_keys

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_unet import random_weights  # noqa: E402  (the weights are redrawn from a seed, not stored)
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
                            ({"scheduler": "ddim", "eta": 2.0}, "eta")]:
        with pytest.raises(UserError, match=words):
            pipe.sample(**settings)


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
                                        ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("norm_num_groups", 5)])
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
