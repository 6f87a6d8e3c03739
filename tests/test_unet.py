"""sdlite's UNet against diffusers' UNet2DConditionModel, on the reference outputs of fixtures/make_unet.py."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdlite import onednn
from sdlite.unet import UNet, UNetConfig, unet_from_ldm
from sdlite.weights import read_safetensors

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_unet import random_weights  # noqa: E402  (the weights are redrawn from a seed, not stored)

CASES = ["sd1", "sd2", "inpaint"]


class Case:
    """One fixture: the diffusers config.json, the weights in the LDM layout, the reference's LDM -> diffusers key
    mapping, and the runs [(x, t, context, reference output)]."""

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


def assert_matches_reference(unet: UNet, case: Case):
    unet.eval()
    for x, t, context, expected in case.runs:
        with torch.no_grad():
            out = unet(x, t, context)
        assert out.shape == expected.shape
        relative_error = (out - expected).abs().max() / expected.abs().max()
        assert relative_error < 1e-5, f"t={t!r}, x {tuple(x.shape)}: relative error {relative_error:.2e}"


def test_from_diffusers_weights_and_config_json(case):
    unet = UNet(UNetConfig.from_json(case.config_json))
    unet.load_state_dict(case.diffusers_weights(), strict=True)
    assert_matches_reference(unet, case)


def test_from_single_file_layout(case):
    config, state_dict = unet_from_ldm(case.ldm)
    unet = UNet(config)
    unet.load_state_dict(state_dict, strict=True)
    assert_matches_reference(unet, case)


@pytest.mark.skipif(not onednn.AVAILABLE, reason="this torch build has no oneDNN")
def test_packed_convolutions_match_the_reference(case, tmp_path):
    """The pipeline's fast path: weights read from a file and packed for oneDNN give the reference's outputs too."""
    save_file(case.diffusers_weights(), tmp_path / "unet.safetensors")
    unet = UNet(UNetConfig.from_json(case.config_json))
    unet.load_state_dict(read_safetensors(tmp_path / "unet.safetensors", torch.float32), strict=True, assign=True)
    onednn.pack_convolutions(unet)
    assert_matches_reference(unet, case)
    assert all(m.packed is not None for m in unet.modules() if isinstance(m, onednn.Conv2d))


def test_single_file_config_inferred_from_shapes_equals_config_json(case):
    config, _ = unet_from_ldm(case.ldm)
    assert config == UNetConfig.from_json(case.config_json)


def test_single_file_keys_map_as_in_the_reference(case):
    _, state_dict = unet_from_ldm(case.ldm)
    assert state_dict.keys() == set(case.diffusers_key.values())
    moved = [ldm_key for ldm_key, key in case.diffusers_key.items() if state_dict[key] is not case.ldm[ldm_key]]
    assert not moved, f"mapped elsewhere than by diffusers: {moved[:5]}"


def test_sd_defaults_and_head_counts_of_official_configs():
    sd1 = {"in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "attention_head_dim": 8,
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
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    assert not torch.allclose(other, outs[0])
