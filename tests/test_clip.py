"""sdlite's CLIP text encoder against transformers' CLIPTextModel, from a diffusers folder and from both single-file
layouts (fixtures by tests/fixtures/make_text.py, in text_encoders.tar.xz: weights in fp16, references computed in
fp32 from them)."""
import dataclasses
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlite.clip import CLIPTextConfig, CLIPTextModel, clip_from_openai, clip_from_openclip, with_text_model_prefix

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUTS = {"sd1": (clip_from_openai, "sd1_openai.safetensors"),
           "sd2": (clip_from_openclip, "sd2_openclip.safetensors")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """sd1/ and sd2/ (text_encoder/ folders), sd1_openai.safetensors, sd2_openclip.safetensors and
    reference.safetensors, unpacked from make_text.py's archive."""
    where = tmp_path_factory.mktemp("text_encoders")
    with tarfile.open(FIXTURES / "text_encoders.tar.xz") as tar:
        tar.extractall(where, filter="data")
    return where


@pytest.fixture(scope="module")
def reference(root) -> dict[str, torch.Tensor]:
    return load_file(root / "reference.safetensors")


def folder(root: Path, name: str) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """As the lead's checkpoint.load_folder reads text_encoder/."""
    config = CLIPTextConfig.from_json(json.loads((root / name / "config.json").read_text()))
    return config, with_text_model_prefix(load_file(root / name / "model.safetensors"))


def single_file(root: Path, name: str) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """As checkpoint.load_single_file does: cond_stage_model. removed, then the layout's mapper."""
    mapper, file = LAYOUTS[name]
    sd = load_file(root / file)
    return mapper({k.removeprefix("cond_stage_model."): v for k, v in sd.items()})


def run(config: CLIPTextConfig, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Built on the meta device and given the tensors themselves (strict), as checkpoint.build does; run in fp32."""
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.load_state_dict(sd, strict=True, assign=True)
    with torch.no_grad():
        return model.float().eval()(ids)


def test_config_from_json(root):
    config, _ = folder(root, "sd1")
    assert config == CLIPTextConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=2,
                                    hidden_act="quick_gelu", vocab_size=1000, max_position_embeddings=77)
    assert folder(root, "sd2")[0] == dataclasses.replace(config, intermediate_size=352, hidden_act="gelu")


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_folder_parity(root, reference, name):
    out = run(*folder(root, name), reference["ids"])
    assert out.shape == (3, 77, 128)
    torch.testing.assert_close(out, reference[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_single_file_matches_folder(root, reference, name):
    """The mapper gives the folder's config and tensors, hence the reference output."""
    (config, sd), (ref_config, ref_sd) = single_file(root, name), folder(root, name)
    assert config == ref_config
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    torch.testing.assert_close(run(config, sd, reference["ids"]), reference[name], rtol=1e-5, atol=1e-5)


def test_with_text_model_prefix(root):
    """Keys with or without text_model. (transformers 4 / 5), position_ids dropped; the model has no buffers."""
    _, sd = folder(root, "sd1")
    bare = {k.removeprefix("text_model."): v for k, v in sd.items()}
    old = {**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    assert with_text_model_prefix(bare).keys() == with_text_model_prefix(old).keys() == sd.keys()
    with torch.device("meta"):
        assert not list(CLIPTextModel(CLIPTextConfig()).buffers())


def test_causal(root, reference):
    """A position's output depends on the tokens up to it only."""
    config, sd = folder(root, "sd2")
    ids = reference["ids"][:1].clone()
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.load_state_dict(sd, assign=True)
    model.float()
    with torch.no_grad():
        before = model(ids)
        ids[0, 40:] = (ids[0, 40:] + 1) % 1000
        after = model(ids)
    torch.testing.assert_close(before[:, :40], after[:, :40], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(before[:, 40:], after[:, 40:])
