"""LoRA files as the model sites ship them (kohya / A1111 with LoCon convolutions, diffusers / PEFT; SD 1.x and 2.x)
against diffusers' load_lora_weights (peft) on the same files, from fixtures/make_addons.py: text-encoder and UNet
outputs, and txt2img images. Then unmerging, the files sdlite refuses, and A1111's <lora:NAME:WEIGHT> tags."""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import sdlite
from sdlite.__main__ import main
from sdlite.errors import UserError
from sdlite.lora import find_lora, split_lora_tags
from sdlite.weights import mapping

from conftest import FIXTURES

ADDONS = FIXTURES / "addons"
with safe_open(ADDONS / "reference.safetensors", "pt") as f:
    REFERENCE = {name: f.get_tensor(name) for name in f.keys()}
    METADATA = f.metadata()
LORAS = json.loads(METADATA["loras"])    # file -> (family, format, weight)
IMAGE = json.loads(METADATA["image"])
WITH_IMAGE = [name for name in LORAS if f"{name}.image" in REFERENCE]
# sd1's fp32 folder is used as mapped from the file; the bf16 sd2.safetensors is cast to fp32, held in memory
CHECKPOINT = {"sd1": "sd1", "sd2": "sd2.safetensors"}


def parameters(pipe) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v for part in ("unet", "text_encoder")
            for k, v in getattr(pipe, part).named_parameters()}


@pytest.mark.parametrize("name", LORAS)
def test_outputs_match_diffusers_load_lora_weights(checkpoints, name):
    family, _, weight = LORAS[name]
    pipe = sdlite.load(checkpoints / family)
    pipe.load_lora(ADDONS / name, weight)
    ids = pipe.tokenizer(METADATA["lora_prompt"])
    assert torch.equal(ids, REFERENCE[f"{name}.ids"])
    with torch.no_grad():
        text = pipe.text_encoder(ids)
        out = pipe.unet(REFERENCE["unet.x"], REFERENCE["unet.t"], REFERENCE["unet.context"])
    # The reference runs W x + s * B (A x) unmerged, sdlite (W + s * B A) x: one more rounding of each merged weight
    # (2^-24 relative), far below the chains' own float rounding, which test_clip and test_unet bound by 1e-5.
    expected = REFERENCE[f"{name}.text"]
    torch.testing.assert_close(text[:, :expected.shape[1]], expected, rtol=1e-5, atol=1e-5)
    expected = REFERENCE[f"{name}.unet"]
    relative_error = (out - expected).abs().max() / expected.abs().max()
    assert relative_error < 1e-5, f"relative error {relative_error:.2e}"


def assert_same_images(images, reference: np.ndarray) -> None:
    """The pipelines' parity contract (test_pipeline.py): 2 uint8 levels at most, 0.05 on average."""
    got = np.stack([np.asarray(image) for image in images]).astype(np.int16)
    diff = np.abs(got - reference.astype(np.int16))
    assert diff.max() <= 2 and diff.mean() <= 0.05, f"max {diff.max()}, mean {diff.mean():.4f}"


def generate(pipe):
    return pipe.txt2img(IMAGE["prompt"], negative_prompt=IMAGE["negative_prompt"], steps=IMAGE["steps"],
                        guidance_scale=IMAGE["guidance_scale"], width=IMAGE["width"], height=IMAGE["height"],
                        seed=IMAGE["seed"], scheduler=IMAGE["scheduler"])


@pytest.mark.parametrize("name", WITH_IMAGE)
def test_image_matches_diffusers_and_unloading_restores_the_weights_exactly(checkpoints, name):
    family, _, weight = LORAS[name]
    with_lora, without = REFERENCE[f"{name}.image"].numpy(), REFERENCE[f"{name}.image.without"].numpy()
    assert np.abs(with_lora.astype(int) - without).max() > 20   # the LoRA changes the image: the test can fail
    pipe = sdlite.load(checkpoints / CHECKPOINT[family])
    before = parameters(pipe)
    mapped = {k for k in before if mapping(before[k]) is not None}
    assert bool(mapped) == (family == "sd1")
    pipe.load_lora(ADDONS / name, weight)
    assert_same_images(generate(pipe), with_lora)
    merged = parameters(pipe)
    changed = [k for k in before if merged[k] is not before[k]]
    assert changed and all(mapping(merged[k]) is None for k in changed)   # private copies of the touched weights
    assert all(mapping(merged[k]) is not None for k in mapped if k not in changed)   # the others: the file's bytes
    assert all(before[k]._version == 0 for k in before)                   # the mapped originals never written to

    pipe.unload_loras()
    after = parameters(pipe)
    assert all(after[k] is before[k] for k in before)                     # the very same tensors
    assert_same_images(generate(pipe), without)


def test_weights_add_up_and_layers_merge_to_the_update(checkpoints):
    """Two loads at 0.5 are one at 1.0 (to float rounding); a LoCon 3x3 convolution gets W + (alpha/r) up @ down."""
    pipe = sdlite.load(checkpoints / "sd1")
    conv = pipe.unet.down_blocks[0].resnets[0].conv1
    original = conv.weight
    with safe_open(ADDONS / "sd1-kohya.safetensors", "pt") as f:
        key = "lora_unet_down_blocks_0_resnets_0_conv1"
        down, up, alpha = (f.get_tensor(f"{key}.{kind}").double() for kind in ("lora_down.weight", "lora_up.weight",
                                                                                 "alpha"))
    expected = original.double() + alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(original.shape)
    pipe.load_lora(ADDONS / "sd1-kohya.safetensors", 0.5)
    pipe.load_lora(ADDONS / "sd1-kohya.safetensors", 0.5)
    # three float32 roundings (the update, each addition) on values of order 1: a few 2^-24
    torch.testing.assert_close(conv.weight.double(), expected, rtol=0, atol=4 * 2**-24 * expected.abs().max().item())
    pipe.unload_loras()
    assert conv.weight is original


def test_peft_names_of_older_transformers_and_layer_patterns(checkpoints, tmp_path):
    """text_encoder.text_model.* (transformers < 5) names the same layers as text_encoder.*; PEFT's per-layer
    rank_pattern / alpha_pattern, which sdlite does not read, are refused rather than applied with the wrong scale."""
    with safe_open(ADDONS / "sd1-peft.safetensors", "pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    old = {key.replace("text_encoder.", "text_encoder.text_model."): value for key, value in tensors.items()}
    assert old != tensors
    save_file(old, tmp_path / "old.safetensors", metadata=metadata)
    a, b = sdlite.load(checkpoints / "sd1"), sdlite.load(checkpoints / "sd1")
    a.load_lora(ADDONS / "sd1-peft.safetensors")
    b.load_lora(tmp_path / "old.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(parameters(a).values(), parameters(b).values()))
    config = json.loads(metadata["lora_adapter_metadata"]) | {"unet.alpha_pattern": {"to_q": 8}}
    save_file(tensors, tmp_path / "pattern.safetensors", metadata={"lora_adapter_metadata": json.dumps(config)})
    refused(b, tmp_path / "pattern.safetensors", "alpha_pattern")


def refused(pipe, path, *words):
    before = parameters(pipe)
    with pytest.raises(UserError) as e:
        pipe.load_lora(path)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    after = parameters(pipe)
    assert all(after[k] is before[k] for k in before)   # nothing half-applied


def test_lora_of_another_family_is_refused_whole(checkpoints):
    refused(sdlite.load(checkpoints / "sd2"), ADDONS / "sd1-kohya.safetensors", "made for another model")
    refused(sdlite.load(checkpoints / "sd1"), ADDONS / "sd2-kohya.safetensors", "made for another model")


@pytest.mark.parametrize("content, words", [
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 128),
      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(192, 2)}, ["SDXL", "lora_te1_"]),
    ({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
      "lora_unet_nowhere_to_q.lora_down.weight": torch.ones(2, 64),
      "lora_unet_nowhere_to_q.lora_up.weight": torch.ones(64, 2)}, ["lora_unet_nowhere_to_q", "not in this model"]),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2)}, ["not a LoRA tensor"]),
    ({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3)}, ["lora_unet_conv_in lacks its up weight"]),
    ({"unet.conv_in.lora_A.weight": torch.ones(2, 4, 5, 5), "unet.conv_in.lora_B.weight": torch.ones(32, 2, 1, 1)},
     ["unet.conv_in has shapes", "(32, 4, 3, 3)"]),
])
def test_mismatched_files_are_refused_by_name(checkpoints, tmp_path, content, words):
    path = tmp_path / "other.safetensors"
    # a good layer first, so that a half-applying loader would have changed it
    good = {"unet.conv_out.lora_A.weight": torch.ones(2, 32, 3, 3),
            "unet.conv_out.lora_B.weight": torch.ones(4, 2, 1, 1)}
    save_file(good | content, path)
    refused(sdlite.load(checkpoints / "sd1"), path, *words)


def test_split_lora_tags():
    """Hand-checked against A1111's extra-network parsing: the tag goes, the text around it stays as typed."""
    assert split_lora_tags("a cat, <lora:ink-wash:0.7> in snow <lora:film>") == \
        ("a cat,  in snow ", [("ink-wash", 0.7), ("film", 1.0)])
    assert split_lora_tags("<lyco:detail:-0.5>portrait") == ("portrait", [("detail", -0.5)])
    assert split_lora_tags("<lora:a b:1:1>, <hypernet:h:1>") == (", <hypernet:h:1>", [("a b", 1.0)])
    assert split_lora_tags("(castle:1.2), no tags") == ("(castle:1.2), no tags", [])
    for bad in ("<lora:x:strong>", "<lora:x:1:0.5>", "<lora:x:te=1>", "<lora::1>"):
        with pytest.raises(UserError, match="<lora:"):
            split_lora_tags(bad)


def test_find_lora(tmp_path):
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "ink.safetensors").write_bytes(b"")
    (tmp_path / "ink.txt").write_text("notes")
    assert find_lora(tmp_path, "ink") == tmp_path / "styles" / "ink.safetensors"
    with pytest.raises(UserError, match="no film.safetensors in"):
        find_lora(tmp_path, "film")


def test_command_line_loads_embeddings_and_loras(checkpoints, tmp_path, capsys):
    """--embedding, --lora PATH:WEIGHT and a <lora:NAME:WEIGHT> tag found in --lora-dir give the API's image."""
    out = tmp_path / "a.png"
    prompt = "a <cat-toy> in glass-style"
    settings = ["--steps", "2", "--width", "32", "--height", "24", "--seed", "3", "--scheduler", "ddim"]
    code = main(["txt2img", f"{prompt} <lora:sd1-peft:0.6>", "--model", str(checkpoints / "sd1"), *settings,
                 "--embedding", str(ADDONS / "learned_embeds.safetensors"),
                 "--embedding", str(ADDONS / "glass-style.pt"),
                 "--lora", f"{ADDONS / 'sd1-kohya.safetensors'}:0.8", "--lora-dir", str(ADDONS), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    pipe = sdlite.load(checkpoints / "sd1")
    pipe.load_embedding(ADDONS / "learned_embeds.safetensors")
    pipe.load_embedding(ADDONS / "glass-style.pt")
    pipe.load_lora(ADDONS / "sd1-kohya.safetensors", 0.8)
    pipe.load_lora(ADDONS / "sd1-peft.safetensors", 0.6)
    expected = pipe.txt2img(prompt + " ", steps=2, width=32, height=24, seed=3, scheduler="ddim")
    with Image.open(out) as image:
        assert_same_images([image.convert("RGB")], np.asarray(expected[0])[None])


@pytest.mark.parametrize("argv, words", [
    (["a <lora:ink:0.5> castle"], ["--lora-dir"]),
    (["a castle", "--lora", "missing.safetensors:0.5"], ["--lora: no such file: missing.safetensors"]),
    (["a castle", "--embedding", "missing.pt"], ["--embedding: no such file: missing.pt"]),
])
def test_command_line_refuses_missing_files(checkpoints, tmp_path, capsys, argv, words):
    out = tmp_path / "a.png"
    code = main(["txt2img", *argv, "--model", str(checkpoints / "sd1"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and all(w in err for w in words), err
    assert not out.exists()


def test_pickled_lora_is_read_weights_only(checkpoints, tmp_path, capsys):
    """A .pt LoRA gives the .safetensors one's weights; a pickle that would run code is refused."""
    with safe_open(ADDONS / "sd1-kohya.safetensors", "pt") as f:
        torch.save({key: f.get_tensor(key) for key in f.keys()}, tmp_path / "kohya.pt")
    a, b = sdlite.load(checkpoints / "sd1"), sdlite.load(checkpoints / "sd1")
    a.load_lora(ADDONS / "sd1-kohya.safetensors")
    b.load_lora(tmp_path / "kohya.pt")
    assert all(torch.equal(x, y) for x, y in zip(parameters(a).values(), parameters(b).values()))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"unet.conv_in.lora_A.weight": RunsCode()}, protocol=2))
    refused(b, tmp_path / "evil.pt", "not a readable LoRA file")
    assert "never" not in capsys.readouterr().out


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never be printed",))
