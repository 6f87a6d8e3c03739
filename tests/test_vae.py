"""sdlite's VAE against diffusers' AutoencoderKL, through fixtures made by tests/fixtures/make_vae.py."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlite.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, vae_from_ldm

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-5  # max relative error: (ours - theirs).abs().max() / theirs.abs().max()


def load_weights(name: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(FIXTURES / name).items()}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.fixture(scope="module")
def config() -> VAEConfig:
    return VAEConfig.from_json(json.loads((FIXTURES / "vae_config.json").read_text()))


@pytest.fixture(scope="module")
def vae(config) -> AutoencoderKL:
    torch.set_num_threads(1)
    model = AutoencoderKL(config).eval()
    model.load_state_dict(load_weights("vae_diffusers.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(FIXTURES / "vae_reference.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_config_from_json(config):
    assert config == VAEConfig(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 24),
                               layers_per_block=2, norm_num_groups=4, scaling_factor=0.18215, sample_size=32)


@pytest.mark.parametrize("case", ["a", "b"])
def test_encode(vae, reference, case):
    ref, _ = reference
    with torch.no_grad():
        posterior = vae.encode(ref[f"{case}.x"])
    assert relative_error(posterior.mean, ref[f"{case}.mean"]) < TOLERANCE
    assert relative_error(posterior.logvar, ref[f"{case}.logvar"]) < TOLERANCE
    assert posterior.mode() is posterior.mean


@pytest.mark.parametrize("case", ["a", "b"])
def test_sample_with_seed(vae, reference, case):
    ref, meta = reference
    with torch.no_grad():
        z = vae.encode(ref[f"{case}.x"]).sample(torch.Generator().manual_seed(int(meta["seed"])))
    assert relative_error(z, ref[f"{case}.sample"]) < TOLERANCE


@pytest.mark.parametrize("case", ["a", "b"])
def test_decode(vae, reference, case):
    ref, _ = reference
    with torch.no_grad():
        x = vae.decode(ref[f"{case}.sample"])
    assert relative_error(x, ref[f"{case}.decoded"]) < TOLERANCE


def test_tiled_encode_and_decode(vae, reference):
    """With tiling on, images larger than sample_size (32 here) go through in overlapping tiles, as in diffusers'
    enable_tiling; smaller ones as before."""
    ref, _ = reference
    vae.tiling = True
    try:
        with torch.no_grad():
            posterior, decoded = vae.encode(ref["tiled.x"]), vae.decode(ref["tiled.z"])
            small = ref["tiled.z"][:, :, :8, :8]                 # one tile: decoded whole
            small_tiled, small_image_tiled = vae.decode(small), vae.encode(ref["tiled.x"][:, :, :32, :32]).mean
    finally:
        vae.tiling = False
    assert relative_error(posterior.mean, ref["tiled.mean"]) < TOLERANCE
    assert relative_error(posterior.logvar, ref["tiled.logvar"]) < TOLERANCE
    assert relative_error(decoded, ref["tiled.decoded"]) < TOLERANCE
    with torch.no_grad():
        assert torch.equal(small_tiled, vae.decode(small))
        assert torch.equal(small_image_tiled, vae.encode(ref["tiled.x"][:, :, :32, :32]).mean)
        assert relative_error(vae.decode(ref["tiled.z"]), ref["tiled.decoded"]) > 1e-3   # tiles do change it


def test_logvar_is_clamped():
    logvar = torch.tensor([-100.0, -1.0, 5.0, 100.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    posterior = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), logvar], dim=1))
    assert posterior.logvar[0, :, 0, 0].tolist() == [-30.0, -1.0, 5.0, 20.0]
    assert torch.allclose(posterior.std, torch.exp(0.5 * posterior.logvar))


def test_vae_from_ldm(config):
    ldm_config, state_dict = vae_from_ldm(load_weights("vae_ldm.safetensors"))
    # An LDM file has no record of the GroupNorm groups (LDM always uses 32, the fixture 4 to stay small) nor of the
    # image size it was trained at (the loader sets the family's).
    assert ldm_config == dataclasses.replace(config, norm_num_groups=32, sample_size=512)
    diffusers_state = load_weights("vae_diffusers.safetensors")
    assert state_dict.keys() == diffusers_state.keys()  # so loading it is exactly test_encode's and test_decode's
    for key, value in diffusers_state.items():
        assert torch.equal(state_dict[key], value), key
