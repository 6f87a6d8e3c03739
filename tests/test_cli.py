"""Bad input: one clear line on stderr, a non-zero exit, no traceback, no output file left behind."""
import hashlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdlite.__main__ import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(code, err, *words):
    assert code != 0
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    for word in words:
        assert word in err


def test_missing_model_path(capsys, tmp_path):
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "txt2img", "a castle", "--model", str(tmp_path / "nope.safetensors"), "--out", str(out))
    assert_refused(code, err, "model not found", "nope.safetensors")
    assert not out.exists()


def test_truncated_safetensors(capsys, tmp_path, checkpoints):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((checkpoints / "sd1.safetensors").read_bytes()[:5000])
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "txt2img", "a castle", "--model", str(bad), "--out", str(out))
    assert_refused(code, err, "not a safetensors file, or truncated", "cut.safetensors")
    assert not out.exists()


def test_not_a_safetensors_file(capsys, tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("these are not weights")
    code, err = run_cli(capsys, "txt2img", "a castle", "--model", str(bad), "--out", str(tmp_path / "a.png"))
    assert_refused(code, err, "not a safetensors file", "notes.safetensors")
    assert list(tmp_path.iterdir()) == [bad]


def test_not_a_stable_diffusion_checkpoint(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file
    other = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(2, 3)}, other)
    code, err = run_cli(capsys, "txt2img", "a castle", "--model", str(other), "--out", str(tmp_path / "a.png"))
    assert_refused(code, err, "not a Stable Diffusion checkpoint")
    assert list(tmp_path.iterdir()) == [other]


def test_pickled_checkpoint_with_code_is_refused(capsys, tmp_path):
    """A .ckpt is opened only by torch's weights-only loader: a pickle that would run code is refused."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (print, ("this ran",))

    bad = tmp_path / "model.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    code, err = run_cli(capsys, "txt2img", "a castle", "--model", str(bad), "--out", str(tmp_path / "a.png"))
    assert_refused(code, err, "weights-only", "safetensors")
    assert "this ran" not in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, words", [
    ("--width", "60", ["width", "multiple of 8", "60"]),
    ("--height", "44", ["height", "multiple of 8", "44"]),
    ("--steps", "0", ["steps", "at least 1"]),
    ("--batch-size", "0", ["batch size", "at least 1"]),
])
def test_bad_generation_settings(capsys, tmp_path, checkpoints, flag, value, words):
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "txt2img", "a castle", "--model", str(checkpoints / "sd1"), "--steps", "2",
                        "--width", "40", "--height", "48", flag, value, "--out", str(out))
    assert_refused(code, err, *words)
    assert not out.exists()


def test_unknown_scheduler_is_a_usage_error(tmp_path):
    """argparse rejects it before any model is loaded, naming the choices."""
    result = subprocess.run([sys.executable, "-m", "sdlite", "txt2img", "a castle", "--scheduler", "heun",
                             "--out", str(tmp_path / "a.png")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "invalid choice: 'heun'" in result.stderr and "ddim" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "a.png").exists()


def test_existing_output_is_not_overwritten(capsys, tmp_path, checkpoints):
    out = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(out)
    before = out.read_bytes()
    code, err = run_cli(capsys, "txt2img", "a castle", "--model", str(checkpoints / "sd1"), "--steps", "1",
                        "--width", "40", "--height", "48", "--out", str(out))
    assert_refused(code, err, "exists", "--overwrite")
    assert out.read_bytes() == before


def test_cli_writes_png_with_parameters_and_overwrites_only_when_asked(tmp_path, checkpoints):
    """The real entry point end to end: progress on stderr, the PNG's A1111 'parameters' chunk."""
    out = tmp_path / "castle.png"
    Image.new("RGB", (8, 8), "red").save(out)
    cmd = [sys.executable, "-m", "sdlite", "txt2img", "a castle", "--model", str(checkpoints / "sd1.safetensors"),
           "--negative-prompt", "blurry", "--steps", "3", "--width", "40", "--height", "48", "--seed", "7",
           "--scheduler", "ddim", "--guidance-scale", "5", "--out", str(out), "--overwrite"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3/3 steps" in result.stderr
    image = Image.open(out)
    assert image.size == (40, 48)
    model_hash = hashlib.sha256((checkpoints / "sd1.safetensors").read_bytes()).hexdigest()[:10]
    assert image.text["parameters"] == ("a castle\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, CFG scale: 5.0, "
                                        f"Seed: 7, Size: 40x48, Model hash: {model_hash}, Model: sd1")
    assert [p.name for p in tmp_path.iterdir()] == ["castle.png"]


def test_vae_tiling_flag_decodes_in_tiles(tmp_path, checkpoints, capsys):
    """--vae-tiling: an image wider than the VAE's sample_size (32 pixels in the test model) is decoded in tiles,
    which changes it (tests/test_vae.py checks the tiles against diffusers); without the flag it is not."""
    images = []
    for flags in ([], ["--vae-tiling"]):
        out = tmp_path / f"tiles{len(flags)}.png"
        assert main(["txt2img", "a castle", "--model", str(checkpoints / "sd1"), "--steps", "2", "--width", "64",
                     "--height", "40", "--seed", "3", "--out", str(out), *flags]) == 0
        images.append(np.asarray(Image.open(out)).astype(int))
    assert images[0].shape == images[1].shape == (40, 64, 3)
    assert np.abs(images[0] - images[1]).max() > 0


# --- img2img and inpainting ---------------------------------------------------------------------------------------

@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "photo.png"
    Image.radial_gradient("L").resize((48, 40)).convert("RGB").save(path)
    return path


def white_box_mask(path, size=(48, 40), box=(10, 8, 30, 30)):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    mask.save(path)
    return path


@pytest.mark.parametrize("strength", ["1.5", "-0.1"])
def test_strength_outside_0_1(capsys, tmp_path, checkpoints, picture, strength):
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "img2img", "a castle", "--model", str(checkpoints / "sd1"), "--image", str(picture),
                        "--strength", strength, "--steps", "2", "--out", str(out))
    assert_refused(code, err, "strength must be between 0 and 1", strength)
    assert not out.exists()


def test_not_an_image_file(capsys, tmp_path, checkpoints):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "img2img", "a castle", "--model", str(checkpoints / "sd1"), "--image", str(notes),
                        "--steps", "2", "--out", str(out))
    assert_refused(code, err, "not an image file", "notes.png")
    assert not out.exists()


def test_missing_image(capsys, tmp_path):
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "img2img", "a castle", "--model", "whatever", "--image", str(tmp_path / "gone.png"),
                        "--out", str(out))
    assert_refused(code, err, "--image", "gone.png")


def test_mask_of_another_size_is_refused(capsys, tmp_path, checkpoints, picture):
    mask = white_box_mask(tmp_path / "mask.png", size=(40, 40))
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "inpaint", "a cat", "--model", str(checkpoints / "sd1"), "--image", str(picture),
                        "--mask", str(mask), "--steps", "2", "--out", str(out))
    assert_refused(code, err, "mask is 40x40 but the image is 48x40")
    assert not out.exists()


def test_all_black_mask_is_refused(capsys, tmp_path, checkpoints, picture):
    mask = white_box_mask(tmp_path / "mask.png", box=(0, 0, 0, 0))
    out = tmp_path / "a.png"
    code, err = run_cli(capsys, "inpaint", "a cat", "--model", str(checkpoints / "sd1"), "--image", str(picture),
                        "--mask", str(mask), "--steps", "2", "--out", str(out))
    assert_refused(code, err, "all black", "nothing to repaint")
    assert not out.exists()


def test_txt2img_on_an_inpainting_checkpoint_is_refused(capsys, tmp_path, checkpoints):
    code, err = run_cli(capsys, "txt2img", "a cat", "--model", str(checkpoints / "sd1-inpaint.safetensors"),
                        "--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path / "a.png"))
    assert_refused(code, err, "inpainting checkpoint", "inpaint")


def test_rgba_and_greyscale_inputs_are_converted(tmp_path, checkpoints, picture):
    """The same picture as RGB, RGBA (opaque) and as an 'LA' greyscale+alpha file give the RGB picture's result."""
    import sdlite
    pipe = sdlite.load(checkpoints / "sd1")
    grey = Image.open(picture).convert("L")
    settings = dict(strength=0.5, steps=2, seed=1, scheduler="ddim")
    rgb = pipe.img2img("a castle", grey.convert("RGB"), **settings)[0]
    rgba = pipe.img2img("a castle", grey.convert("RGBA"), **settings)[0]
    la = pipe.img2img("a castle", grey.convert("LA"), **settings)[0]
    assert np.array_equal(np.asarray(rgb), np.asarray(rgba)) and np.array_equal(np.asarray(rgb), np.asarray(la))


def test_inpaint_cli_keep_unmasked_keeps_every_pixel_outside_the_mask(tmp_path, checkpoints, picture):
    mask = white_box_mask(tmp_path / "mask.png")
    out = tmp_path / "cat.png"
    result = subprocess.run([sys.executable, "-m", "sdlite", "inpaint", "a black cat", "--model",
                             str(checkpoints / "sd1-inpaint.safetensors"), "--image", str(picture), "--mask",
                             str(mask), "--steps", "2", "--seed", "3", "--keep-unmasked", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    got, before, m = (np.asarray(Image.open(p).convert("RGB")) for p in (out, picture, mask))
    outside, inside = m[..., 0] == 0, m[..., 0] == 255
    assert np.array_equal(got[outside], before[outside])
    assert not np.array_equal(got[inside], before[inside])
    assert "Denoising strength: 1.0" in Image.open(out).text["parameters"]


def test_mask_blur_softens_the_pasted_edge(checkpoints, picture, tmp_path):
    import sdlite
    pipe = sdlite.load(checkpoints / "sd1-inpaint.safetensors")
    mask = white_box_mask(tmp_path / "mask.png")
    settings = dict(steps=2, seed=3, scheduler="ddim", keep_unmasked=True)
    sharp = np.asarray(pipe.inpaint("a cat", picture, mask, **settings)[0]).astype(int)
    soft = np.asarray(pipe.inpaint("a cat", picture, mask, mask_blur=4, **settings)[0]).astype(int)
    before = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    # just outside the box: kept exactly without blur, blended with the repainted region with it
    ring = (slice(8, 30), slice(31, 33))
    assert np.array_equal(sharp[ring], before[ring])
    assert not np.array_equal(soft[ring], before[ring])
