"""sdlite's UNet against diffusers' UNet2DConditionModel, on the reference outputs of fixtures/make_unet.py."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlite import UserError, checkpoint, runtime
from sdlite.formats import diffusers
from sdlite.formats.ldm import unet_from_ldm, unet_to_ldm
from sdlite.unet import Attention, UNET_IMPLEMENTED, UNET_REFUSED, UNet, UNetConfig
from sdlite.weights import read_safetensors

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_unet import random_weights  # noqa: E402  (the weights are redrawn from a seed, not stored)
from tolerances import float_rounding_tolerance  # noqa: E402

LDM_CASES = ["sd1", "sd2", "inpaint"]     # also in the single-file layout
CASES = LDM_CASES + ["groups8", "nomid"]  # make_unet.CONFIG_CASES: every config.json key at a non-default value


class Case:
    """One fixture: the diffusers config.json, the weights in the LDM layout (diffusers' names for the CONFIG_CASES),
    the reference's LDM -> diffusers key mapping, and the runs [(x, t, context, reference output)]."""

    def __init__(self, name: str):
        with safe_open(FIXTURES / f"unet_{name}.safetensors", "pt") as f:
            metadata, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
        manifest = json.loads(metadata["weights"])
        self.ldm = random_weights({ldm_key: shape for ldm_key, shape, _ in manifest}, int(metadata["seed"]))
        self.diffusers_key = {ldm_key: key for ldm_key, _, key in manifest}
        self.config_json = json.loads((FIXTURES / f"unet_{name}.json").read_text())
        self.runs = []
        for i in range(len(tensors) // 4):
            t = tensors[f"{i}.t"]
            t = t.item() if t.ndim == 0 else t   # python float or int, or a (B,) tensor
            self.runs.append((tensors[f"{i}.x"], t, tensors[f"{i}.context"], tensors[f"{i}.out"]))

    def diffusers_weights(self) -> dict[str, torch.Tensor]:
        return {self.diffusers_key[ldm_key]: value for ldm_key, value in self.ldm.items()}


@pytest.fixture(scope="module", params=CASES)
def case(request) -> Case:
    return Case(request.param)


@pytest.fixture(scope="module", params=LDM_CASES)
def ldm_case(request) -> Case:
    return Case(request.param)


def assert_matches_reference(unet: UNet, case: Case):
    unet.eval()
    for x, t, context, expected in case.runs:
        with torch.no_grad():
            out = unet(x, t, context)
        assert out.shape == expected.shape
        relative_error = (out - expected).abs().max() / expected.abs().max()
        tolerance = float_rounding_tolerance(unet)   # what float32 rounding explains: see there
        assert relative_error < tolerance, f"t={t!r}, x {tuple(x.shape)}: relative error {relative_error:.2e}"


def test_from_diffusers_weights_and_config_json(case):
    unet = UNet(UNetConfig.from_json(case.config_json))
    unet.load_state_dict(case.diffusers_weights(), strict=True)
    assert_matches_reference(unet, case)


def test_from_single_file_layout(ldm_case):
    config, state_dict = unet_from_ldm(ldm_case.ldm)
    unet = UNet(config)
    unet.load_state_dict(state_dict, strict=True)
    assert_matches_reference(unet, ldm_case)


@pytest.mark.skipif(not runtime.AVAILABLE, reason="this torch build has no oneDNN")
def test_onednn_layers_match_the_reference(case, tmp_path):
    """The pipeline's fast path (runtime.running, as the pipeline runs it): weights read from a file, convolutions
    packed for oneDNN, linear layers as its inner product, attention in blocks, pages streamed, give the reference's
    outputs too."""
    save_file(case.diffusers_weights(), tmp_path / "unet.safetensors")
    unet = UNet(UNetConfig.from_json(case.config_json))
    unet.load_state_dict(read_safetensors(tmp_path / "unet.safetensors", torch.float32), strict=True, assign=True)
    with runtime.running(unet):
        assert_matches_reference(unet, case)
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(m, runtime.PackedConv2d) and m.packed is not None for m in convs)
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    assert all(type(m) is runtime.PackedLinear and m.packed is None for m in linears)   # fp32: unpacked (memory)
    assert all(type(m) is runtime.BlockedAttention for m in unet.modules() if isinstance(m, Attention))


def test_single_file_config_inferred_from_shapes_equals_config_json(ldm_case):
    config, _ = unet_from_ldm(ldm_case.ldm)
    assert config == UNetConfig.from_json(ldm_case.config_json)


def test_single_file_keys_written_back(ldm_case):
    """unet_to_ldm inverts unet_from_ldm: the original keys, each holding its own tensor."""
    config, state_dict = unet_from_ldm(ldm_case.ldm)
    written = unet_to_ldm(config, state_dict)
    assert written.keys() == ldm_case.ldm.keys()
    assert all(written[key] is value for key, value in ldm_case.ldm.items())


def test_single_file_keys_map_as_in_the_reference(ldm_case):
    _, state_dict = unet_from_ldm(ldm_case.ldm)
    assert state_dict.keys() == set(ldm_case.diffusers_key.values())
    moved = [ldm_key for ldm_key, key in ldm_case.diffusers_key.items()
             if state_dict[key] is not ldm_case.ldm[ldm_key]]
    assert not moved, f"mapped elsewhere than by diffusers: {moved[:5]}"


def test_sd_defaults_and_head_counts_of_official_configs():
    sd1 = {"in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "attention_head_dim": 8,
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
           "cross_attention_dim": 768}
    assert UNetConfig.from_json(sd1) == UNetConfig()
    sd2 = {**sd1, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True}
    assert UNetConfig.from_json(sd2).heads == (5, 10, 20, 20)


def test_timestep_forms_agree():
    case = Case("inpaint")
    unet = UNet(UNetConfig.from_json(case.config_json)).eval()
    unet.load_state_dict(case.diffusers_weights())
    x, _, context, _ = case.runs[0]
    with torch.no_grad():
        outs = [unet(x, t, context) for t in (500, 500.0, torch.tensor(500), torch.tensor([500, 500]))]
        other = unet(x, 501, context)
    # every form becomes the same float32 timestep before any arithmetic: the same computation on this machine
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    # a timestep apart is a real change, far beyond what float rounding explains
    assert (other - outs[0]).abs().max() > 100 * float_rounding_tolerance(unet) * outs[0].abs().max()


# ---- config.json keys: each honoured or refused by name ----

REFERENCE_KEYS = json.loads((FIXTURES / "unet_config_keys.json").read_text())["defaults"]


def test_every_reference_config_key_is_implemented_or_refused():
    """make_unet.py records UNet2DConditionModel's config keys: a key a new diffusers adds fails here until sdlite
    implements or refuses it."""
    neither = [key for key in REFERENCE_KEYS if key not in UNET_IMPLEMENTED and key not in UNET_REFUSED]
    assert not neither, f"neither implemented nor refused: {neither}"
    assert not UNET_IMPLEMENTED & UNET_REFUSED.keys()
    # a refused key's accepted values are the reference's default (dropout's 0 also as 0.0)
    assert all(REFERENCE_KEYS[key] in values for key, values in UNET_REFUSED.items())


def test_every_implemented_key_is_tested_at_a_value_other_than_the_default():
    configs = [Case(name).config_json for name in CASES]
    untested = [key for key in UNET_IMPLEMENTED if all(c.get(key) == REFERENCE_KEYS[key] for c in configs)]
    # sample_size is the loader's default image size (test_checkpoint), not the UNet's
    assert untested == ["sample_size"]


@pytest.mark.parametrize("key, value", [("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
                                        ("num_attention_heads", 8), ("time_embedding_type", "fourier"),
                                        ("dropout", 0.1), ("some_new_key", 1)])
def test_refused_keys_are_one_line_naming_file_key_and_value(key, value):
    config = {**Case("sd1").config_json, key: value}
    with pytest.raises(UserError) as e:
        UNetConfig.from_json(config, "folder/unet/config.json")
    message = str(e.value)
    assert "\n" not in message and "folder/unet/config.json" in message and key in message
    assert json.dumps(value) in message


@pytest.mark.parametrize("change, named", [
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]}, "AttnDownBlock2D"),
    ({"layers_per_block": "2"}, "layers_per_block"),
    ({"layers_per_block": [2, 2]}, "layers_per_block"),
    ({"norm_num_groups": 7}, "norm_num_groups"),
    ({"norm_num_groups": None}, "norm_num_groups"),
    ({"attention_head_dim": 5}, "attention_head_dim"),
    ({"act_fn": "tanh"}, "act_fn"),
    ({"use_linear_projection": "yes"}, "use_linear_projection"),
    ({"norm_eps": "1e-5"}, "norm_eps"),
    ({"block_out_channels": 32}, "block_out_channels"),
    ({"in_channels": None}, "in_channels"),
    ({"transformer_layers_per_block": [[1, 1], [1, 1], [1, 1]]}, "transformer_layers_per_block"),
])
def test_wrong_types_and_values_are_one_line(change, named):
    config = {**Case("sd1").config_json, **change}
    with pytest.raises(UserError) as e:
        UNetConfig.from_json(config, "unet/config.json")
    assert "\n" not in str(e.value) and named in str(e.value)


@pytest.mark.parametrize("name", CASES)
def test_to_json_reads_back_to_the_same_config(name):
    """What `train` writes into a saved folder's unet/config.json."""
    config = UNetConfig.from_json(Case(name).config_json)
    assert UNetConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("name", ["groups8", "nomid"])
def test_unet_folder_loads_through_the_loader(name, tmp_path):
    """unet/config.json and diffusion_pytorch_model.safetensors read and built as checkpoint.load_folder does."""
    case = Case(name)
    (tmp_path / "config.json").write_text(json.dumps(case.config_json))
    save_file(case.diffusers_weights(), tmp_path / "diffusion_pytorch_model.safetensors")
    config = UNetConfig.from_json(diffusers.read_json(tmp_path / "config.json"), tmp_path / "config.json")
    weights = checkpoint.read_state_dict(diffusers.weights_file(tmp_path, "diffusion_pytorch_model"), torch.float32)
    assert_matches_reference(checkpoint.build(UNet, config, weights, tmp_path), case)
