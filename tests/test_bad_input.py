"""The contract for every bad input (README, "Bad input"): exit status 2 and one line on stderr naming what is wrong,
in the API a UserError; no output file, nothing existing changed; never a traceback, a hang, or garbage with exit 0.

Most cases run the command line in-process (sdlite.__main__.main); a few go through a real process, for the exit
status, the absence of a traceback and Ctrl-C. The models are weights/default (64 x 64) and the tiny test checkpoints.
"""
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import sdlite
from sdlite import UserError, runtime
from sdlite.__main__ import main
from sdlite.checkpoint import load
from sdlite.weights import read_safetensors

DEFAULT = Path(__file__).resolve().parent.parent / "weights" / "default"
ROOT = Path(__file__).resolve().parent.parent


def refused(capsys, argv, *words, out: Path | None = None) -> str:
    """Run the CLI in-process; assert exit 2, one `error:` line naming `words`, and no file at `out`."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) >= 1 and err[-1].startswith("error: "), err
    assert not any(line.startswith("error: ") for line in err[:-1]) and "Traceback" not in "\n".join(err)
    for word in words:
        assert word in err[-1], err[-1]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")]
    return err[-1]


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if anything is sent to the Hugging Face Hub."""
    import huggingface_hub

    def called(*args, **kwargs):
        raise AssertionError("a local path went to the Hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", called)


# --- generation settings: refused before anything runs, never replaced by a default --------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--width", "0"], ["width", "positive multiple of 8", "0"]),
    (["--height", "0"], ["height", "0"]),
    (["--guidance-scale", "-1"], ["guidance scale", "-1"]),
    (["--guidance-scale", "nan"], ["guidance scale", "nan"]),
    (["--guidance-scale", "inf"], ["guidance scale", "inf"]),
    (["--guidance-rescale", "nan"], ["guidance rescale", "nan"]),
    (["--seed", "-1"], ["seed", "2**64 - 1"]),
    (["--seed", str(2**64)], ["seed", str(2**64)]),
    (["--steps", "0"], ["steps", "at least 1"]),
    (["--steps", "1000"], ["steps", "at most 999", "steps_offset 1"]),
    (["--batch-size", "0"], ["batch size", "at least 1"]),
    (["--batch-size", "-3"], ["batch size", "at least 1"]),
    (["--device", "banana"], ["device", "banana", "--device cpu"]),
    (["--device", "meta"], ["meta", "--device cpu"]),
    (["--negative-prompt", "bad \udcff bytes"], ["negative prompt", "UTF-8"]),
    (["--width", "65536", "--height", "65536"], ["65536x65536", "GB of working memory", "--vae-tiling"]),
    (["--model", ""], ["--model is empty"]),
    (["--threads", "-1"], ["--threads", "at least 1"]),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], ["device", "cuda", "not available"])]))
def test_generation_settings_are_refused(capsys, tmp_path, flags, words):
    out = tmp_path / "a.png"
    refused(capsys, ["txt2img", "a red circle", "--model", DEFAULT, "--steps", "2", "--out", out, *flags], *words,
            out=out)


def test_prompt_with_bytes_that_are_not_utf8(capsys, tmp_path):
    """argv bytes that are not UTF-8 reach Python as lone surrogates."""
    out = tmp_path / "a.png"
    refused(capsys, ["txt2img", os.fsdecode(b"a red \xff circle"), "--model", DEFAULT, "--out", out],
            "prompt", "UTF-8", out=out)


@pytest.mark.parametrize("flags, words", [
    (["--strength", "nan"], ["strength", "nan"]),
    (["--mask-blur", "-2"], ["mask blur", "-2"]),
    (["--mask-blur", "nan"], ["mask blur", "nan"]),
    (["--mask-blur", "inf"], ["mask blur", "inf"]),
    (["--mask-blur", "1e300"], ["mask blur", "larger side (64 pixels)"]),
])
def test_inpaint_settings_are_refused(capsys, tmp_path, flags, words):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), "blue").save(image)
    Image.new("L", (64, 64), 255).save(mask)
    out = tmp_path / "a.png"
    refused(capsys, ["inpaint", "a cat", "--model", DEFAULT, "--image", image, "--mask", mask, "--steps", "2",
                     "--out", out, *flags], *words, out=out)


def test_api_refuses_what_the_cli_refuses():
    pipe = load(DEFAULT)
    for settings, words in [(dict(width=0), "width"), (dict(guidance_scale=float("nan")), "guidance"),
                            (dict(seed=-5), "seed"), (dict(seed=2**64), "seed"), (dict(steps=0), "steps")]:
        with pytest.raises(UserError, match=words):
            pipe.txt2img("a red circle", **settings)
    with pytest.raises(UserError, match="prompt"):
        pipe.txt2img(None)
    assert isinstance(UserError("x"), ValueError)


# --- models: every malformed file or folder is one line naming it -------------------------------------------------

def safetensors_bytes(header) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(64)


@pytest.fixture(scope="module")
def sd1_tensors(checkpoints):
    return load_file(checkpoints / "sd1.safetensors")


def folder_copy(tmp_path: Path, change: dict[str, object] | None = None) -> Path:
    """weights/default with its config files copied (the weights linked), then `change`: {relative path: new
    content (bytes or a JSON value), None to delete, or "fifo" for a named pipe}."""
    folder = tmp_path / "model"
    for source in DEFAULT.rglob("*"):
        target = folder / source.relative_to(DEFAULT)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif source.suffix == ".safetensors":
            target.symlink_to(source)
        else:
            shutil.copy(source, target)
    for name, content in (change or {}).items():
        path = folder / name
        if content is None:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif content == "fifo":                          # a named pipe: reading it would wait forever
            path.unlink()
            os.mkfifo(path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return folder


def with_key(path: Path, key: str, value) -> dict:
    config = json.loads((DEFAULT / path).read_text())
    config[key] = value
    return {path: config}


@pytest.mark.parametrize("content, words", [
    (safetensors_bytes(5), ["header is a JSON int"]),
    (safetensors_bytes("x"), ["header is a JSON str"]),
    (safetensors_bytes({"a": 5}), ["'a'", "no dtype"]),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}}), ["'a'", "does not fit"]),
    (safetensors_bytes({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}), ["'a'", "unsupported dtype"]),
    (safetensors_bytes({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}), ["'a'", "unsupported dtype"]),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}), ["'a'", "invalid shape"]),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}), ["truncated"]),
    (b"\x01\x02", ["shorter than the header's length"]),
    (b"", ["0 bytes"]),
])
def test_malformed_safetensors_files(capsys, tmp_path, content, words):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    out = tmp_path / "a.png"
    refused(capsys, ["txt2img", "a castle", "--model", bad, "--out", out], "bad.safetensors", *words, out=out)


@pytest.mark.parametrize("change, words", [
    ("no_clip", ["not a Stable Diffusion checkpoint", "cond_stage_model"]),
    ("clip_prefix_only", ["cond_stage_model.*", "do not form"]),
    ("extra_unet_tensor", ["unexpected", "extra"]),
    ("wrong_shape", ["size mismatch"]),
    ("missing_unet_tensor", ["model.diffusion_model.*"]),
])
def test_single_files_whose_weights_do_not_fit(capsys, tmp_path, sd1_tensors, change, words):
    sd = dict(sd1_tensors)
    key = "model.diffusion_model.out.2.weight"
    if change == "no_clip":
        sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    elif change == "clip_prefix_only":
        sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.") or "final_layer_norm" in k}
    elif change == "extra_unet_tensor":
        sd["model.diffusion_model.middle_block.1.extra.weight"] = torch.zeros(3)
    elif change == "wrong_shape":
        sd[key] = torch.zeros(sd[key].shape[0] + 1, *sd[key].shape[1:])
    else:
        del sd[key]
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    out = tmp_path / "a.png"
    refused(capsys, ["txt2img", "a castle", "--model", bad, "--out", out], *words, out=out)


@pytest.mark.parametrize("content, words", [
    ([1, 2, 3], ["holds list data", "state_dict"]),
    (torch.zeros(3), ["holds Tensor data"]),
    ({"state_dict": 5}, ["holds int data"]),
    ({"state_dict": {"a": 5}}, ["entry 'a' is not a named tensor"]),
    ({1: torch.zeros(2)}, ["entry '1' is not a named tensor"]),
])
def test_pickled_checkpoints_that_are_not_state_dicts(capsys, tmp_path, content, words):
    bad = tmp_path / "model.ckpt"
    torch.save(content, bad)
    out = tmp_path / "a.png"
    refused(capsys, ["txt2img", "a castle", "--model", bad, "--out", out], "model.ckpt", *words, out=out)


@pytest.mark.parametrize("change, words", [
    ({"model_index.json": b"{not json"}, ["model_index.json", "not valid JSON"]),
    ({"model_index.json": [1, 2]}, ["model_index.json", "JSON list"]),
    ({"unet/config.json": 5}, ["unet/config.json", "JSON int"]),
    ({"unet/config.json": b"\xff\xfe"}, ["unet/config.json", "not valid JSON"]),
    (with_key("unet/config.json", "block_out_channels", "wide"), ["unet", "config"]),
    (with_key("unet/config.json", "sample_size", "big"), ["unet/config.json", "sample_size"]),
    (with_key("vae/config.json", "block_out_channels", 7), ["vae/config.json"]),
    (with_key("unet/config.json", "block_out_channels", [32, 96]), ["unet", "size mismatch"]),
    (with_key("text_encoder/config.json", "num_hidden_layers", None), ["text_encoder", "config"]),
    ({"vae/config.json": None}, ["vae/config.json is missing"]),
    ({"vae/config.json": "fifo"}, ["vae/config.json: not a regular file"]),
    ({"tokenizer": None}, ["tokenizer is missing"]),
    ({"tokenizer/vocab.json": b"{\"a\": "}, ["tokenizer", "not a readable"]),
    ({"tokenizer/merges.txt": None}, ["tokenizer", "not a readable"]),
    (with_key("scheduler/scheduler_config.json", "beta_schedule", "wobbly"), ["beta_schedule", "wobbly"]),
])
def test_malformed_diffusers_folders(capsys, tmp_path, change, words):
    folder = folder_copy(tmp_path, change)
    out = tmp_path / "a.png"
    refused(capsys, ["txt2img", "a red circle", "--model", folder, "--steps", "2", "--out", out], *words, out=out)


def test_model_paths_that_are_not_there(capsys, tmp_path, monkeypatch, no_hub):
    """A mistyped local path is reported as missing, and never sent to the Hub; a FIFO is refused, not read."""
    out = tmp_path / "a.png"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    os.mkfifo(tmp_path / "fifo.safetensors")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for model, words in [("./weights/defualt", ["does not exist"]), ("models/sd15", ["does not exist"]),
                         ("someone/model.safetensors", ["does not exist"]), ("~/nope/sd", ["does not exist"]),
                         (str(tmp_path / "nope"), ["does not exist"]), (str(tmp_path / "loop"), ["symbolic link"]),
                         (str(tmp_path / "fifo.safetensors"), ["not a regular file"])]:
        refused(capsys, ["txt2img", "a castle", "--model", model, "--out", out], model, *words, out=out)


def test_non_finite_values_stop_the_run_with_the_step(capsys, tmp_path):
    """NaN weights, and a guidance scale so large that the latents overflow, would give a black PNG with exit 0."""
    folder = folder_copy(tmp_path)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet.resolve())
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("nan"))
    unet.unlink()
    save_file(weights, unet)
    out = tmp_path / "a.png"
    refused(capsys, ["txt2img", "a red circle", "--model", folder, "--steps", "3", "--out", out],
            "after step 1 of 3", "NaN", out=out)
    refused(capsys, ["txt2img", "a red circle", "--model", DEFAULT, "--steps", "3", "--guidance-scale", "1e30",
                     "--out", out], "NaN or infinite", out=out)
    pipe = load(DEFAULT, dtype=torch.bfloat16)
    pipe.unet.conv_out.bias.data.fill_(3e38)              # bf16 keeps fp32's range: make it overflow outright
    with pytest.raises(UserError, match="--dtype fp32"):
        pipe.txt2img("a red circle", steps=2)


def test_fp16_runs_where_onednn_cannot_pack_it_and_says_it_is_slow(tmp_path, capsys, monkeypatch):
    """oneDNN packs fp16 convolution weights only on CPUs with AVX-512 FP16 or AVX-NE-CONVERT; elsewhere the UNet
    falls back to the plain convolution instead of failing (this machine's case when it lacks both; made so here on
    any CPU), with one warning line naming the slow precision (none with --quiet)."""
    computes = runtime.onednn_takes
    monkeypatch.setattr(runtime, "onednn_takes", lambda dtype: dtype != torch.float16 and computes(dtype))
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    out = tmp_path / "a.png"
    for quiet in ([], ["--quiet"]):
        assert main(["txt2img", "a red circle", "--model", str(DEFAULT), "--steps", "1", "--dtype", "fp16",
                     "--out", str(out), "--overwrite", *quiet]) == 0
        assert Image.open(out).size == (64, 64)
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warnings) == (0 if quiet else 1) and all("fp16 runs on PyTorch's generic" in w for w in warnings)


# --- files: written whole, exclusively, with the usual permissions --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_image():
    """One 64 x 64 image generated by the default model (the files tests only write it)."""
    return load(DEFAULT).txt2img("a red circle", steps=1, seed=0)[0]


def test_output_places_that_cannot_be_written(capsys, tmp_path):
    folder_named_png = tmp_path / "dir.png"
    folder_named_png.mkdir()
    for out, words in [(folder_named_png, ["is a folder"]), (tmp_path, ["must name a .png file"]),
                       (Path("/proc/sdlite.png"), ["cannot write to /proc"]),
                       (tmp_path / "nowhere" / "a.png", ["does not exist"]),
                       (tmp_path / ("x" * 300 + ".png"), ["File name too long"])]:
        for flags in ([], ["--overwrite"]):
            refused(capsys, ["txt2img", "a red circle", "--model", DEFAULT, "--steps", "1", "--out", out, *flags],
                    *words)
    assert folder_named_png.is_dir() and not list(folder_named_png.iterdir())


def test_new_files_get_the_umask_mode_and_overwrite_keeps_the_mode(tmp_path, tiny_image):
    old = os.umask(0o022)
    try:
        sdlite.save_png(tiny_image, tmp_path / "new.png")
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        sdlite.save_png(tiny_image, tmp_path / "private.png")
        assert (tmp_path / "private.png").stat().st_mode & 0o777 == 0o600
        (tmp_path / "new.png").chmod(0o640)
        sdlite.save_png(tiny_image, tmp_path / "new.png", overwrite=True)
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.png", "private.png"]


def test_of_two_writers_of_one_name_exactly_one_wins(tmp_path, tiny_image):
    """Many threads save to the same name at once: one file, written whole, and every other writer refused."""
    target, results = tmp_path / "race.png", []
    barrier = threading.Barrier(8)

    def write(i):
        image = tiny_image.copy()
        image.info["parameters"] = f"writer {i}"
        barrier.wait()
        try:
            sdlite.save_png(image, target)
            results.append(i)
        except UserError as e:
            results.append(str(e))
    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, int)]
    assert len(winners) == 1 and all("exists" in r for r in results if isinstance(r, str))
    assert Image.open(target).text["parameters"] == f"writer {winners[0]}"
    assert [p.name for p in tmp_path.iterdir()] == ["race.png"]


def test_without_hard_links_the_file_is_still_created_exclusively(tmp_path, tiny_image, monkeypatch):
    """A file system without hard links (FAT, some network shares): the PNG is copied into a file created with
    O_EXCL, so an existing one is still refused and a new one still complete."""
    def no_links(source, target):
        raise OSError(1, os.strerror(1))
    monkeypatch.setattr(os, "link", no_links)
    sdlite.save_png(tiny_image, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(tiny_image))
    before = (tmp_path / "a.png").read_bytes()
    (tmp_path / "other").write_bytes(b"another run's image")
    with pytest.raises(FileExistsError):
        sdlite.image.link_exclusively(tmp_path / "other", tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == before


def test_a_full_disk_leaves_no_file(capsys, tmp_path, monkeypatch):
    """ENOSPC in the middle of the PNG: one line, no partial file, the existing file unchanged with --overwrite."""
    def full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(28, os.strerror(28))
    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "a.png"
    refused(capsys, ["txt2img", "a red circle", "--model", DEFAULT, "--steps", "1", "--out", out],
            "No space left on device", out=out)
    out.write_bytes(b"before")
    refused(capsys, ["txt2img", "a red circle", "--model", DEFAULT, "--steps", "1", "--batch-size", "2",
                     "--out", out, "--overwrite"], "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"] and out.read_bytes() == b"before"


def test_input_image_that_is_a_pipe(capsys, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    out = tmp_path / "a.png"
    refused(capsys, ["img2img", "a castle", "--model", DEFAULT, "--image", tmp_path / "pipe.png", "--out", out],
            "--image: not a regular file", out=out)


def test_input_images_too_large_or_16_bit(capsys, tmp_path, monkeypatch):
    grey16 = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16           # 0 .. 65520
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(sdlite.image.open_rgb(tmp_path / "deep.png"))
    # 16-bit levels to 8-bit ones: v / 257 rounded (65535 -> 255), the same in the three channels
    assert np.array_equal(rgb[..., 0], np.round(grey16 / 257).astype(np.uint8))
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    eight_bit_values = np.arange(64 * 64, dtype=np.int32).reshape(64, 64) % 256     # 32-bit "I" holding 0 .. 255
    assert np.array_equal(np.asarray(sdlite.image.to_rgb(Image.fromarray(eight_bit_values)))[..., 1],
                          eight_bit_values)
    out = tmp_path / "a.png"
    for limit in (100, 3000):   # 64 x 64 is over twice the limit (Pillow's error), or over it (Pillow's warning)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        refused(capsys, ["img2img", "a castle", "--model", DEFAULT, "--image", tmp_path / "deep.png", "--out", out],
                "deep.png", "too many pixels", out=out)


def test_misaligned_safetensors_are_read_as_the_library_reads_them(tmp_path):
    """The format does not require the header to be padded to 8 bytes: a header of odd length puts every tensor at
    an odd address, which cannot be viewed in place; they are copied out instead."""
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "i64": torch.arange(4), "u8": torch.arange(3,
               dtype=torch.uint8)}
    data, header, offset = b"", {}, 0
    for name, t in tensors.items():
        raw = t.numpy().tobytes()
        dtype = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    text = json.dumps(header).encode() + b"   "
    text += b" " * (1 - len(text) % 2)                                       # odd: 8 + len(text) is odd
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    reference = load_file(path)
    ours = read_safetensors(path, torch.float32)
    for name, t in tensors.items():
        assert torch.equal(reference[name], t)
        assert torch.equal(ours[name], t.float() if t.is_floating_point() else t)


# --- train -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "-0.001"], ["--lr", "above 0"]),
    (["--vae-lr", "inf"], ["--vae-lr"]),
    (["--threads", "-1"], ["--threads", "at least 1"]),
    (["--save-every", "0"], ["--save-every", "at least 1"]),
    (["--size", "7"], ["--size", "multiple of 16", "7"]),
    (["--ema-decay", "1.5"], ["--ema-decay"]),
    (["--seed", "-1"], ["--seed"]),
    (["--threads", "0"], ["--threads", "at least 1"]),
    (["--caption", "a \udcff"], ["--caption", "UTF-8"]),
    (["--epochs", "0"], ["--epochs", "above 0"]),
    (["--epochs", "inf"], ["--epochs", "inf"]),
    (["--weight-decay", "-1"], ["--weight-decay", "0 or more"]),
    (["--weight-decay", "nan"], ["--weight-decay", "nan"]),
    (["--flip"], ["--flip", "--pixel"]),
    (["--channels", "1"], ["--channels", "--pixel"]),
])
def test_train_mistakes(capsys, tmp_path, flags, words):
    out = tmp_path / "run"
    refused(capsys, ["train", "--data", "scenes", "--scenes", "4", "--out", out, *flags], *words)
    assert not out.exists()


def test_train_out_an_existing_file_or_an_impossible_folder(capsys, tmp_path):
    out = tmp_path / "model.bin"
    out.write_bytes(b"keep me")
    refused(capsys, ["train", "--data", "scenes", "--out", out], "is a file")
    assert out.read_bytes() == b"keep me"
    refused(capsys, ["train", "--data", "scenes", "--out", out / "run"], "cannot create", "Not a directory")
    model = folder_copy(tmp_path)
    refused(capsys, ["train", "--data", "scenes", "--model", model, "--out", model],
            "--out is the --model folder")


def test_train_caption_that_is_not_utf8(capsys, tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe a red square")
    refused(capsys, ["train", "--data", tmp_path, "--size", "16", "--out", tmp_path / "run"], "a.txt", "UTF-8")


@pytest.mark.parametrize("state", ["truncated", "foreign", "not torch"])
def test_a_bad_resume_state_is_named(capsys, tmp_path, state):
    out = tmp_path / "run"
    (out / "train").mkdir(parents=True)
    path = out / "train" / "vae.pt"
    if state == "foreign":
        torch.save({"step": 3, "model": {"w": torch.zeros(2)}}, path)
    elif state == "truncated":
        torch.save({"step": 3, "model": {"w": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_text("hello")
    refused(capsys, ["train", "--data", "scenes", "--scenes", "4", "--size", "16", "--vae-steps", "1",
                     "--sample-every", "0", "--out", out], "vae.pt", "delete it to start over")


# --- fuzzing: whatever the bytes, a result or a UserError -------------------------------------------------------------

def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        kind = rng.random()
        if kind < 0.4:
            data[i] = rng.randrange(256)
        elif kind < 0.7:
            del data[i:i + rng.randint(1, 8)]
        else:
            data[i:i] = rng.choice([b"[", b"]", b"{", b"}", b",", b"-1", b"1e999", b'"', b"null", b"\xff",
                                    b"99999999999999999999"])
    return bytes(data)


def random_json(rng: random.Random, depth: int = 0):
    """A random JSON value: scalars, strings, lists, objects with safetensors' keys, and near-valid tensor entries."""
    makers = [lambda: None, lambda: rng.random() < 0.5, lambda: rng.randint(-2**70, 2**70),
              lambda: rng.choice([0.5, -1e308, float("nan")]),
              lambda: "".join(chr(rng.randrange(0x20, 0x2ff)) for _ in range(rng.randrange(5))),
              lambda: {"dtype": rng.choice(["F32", "F16", "I64", "X"]), "shape": [rng.randint(-1, 3)],
                       "data_offsets": [rng.randint(-1, 8), rng.randint(0, 16)]}]
    if depth < 3:
        makers += [lambda: [random_json(rng, depth + 1) for _ in range(rng.randrange(4))],
                   lambda: {rng.choice(["dtype", "shape", "data_offsets", "a", "__metadata__"]):
                            random_json(rng, depth + 1) for _ in range(rng.randrange(4))}]
    return rng.choice(makers)()


def test_fuzzed_safetensors_headers(tmp_path):
    rng = random.Random(0)
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(3, 2), "b": torch.arange(5), "c": torch.randn(4).half()}, good)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"read": 0, "refused": 0}
    for i in range(600):
        if i % 2:
            path.write_bytes(mutate(rng, good.read_bytes()))
        else:
            header = {f"t{j}": random_json(rng) for j in range(rng.randrange(3))}
            text = json.dumps(header).encode()
            path.write_bytes(struct.pack("<Q", len(text) + rng.choice([0, 0, 0, -1, 1, 10**6])) + text + bytes(32))
        try:
            read_safetensors(path, torch.float32)
            outcomes["read"] += 1
        except UserError:
            outcomes["refused"] += 1
    assert outcomes["read"] > 0 and outcomes["refused"] > 0


def test_fuzzed_configs_and_prompts(tmp_path):
    """Mutated config.json files of the default model, then random prompts: a result or a UserError."""
    rng = random.Random(1)
    folder = folder_copy(tmp_path)
    configs = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
               "model_index.json"]
    originals = {name: (folder / name).read_bytes() for name in configs}
    for _ in range(25):
        name = rng.choice(configs)
        if rng.random() < 0.5:
            (folder / name).write_bytes(mutate(rng, originals[name]))
        else:
            config = json.loads(originals[name])
            config[rng.choice(list(config))] = random_json(rng)
            (folder / name).write_text(json.dumps(config))
        try:
            load(folder).txt2img("a red circle", steps=1, width=16, height=16)
        except UserError:
            pass
        (folder / name).write_bytes(originals[name])
    pipe = load(folder)
    for _ in range(20):
        prompt = "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0x80, 0x3000),
                                         rng.randrange(0xd800, 0xe000), 0])) for _ in range(rng.randrange(200)))
        try:
            image = pipe.txt2img(prompt, steps=1, width=16, height=16, seed=rng.randrange(2**32))[0]
            assert image.size == (16, 16)
        except UserError as e:
            assert "UTF-8" in str(e)


# --- through a real process ----------------------------------------------------------------------------------------

def run_process(*argv) -> subprocess.CompletedProcess:
    argv = [a if isinstance(a, bytes) else str(a) for a in argv]
    return subprocess.run([sys.executable, "-m", "sdlite", *argv], capture_output=True, cwd=ROOT)


def test_a_real_process_exits_2_with_one_line(tmp_path):
    out = tmp_path / "a.png"
    for argv in (["txt2img", b"bad \xff prompt", "--out", out], ["txt2img", "a", "--guidance-scale", "nan",
                                                                "--out", out]):
        result = run_process(*argv)
        err = result.stderr.decode().strip()
        assert result.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert not out.exists()


def test_ctrl_c_ends_with_one_line_and_130(tmp_path):
    """SIGINT while torch is imported (the first second), and during the loop: no traceback, no file."""
    out = tmp_path / "a.png"
    for delay in (0.4, 5.0):
        process = subprocess.Popen([sys.executable, "-m", "sdlite", "txt2img", "a red circle", "--steps", "999",
                                    "--out", str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            process.wait(delay)
        except subprocess.TimeoutExpired:
            pass
        process.send_signal(signal.SIGINT)
        err = process.communicate(timeout=10)[1]
        assert process.returncode == 130, err
        assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
        assert not out.exists()


def test_an_installed_package_finds_the_default_model(tmp_path, monkeypatch):
    """`pip install .` (not editable) puts the package in site-packages and weights/default in the data folder
    (setup.cfg's data_files); the lookup goes there when no weights/ is beside the package (checked for real with a
    venv, see the README)."""
    import sysconfig

    import sdlite.__main__ as cli
    installed = tmp_path / "prefix" / "share" / "sdlite" / "weights" / "default"
    shutil.copytree(DEFAULT, installed)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "prefix" / "lib" / "site-packages" / "sdlite" / "__main__.py"))
    monkeypatch.setattr(sysconfig, "get_path", lambda name, scheme=None: str(tmp_path / "prefix"))
    assert cli.default_model() == installed
    setup = (ROOT / "setup.cfg").read_text()
    for folder in ["", "/scheduler", "/text_encoder", "/tokenizer", "/unet", "/vae"]:
        assert f"share/sdlite/weights/default{folder} = weights/default{folder}/" in setup
