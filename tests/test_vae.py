"""sdlite's VAE against diffusers' AutoencoderKL, through fixtures made by tests/fixtures/make_vae.py."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlite import UserError, runtime
from sdlite.formats.ldm import vae_from_ldm, vae_to_ldm
from sdlite.tiling import tiled_decode, tiled_encode
from sdlite.vae import VAE_IMPLEMENTED, VAE_REFUSED, AutoencoderKL, DiagonalGaussian, VAEConfig
from tolerances import float_rounding_tolerance

FIXTURES = Path(__file__).parent / "fixtures"


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
    assert relative_error(posterior.mean, ref[f"{case}.mean"]) < float_rounding_tolerance(vae)
    assert relative_error(posterior.logvar, ref[f"{case}.logvar"]) < float_rounding_tolerance(vae)
    assert posterior.mode() is posterior.mean


@pytest.mark.parametrize("case", ["a", "b"])
def test_sample_with_seed(vae, reference, case):
    ref, meta = reference
    with torch.no_grad():
        z = vae.encode(ref[f"{case}.x"]).sample(torch.Generator().manual_seed(int(meta["seed"])))
    assert relative_error(z, ref[f"{case}.sample"]) < float_rounding_tolerance(vae)


@pytest.mark.parametrize("case", ["a", "b"])
def test_decode(vae, reference, case):
    ref, _ = reference
    with torch.no_grad():
        x = vae.decode(ref[f"{case}.sample"])
    assert relative_error(x, ref[f"{case}.decoded"]) < float_rounding_tolerance(vae)


@pytest.mark.parametrize("case", ["a", "b"])
def test_decode_in_the_pipeline_runs_channels_last_and_matches_the_reference(vae, reference, case):
    """runtime.running, as the pipeline decodes: every convolution's input channels-last, the reference's output."""
    ref, _ = reference
    layouts = []
    with torch.no_grad(), runtime.running(vae):   # hooks after running's own, which makes the inputs channels-last
        hooks = [conv.register_forward_pre_hook(
            lambda conv, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
            for conv in vae.modules() if isinstance(conv, torch.nn.Conv2d)]
        try:
            x = vae.decode(ref[f"{case}.sample"])
        finally:
            for hook in hooks:
                hook.remove()
    assert len(layouts) >= 3 and all(layouts)   # post_quant_conv, the decoder's conv_in, ... conv_out
    assert relative_error(x, ref[f"{case}.decoded"]) < float_rounding_tolerance(vae)


def test_tiled_encode_and_decode(vae, reference):
    """Images larger than sample_size (32 here) go through in overlapping tiles, as in diffusers' enable_tiling;
    smaller ones as before."""
    ref, _ = reference
    with torch.no_grad():
        posterior, decoded = tiled_encode(vae, ref["tiled.x"]), tiled_decode(vae, ref["tiled.z"])
        small = ref["tiled.z"][:, :, :8, :8]                 # one tile: decoded whole
        small_tiled = tiled_decode(vae, small)
        small_image_tiled = tiled_encode(vae, ref["tiled.x"][:, :, :32, :32]).mean
    assert relative_error(posterior.mean, ref["tiled.mean"]) < float_rounding_tolerance(vae)
    assert relative_error(posterior.logvar, ref["tiled.logvar"]) < float_rounding_tolerance(vae)
    assert relative_error(decoded, ref["tiled.decoded"]) < float_rounding_tolerance(vae)
    with torch.no_grad():   # one tile is the untiled computation itself, on this machine: bit for bit
        assert torch.equal(small_tiled, vae.decode(small))
        assert torch.equal(small_image_tiled, vae.encode(ref["tiled.x"][:, :, :32, :32]).mean)
        # tiles do change it: by far more than float rounding (the seams differ at the 1e-1 level)
        assert relative_error(vae.decode(ref["tiled.z"]), ref["tiled.decoded"]) > 100 * float_rounding_tolerance(vae)


def test_logvar_is_clamped():
    logvar = torch.tensor([-100.0, -1.0, 5.0, 100.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    posterior = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), logvar], dim=1))
    assert posterior.logvar[0, :, 0, 0].tolist() == [-30.0, -1.0, 5.0, 20.0]   # clamping only selects: exact
    # exp is one correctly-rounded-to-a-few-ulp elementwise op (SIMD or not): a few eps32 relative, no absolute part
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar), rtol=4 * torch.finfo().eps, atol=0)


def test_vae_from_ldm(config):
    ldm_config, state_dict = vae_from_ldm(load_weights("vae_ldm.safetensors"))
    # An LDM file has no record of the GroupNorm groups (LDM always uses 32, the fixture 4 to stay small) nor of the
    # image size it was trained at (the loader sets the family's).
    assert ldm_config == dataclasses.replace(config, norm_num_groups=32, sample_size=512)
    diffusers_state = load_weights("vae_diffusers.safetensors")
    assert state_dict.keys() == diffusers_state.keys()  # so loading it is exactly test_encode's and test_decode's
    for key, value in diffusers_state.items():
        assert torch.equal(state_dict[key], value), key


def test_vae_to_ldm_inverts_vae_from_ldm():
    """The original keys but the training loss's (loss.*), the attention's 1x1 convolutions as they were."""
    ldm = load_weights("vae_ldm.safetensors")
    written = vae_to_ldm(*vae_from_ldm(ldm))
    assert written.keys() == {key for key in ldm if not key.startswith("loss.")}
    for key, value in written.items():
        assert value.shape == ldm[key].shape and torch.equal(value, ldm[key]), key


# ---- config.json keys: each honoured or refused by name (make_vae.CONFIG_CASES) ----

CONFIG_CASES = ["shifted", "normalised"]
REFERENCE_KEYS = json.loads((FIXTURES / "vae_config_keys.json").read_text())["defaults"]


def config_case(name: str) -> tuple[dict, AutoencoderKL, dict[str, torch.Tensor]]:
    config_json = json.loads((FIXTURES / f"vae_{name}_config.json").read_text())
    tensors = {k: v.float() for k, v in load_file(FIXTURES / f"vae_{name}.safetensors").items()}
    vae = AutoencoderKL(VAEConfig.from_json(config_json)).eval()
    vae.load_state_dict({k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")},
                        strict=True)
    return config_json, vae, tensors


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_config_keys_at_other_values_match_the_reference(name):
    _, vae, ref = config_case(name)
    with torch.no_grad():
        posterior, decoded = vae.encode(ref["x"]), vae.decode(ref["z"])
    tolerance = float_rounding_tolerance(vae)   # what float32 rounding explains: see there
    assert relative_error(posterior.mean, ref["mean"]) < tolerance
    assert relative_error(posterior.logvar, ref["logvar"]) < tolerance
    assert relative_error(decoded, ref["decoded"]) < tolerance
    # the latents scaled as diffusers' SD3 / SDXL pipelines do: two or three elementwise float32 operations, each
    # rounding once (half an ulp); 4 eps32 relative to the largest value covers them
    scaled = vae.scale_latents(ref["mean"])
    torch.testing.assert_close(scaled, ref["scaled"], rtol=0, atol=4 * torch.finfo().eps * ref["scaled"].abs().max())
    unscaled = vae.unscale_latents(ref["scaled"])
    torch.testing.assert_close(unscaled, ref["unscaled"], rtol=0,
                               atol=4 * torch.finfo().eps * ref["unscaled"].abs().max())


def test_force_upcast_runs_a_float16_vae_in_float32():
    _, shifted, _ = config_case("shifted")          # says force_upcast false
    _, normalised, _ = config_case("normalised")    # leaves it at the default, true
    assert shifted.upcast_for(torch.float16) == torch.float16
    assert normalised.upcast_for(torch.float16) == torch.float32
    assert normalised.upcast_for(torch.bfloat16) == torch.bfloat16   # as diffusers: float16 only


def test_every_reference_config_key_is_implemented_or_refused():
    """make_vae.py records AutoencoderKL's config keys: a key a new diffusers adds fails here until sdlite
    implements or refuses it."""
    neither = [key for key in REFERENCE_KEYS if key not in VAE_IMPLEMENTED and key not in VAE_REFUSED]
    assert not neither, f"neither implemented nor refused: {neither}"


def test_every_implemented_key_is_tested_at_a_value_other_than_the_default():
    configs = [config_case(name)[0] for name in CONFIG_CASES] + [json.loads((FIXTURES / "vae_config.json").read_text())]
    untested = [key for key in VAE_IMPLEMENTED if all(c.get(key) == REFERENCE_KEYS[key] for c in configs)]
    assert not untested


@pytest.mark.parametrize("change, named", [
    ({"some_new_key": 3}, "some_new_key"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"act_fn": "tanh"}, "act_fn"),
    ({"norm_num_groups": 3}, "norm_num_groups"),
    ({"norm_num_groups": "8"}, "norm_num_groups"),
    ({"layers_per_block": 1.5}, "layers_per_block"),
    ({"scaling_factor": "0.18"}, "scaling_factor"),
    ({"latents_std": None}, "latents_std"),
    ({"latents_mean": [0.0, 1.0]}, "latents_mean"),
    ({"shift_factor": 0.1}, "shift_factor"),
    ({"force_upcast": "no"}, "force_upcast"),
    ({"scaling_factor": float("nan")}, "scaling_factor"),
    ({"latents_std": [1.0, float("inf"), 1.0, 1.0]}, "latents_std"),
])
def test_wrong_keys_types_and_values_are_one_line(change, named):
    config_json, _, _ = config_case("normalised")
    with pytest.raises(UserError) as e:
        VAEConfig.from_json({**config_json, **change}, "some/vae/config.json")
    assert "\n" not in str(e.value) and named in str(e.value) and "some/vae/config.json" in str(e.value)


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_to_json_reads_back_to_the_same_config(name):
    """What `train` writes into a saved folder's vae/config.json."""
    config = config_case(name)[1].config
    assert VAEConfig.from_json(config.to_json()) == config
