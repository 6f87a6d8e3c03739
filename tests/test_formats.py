"""Checkpoint formats both ways: a single file saved as a diffusers folder, and written back as a single file, loads
as the same modules; the family records decide what a single file does not say."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sdlite
from sdlite.formats import families
from sdlite.formats.diffusers import save_folder
from sdlite.formats.ldm import save_single_file

NETWORKS = ("text_encoder", "unet", "vae")
# What the original single files hold that sdlite does not use, so that its readers drop it and its writer does not
# write it (formats/ldm.py): the EMA's bookkeeping, the schedule's buffers, CLIP's constant position_ids and
# OpenCLIP's contrastive head.
UNUSED = ("model_ema.", "betas", "alphas_cumprod", "sqrt_alphas_cumprod", "cond_stage_model.transformer.text_model."
          "embeddings.position_ids", "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")


def assert_same_modules(a: sdlite.Pipeline, b: sdlite.Pipeline):
    """Same configs and the same tensors (the weights are copied from file to file, never computed: exact)."""
    for name in NETWORKS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.config == y.config, name
        x, y = x.state_dict(), y.state_dict()
        assert x.keys() == y.keys(), name
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), f"{name}.{key}"
    assert a.default_size == b.default_size
    public = {k: v for k, v in a.scheduler_config.items() if not k.startswith("_")}
    assert public == {k: v for k, v in b.scheduler_config.items() if not k.startswith("_")}
    prompts = ["a cat!", "two dogs, one red"]   # "!" is SD 2.x's pad token
    assert torch.equal(a.tokenizer(prompts), b.tokenizer(prompts))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_saved_as_a_folder_loads_the_same(checkpoints, tmp_path, family):
    single = sdlite.load(checkpoints / f"{family}.safetensors")
    save_folder(single, tmp_path / family, dtype=torch.float32)
    folder = sdlite.load(tmp_path / family)
    assert_same_modules(single, folder)
    # The same weights through the same code: the images differ only if a kernel sums in another order (memory
    # alignment can pick another SIMD path), by float32 rounding, far below one of 255 steps: at most one step.
    a, b = (np.asarray(pipe.txt2img("a red cube", steps=2, width=24, height=16, seed=3)[0], dtype=int)
            for pipe in (single, folder))
    assert a.shape == (16, 24, 3) and np.abs(a - b).max() <= 1


@pytest.mark.parametrize("family", ["sd1", "sd2", "sd1-inpaint"])
def test_single_file_written_back_holds_the_original_tensors(checkpoints, tmp_path, family):
    """The file written from the loaded modules has the original's keys, but for UNUSED, and its tensors (stored in
    fp16 or bf16, loaded and written in fp32: exactly the same numbers); SD 2.x's last text block, which SD skips and
    sdlite does not keep, is written as the identity."""
    path = checkpoints / f"{family}.safetensors"
    original = load_file(path)
    save_single_file(sdlite.load(path), tmp_path / "written.safetensors", dtype=torch.float32)
    written = load_file(tmp_path / "written.safetensors")
    assert written.keys() == {k for k in original if not k.startswith(UNUSED)}
    blocks = "cond_stage_model.model.transformer.resblocks."
    last = f"{blocks}{max(int(k[len(blocks):].split('.')[0]) for k in original if k.startswith(blocks))}." \
        if family == "sd2" else None
    for key, value in written.items():
        if last and key.startswith(last):
            one = key.endswith(("ln_1.weight", "ln_2.weight"))
            assert torch.equal(value, torch.ones_like(value) if one else torch.zeros_like(value)), key
        else:
            assert torch.equal(value, original[key].float()), key
    assert_same_modules(sdlite.load(path), sdlite.load(tmp_path / "written.safetensors"))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_folder_saved_as_a_single_file_loads_the_same(checkpoints, tmp_path, family):
    """But for what a single file cannot hold: the image size and the scheduler, which the family's record gives."""
    folder = sdlite.load(checkpoints / family)
    save_single_file(folder, tmp_path / f"{family}.safetensors", dtype=torch.float32)
    single = sdlite.load(tmp_path / f"{family}.safetensors")
    record = {"sd1": families.SD1, "sd2": families.SD2}[family]
    assert (single.default_size, single.scheduler_config) == (record.image_size, record.scheduler_config())
    folder.vae.config.sample_size = single.vae.config.sample_size
    folder.default_size, folder.scheduler_config = single.default_size, single.scheduler_config
    assert_same_modules(folder, single)


def test_single_files_are_told_apart_by_text_layout_and_unet_inputs(checkpoints):
    for name, record in (("sd1", families.SD1), ("sd2", families.SD2), ("sd1-inpaint", families.SD1_INPAINTING)):
        pipe = sdlite.load(checkpoints / f"{name}.safetensors")
        assert pipe.unet.config.in_channels == record.unet_in_channels
        assert pipe.tokenizer.pad_id == record.pad_id and pipe.default_size == record.image_size
        assert pipe.scheduler_config == record.scheduler_config()
    assert families.single_file_family("openclip", 9) is families.SD2_INPAINTING
    assert families.single_file_family("openai", 5) is families.SD1   # a UNet no record knows: its version's


def test_a_unet_without_a_single_file_form_is_refused(checkpoints, tmp_path):
    pipe = sdlite.load(checkpoints / "sd1")
    pipe.unet.config.mid_block = False
    with pytest.raises(sdlite.UserError, match="no form in the original single-file layout"):
        save_single_file(pipe, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
