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

from sdlite import UserError, runtime
from sdlite.clip import CLIP_IMPLEMENTED, CLIP_NO_EFFECT, CLIP_REFUSED, CLIPTextConfig, CLIPTextModel
from sdlite.formats.diffusers import with_text_model_prefix
from sdlite.formats.ldm import clip_from_openai, clip_from_openclip
from tolerances import float_rounding_tolerance

FIXTURES = Path(__file__).parent / "fixtures"
LAYOUTS = {"sd1": (clip_from_openai, "sd1_openai.safetensors"),
           "sd2": (clip_from_openclip, "sd2_openclip.safetensors")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """sd1/, sd2/ and custom/ (text_encoder/ folders), sd1_openai.safetensors, sd2_openclip.safetensors and
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


def build(config: CLIPTextConfig, sd: dict[str, torch.Tensor]) -> CLIPTextModel:
    """Built on the meta device and given the tensors themselves (strict), as checkpoint.build does; fp32."""
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float().eval()


def run(config: CLIPTextConfig, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return build(config, sd)(ids)


def assert_float_rounding_close(ours: torch.Tensor, theirs: torch.Tensor, config: CLIPTextConfig):
    assert ours.shape == theirs.shape
    relative_error = (ours - theirs).abs().max() / theirs.abs().max()
    with torch.device("meta"):
        tolerance = float_rounding_tolerance(CLIPTextModel(config))   # what float32 rounding explains: see there
    assert relative_error < tolerance, f"relative error {relative_error:.2e}"


def test_config_from_json(root):
    config, _ = folder(root, "sd1")
    assert config == CLIPTextConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=2,
                                    hidden_act="quick_gelu", vocab_size=1000, max_position_embeddings=77)
    assert folder(root, "sd2")[0] == dataclasses.replace(config, intermediate_size=352, hidden_act="gelu")


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_folder_parity(root, reference, name):
    config, sd = folder(root, name)
    out = run(config, sd, reference["ids"])
    assert out.shape == (3, 77, 128)
    assert_float_rounding_close(out, reference[name], config)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_folder_parity_with_linear_layers_on_onednn(root, reference, name):
    """The pipeline's fast path (runtime.running): every linear layer oneDNN's inner product, to float rounding."""
    config, sd = folder(root, name)
    model = build(config, sd)
    with torch.no_grad(), runtime.running(model):
        out = model(reference["ids"])
    if runtime.AVAILABLE:
        assert all(type(m) is runtime.OneDNNLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert_float_rounding_close(out, reference[name], config)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_single_file_matches_folder(root, reference, name):
    """The mapper gives the folder's config and tensors, hence the reference output."""
    (config, sd), (ref_config, ref_sd) = single_file(root, name), folder(root, name)
    assert config == ref_config
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    assert_float_rounding_close(run(config, sd, reference["ids"]), reference[name], config)


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
    # the same computation on the same machine: only a kernel that splits the masked rows otherwise could round
    # differently, by float32 rounding at most
    assert_float_rounding_close(after[:, :40], before[:, :40], config)
    assert (before[:, 40:] - after[:, 40:]).abs().max() > 0.1 * before.abs().max()


# ---- config.json keys: each honoured or refused by name ----

REFERENCE_KEYS = json.loads((FIXTURES / "text_config_keys.json").read_text())["defaults"]


def test_config_keys_at_other_values_match_the_reference(root, reference):
    """custom/ is a CLIPTextModelWithProjection: gelu_new, layer_norm_eps 0.1, 3 layers, 4 heads, projection_dim 24."""
    config, sd = folder(root, "custom")
    assert (config.hidden_act, config.layer_norm_eps, config.num_hidden_layers, config.num_attention_heads,
            config.projection_dim) == ("gelu_new", 0.1, 3, 4, 24)
    model = build(config, sd)
    with torch.no_grad():
        out = model(reference["ids"])
        text_embeds = model.text_embeds(reference["ids"], out)
    assert_float_rounding_close(out, reference["custom"], config)
    assert_float_rounding_close(text_embeds, reference["custom.text_embeds"], config)


def test_every_reference_config_key_is_implemented_or_refused():
    """make_text.py records CLIPTextConfig's keys: a key a new transformers adds fails here until sdlite implements
    or refuses it."""
    neither = [key for key in REFERENCE_KEYS
               if key not in CLIP_IMPLEMENTED and key not in CLIP_REFUSED and not key.startswith("_")]
    assert not neither, f"neither implemented nor refused: {neither}"


def test_every_implemented_key_is_tested_at_a_value_other_than_the_default(root):
    configs = [json.loads((root / name / "config.json").read_text()) for name in ("sd1", "sd2", "custom")]
    untested = [key for key in CLIP_IMPLEMENTED - CLIP_NO_EFFECT
                if all(c.get(key) == REFERENCE_KEYS[key] for c in configs)]
    assert not untested


def test_keys_without_effect_change_nothing(root):
    config_json = json.loads((root / "custom" / "config.json").read_text())
    changed = {**config_json, "output_hidden_states": True, "initializer_range": 0.5, "pad_token_id": 7,
               "bos_token_id": 8, "id2label": {"0": "a"}, "torch_dtype": "float16", "chunk_size_feed_forward": 4}
    assert CLIPTextConfig.from_json(changed) == CLIPTextConfig.from_json(config_json)


@pytest.mark.parametrize("change, named", [
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"some_new_key": True}, "some_new_key"),
    ({"architectures": ["CLIPVisionModel"]}, "architectures"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"num_hidden_layers": "3"}, "num_hidden_layers"),
    ({"layer_norm_eps": None}, "layer_norm_eps"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"eos_token_id": [2]}, "eos_token_id"),
])
def test_refused_keys_and_wrong_types_are_one_line(root, change, named):
    config_json = json.loads((root / "custom" / "config.json").read_text())
    with pytest.raises(UserError) as e:
        CLIPTextConfig.from_json({**config_json, **change}, "x/text_encoder/config.json")
    assert "\n" not in str(e.value) and named in str(e.value) and "x/text_encoder/config.json" in str(e.value)
