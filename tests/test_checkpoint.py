"""Loading: both official layouts give the same modules; family, padding and prediction type are read right."""
import dataclasses
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sdlite


def state(pipe, name):
    return getattr(pipe, name).state_dict()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_and_folder_hold_the_same_weights(checkpoints, family):
    """sd1.safetensors is stored in fp16 and sd2's folder as the .fp16 variant: loading takes both to fp32."""
    folder, single = sdlite.load(checkpoints / family), sdlite.load(checkpoints / f"{family}.safetensors")
    for name in ("text_encoder", "unet", "vae"):
        a, b = state(folder, name), state(single, name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == torch.float32 and torch.equal(a[key], b[key]), f"{name}.{key}"
    assert folder.unet.config == single.unet.config
    # a single file does not record the image size: the family's is taken (the test folders' VAE says 32)
    assert single.vae.config.sample_size == {"sd1": 512, "sd2": 768}[family]
    assert folder.vae.config == dataclasses.replace(single.vae.config, sample_size=32)
    assert folder.text_encoder.config == single.text_encoder.config


def test_families_are_told_apart(checkpoints):
    sd1, sd2 = sdlite.load(checkpoints / "sd1.safetensors"), sdlite.load(checkpoints / "sd2.safetensors")
    # the family decides what a single file does not say: the schedule and the image size
    assert (sd1.default_sampler, sd2.default_sampler, sd1.default_size, sd2.default_size) == ("pndm", "ddim", 512, 768)
    assert sd1.text_encoder.config.hidden_act == "quick_gelu" and sd2.text_encoder.config.hidden_act == "gelu"
    assert sd1.unet.config.use_linear_projection is False and sd2.unet.config.use_linear_projection is True
    # SD 1.x pads prompts with end-of-text, SD 2.x with id 0
    assert sd1.tokenizer(["a"])[0, -1] == 49407 and sd2.tokenizer(["a"])[0, -1] == 0
    assert sdlite.load(checkpoints / "sd2").tokenizer(["a"])[0, -1] == 0


def test_sd2_single_file_is_v_prediction_unless_told(checkpoints):
    path = checkpoints / "sd2.safetensors"
    assert sdlite.load(path).scheduler_config["prediction_type"] == "v_prediction"
    assert sdlite.load(path, prediction_type="epsilon").scheduler_config["prediction_type"] == "epsilon"
    assert sdlite.load(checkpoints / "sd1.safetensors").scheduler_config.get("prediction_type", "epsilon") == "epsilon"
    with pytest.raises(sdlite.UserError, match="unknown prediction type"):
        sdlite.load(path, prediction_type="x0")


def test_text_encoder_keys_with_or_without_text_model_prefix(checkpoints, tmp_path):
    folder = tmp_path / "sd1"
    shutil.copytree(checkpoints / "sd1", folder)
    weights = folder / "text_encoder" / "model.safetensors"
    sd = load_file(weights)
    had_prefix = all(k.startswith("text_model.") for k in sd)
    flipped = {k.removeprefix("text_model.") if had_prefix else "text_model." + k: v for k, v in sd.items()}
    save_file(flipped, weights)
    a = sdlite.load(checkpoints / "sd1").text_encoder.state_dict()
    b = sdlite.load(folder).text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_honoured(checkpoints, dtype):
    """But for the VAE of a float16 load, which runs in float32 when its config says force_upcast (the default, and
    what single files get), as diffusers' SDXL pipelines do."""
    pipe = sdlite.load(checkpoints / "sd1.safetensors", dtype=dtype)
    for name in ("text_encoder", "unet"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {dtype}
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    assert {p.dtype for p in pipe.vae.parameters()} == {vae_dtype}


@pytest.mark.filterwarnings("ignore:.*fp16 runs on PyTorch's generic kernels")   # (fp16's speed is not tested here)
def test_float16_vae_without_force_upcast_and_with_it_decode(checkpoints, tmp_path):
    folder = tmp_path / "sd1"
    shutil.copytree(checkpoints / "sd1", folder)
    config = folder / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "force_upcast": False}))
    for model, vae_dtype in ((folder, torch.float16), (checkpoints / "sd1", torch.float32)):
        pipe = sdlite.load(model, dtype=torch.float16)
        assert {p.dtype for p in pipe.vae.parameters()} == {vae_dtype}
        image, = pipe.img2img("a", Image.new("RGB", (16, 16), "red"), steps=2, seed=0)
        assert image.size == (16, 16)


def test_folder_missing_a_component_is_a_user_error(checkpoints, tmp_path):
    folder = tmp_path / "sd1"
    shutil.copytree(checkpoints / "sd1", folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(sdlite.UserError, match=r"vae.config\.json is missing"):
        sdlite.load(folder)


def test_hub_id_is_downloaded_with_huggingface_hub(checkpoints, monkeypatch):
    """No network in tests: snapshot_download is replaced by one that 'downloads' the sd1 folder."""
    import huggingface_hub
    asked = []

    def fake_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return str(checkpoints / "sd1")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    pipe = sdlite.load("someone/tiny-sd")
    repo_id, patterns = asked[0]
    assert repo_id == "someone/tiny-sd" and "*/diffusion_pytorch_model.safetensors" in patterns
    assert pipe.text_encoder.config.hidden_act == "quick_gelu"   # the sd1 folder it downloaded


def test_hub_failure_is_one_clear_line(monkeypatch):
    import huggingface_hub

    def offline(repo_id, allow_patterns):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(sdlite.UserError) as e:
        sdlite.load("someone/tiny-sd")
    assert "could not download 'someone/tiny-sd'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("component, change, named", [
    ("unet", {"block_out_channels": [64, 64]}, "weights do not fit the config"),
    ("unet", {"cross_attention_dim": 96}, "weights do not fit the config"),
    ("unet", {"class_embed_type": "timestep"}, "class_embed_type"),
    ("unet", {"layers_per_block": "1"}, "layers_per_block"),
    ("vae", {"latent_channels": 3}, "weights do not fit the config"),
    ("vae", {"use_quant_conv": False}, "weights do not fit the inferred architecture"),
    ("vae", {"shift_factor": "0.1"}, "shift_factor"),
    ("text_encoder", {"hidden_size": "128"}, "hidden_size"),
    ("text_encoder", {"num_hidden_layers": 3}, "weights do not fit the inferred architecture"),
    ("text_encoder", {"hidden_act": "tanh"}, "hidden_act"),
    ("text_encoder", {"attention_dropout": 0.1}, "attention_dropout"),
])
def test_folder_config_mistakes_are_one_line_naming_the_file(checkpoints, tmp_path, component, change, named):
    """Refused keys, values of the wrong type, and configs whose widths the weights do not have."""
    folder = tmp_path / "sd1"
    shutil.copytree(checkpoints / "sd1", folder)
    config = folder / component / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(sdlite.UserError) as e:
        sdlite.load(folder)
    message = str(e.value)
    assert "\n" not in message and named in message and str(folder / component) in message
