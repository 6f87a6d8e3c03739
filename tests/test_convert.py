"""`sdlite convert` / sdlite.save: a model written in the layout and precision asked for, the weights cast exactly,
never half-written, never over an existing file unasked."""
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open

import sdlite
import sdlite.__main__
from sdlite.__main__ import main
from sdlite.formats import diffusers as diffusers_format
from sdlite.weights import mapping
from conftest import FIXTURES

sys.path.insert(0, str(FIXTURES))
import make_control_pipelines  # noqa: E402  (the depth model, redrawn from its seeds)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def assert_refused(code, err, *words):
    assert code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def assert_same_weights(written: sdlite.Pipeline, source: sdlite.Pipeline):
    """Same configs and, network by network, the same tensors: a cast is exact, and both sides cast the same way."""
    for name in ("text_encoder", "unet", "vae"):
        a, b = getattr(written, name), getattr(source, name)
        assert a.config == b.config, name
        a, b = a.state_dict(), b.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{name}.{key}"


def test_bf16_single_file_holds_the_cast_weights_and_loads_as_views_of_the_file(checkpoints, tmp_path, capsys):
    out = tmp_path / "sd1-bf16.safetensors"
    previous = os.umask(0o022)
    try:
        code = main(["convert", str(checkpoints / "sd1"), str(out), "--dtype", "bf16"])
    finally:
        os.umask(previous)
    printed = capsys.readouterr()
    assert code == 0 and printed.out == f"{out}\n" and printed.err == ""   # the path written, nothing else
    with safe_open(out, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert out.stat().st_mode & 0o777 == 0o644            # as any file this process creates under umask 022
    written = sdlite.load(out, dtype=torch.bfloat16)
    source = sdlite.load(checkpoints / "sd1", dtype=torch.bfloat16)   # the fp32 folder, cast at load
    written.vae.config.sample_size = source.vae.config.sample_size    # a single file's is its family's
    assert_same_weights(written, source)
    # stored in the dtype it is used in: views of the mapped file, which runtime.py packs for oneDNN; the weights
    # cast at load from the fp32 folder are copies in process memory
    assert all(mapping(w) is not None for w in written.unet.parameters())
    assert all(mapping(w) is None for w in source.unet.parameters())
    assert leftovers(tmp_path) == []


def test_single_file_to_fp16_folder(checkpoints, tmp_path, capsys):
    out = tmp_path / "sd2-fp16"
    code, _ = run(capsys, "convert", checkpoints / "sd2.safetensors", out)   # fp16: the default
    assert code == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "DDIMScheduler"
    assert_same_weights(sdlite.load(out, dtype=torch.float16),
                        sdlite.load(checkpoints / "sd2.safetensors", dtype=torch.float16))
    assert sdlite.load(out).scheduler_config["prediction_type"] == "v_prediction"   # SD 2.x single file's family


def test_inpainting_and_depth_folders_name_their_pipelines(checkpoints, tmp_path, capsys):
    code, _ = run(capsys, "convert", checkpoints / "sd1-inpaint.safetensors", tmp_path / "inpaint")
    assert code == 0
    assert json.loads((tmp_path / "inpaint" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionInpaintPipeline"
    make_control_pipelines.write_models(checkpoints, tmp_path / "models")
    depth = tmp_path / "models" / "sd2-depth"
    code, _ = run(capsys, "convert", depth, tmp_path / "depth", "--dtype", "fp32")
    assert code == 0
    index = json.loads((tmp_path / "depth" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionDepth2ImgPipeline"
    assert index["depth_estimator"] == ["transformers", "DPTForDepthEstimation"]
    for part in ("depth_estimator", "feature_extractor"):   # copied as they are
        files = sorted(p.relative_to(depth / part) for p in (depth / part).rglob("*") if p.is_file())
        assert files and all((depth / part / f).read_bytes() == (tmp_path / "depth" / part / f).read_bytes()
                             for f in files)
    converted = sdlite.load(tmp_path / "depth")
    assert converted.depth_model == tmp_path / "depth"
    assert_same_weights(converted, sdlite.load(depth))


def test_converting_a_file_onto_itself(checkpoints, tmp_path, capsys):
    """--overwrite onto the file being read: the new file is renamed over it only when complete, and the mapping
    being read keeps the old file's data until then."""
    path = tmp_path / "sd1.safetensors"
    shutil.copy(checkpoints / "sd1.safetensors", path)
    code, _ = run(capsys, "convert", path, path, "--dtype", "bf16", "--overwrite")
    assert code == 0
    with safe_open(path, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert_same_weights(sdlite.load(path, dtype=torch.bfloat16),
                        sdlite.load(checkpoints / "sd1.safetensors", dtype=torch.bfloat16))


def test_overwrite_replaces_a_model_folder_whole(checkpoints, tmp_path, capsys):
    out = tmp_path / "model"
    assert run(capsys, "convert", checkpoints / "sd1", out)[0] == 0
    (out / "unet" / "notes.txt").write_text("from the old folder")
    code, err = run(capsys, "convert", checkpoints / "sd2", out)
    assert_refused(code, err, "exists", "--overwrite")
    assert (out / "unet" / "notes.txt").exists()
    assert run(capsys, "convert", checkpoints / "sd2", out, "--overwrite")[0] == 0
    assert not (out / "unet" / "notes.txt").exists()
    assert sdlite.load(out).text_encoder.config == sdlite.load(checkpoints / "sd2").text_encoder.config
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("out, flags, words", [
    ("model.ckpt", [], ["writes .safetensors"]),
    ("missing/model.safetensors", [], ["does not exist"]),
    ("existing.safetensors", [], ["exists", "--overwrite"]),
    ("a-folder", ["--overwrite"], ["not a model folder"]),
    ("a-folder.safetensors", ["--overwrite"], ["is a folder"]),
])
def test_refused_before_anything_is_read_or_written(checkpoints, tmp_path, capsys, monkeypatch, out, flags, words):
    monkeypatch.setattr(sdlite.__main__, "load", lambda *a, **k: pytest.fail("the model was read before the check"))
    (tmp_path / "existing.safetensors").write_bytes(b"keep me")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-folder" / "mine.txt").write_text("keep me")
    (tmp_path / "a-folder.safetensors").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, err = run(capsys, "convert", checkpoints / "sd1.safetensors", tmp_path / out, *flags)
    assert_refused(code, err, *words)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "existing.safetensors").read_bytes() == b"keep me"


def test_a_model_the_single_file_layout_cannot_hold_is_refused(tmp_path, capsys):
    """The shipped default model has 4 attention heads per layer and 8 GroupNorm groups in its VAE: a single file has
    no config, and the readers would build it with the original code's 8 heads and 32 groups."""
    code, err = run(capsys, "convert", sdlite_default(), tmp_path / "tiny.safetensors")
    assert_refused(code, err, "single-file layout cannot hold", "heads", "diffusers folder")
    assert list(tmp_path.iterdir()) == []
    assert run(capsys, "convert", sdlite_default(), tmp_path / "tiny")[0] == 0   # a folder holds it


def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the old model")
    real = diffusers_format.save_file

    def write_then_interrupt(tensors, path):
        real(tensors, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(diffusers_format, "save_file", write_then_interrupt)
    code, err = run(capsys, "convert", checkpoints / "sd1.safetensors", out, "--overwrite")
    assert code == 130 and err == "interrupted"
    assert out.read_bytes() == b"the old model" and leftovers(tmp_path) == []
    code, err = run(capsys, "convert", checkpoints / "sd1.safetensors", tmp_path / "folder")
    assert code == 130 and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_loaded_embeddings_are_not_written_into_the_model(checkpoints, tmp_path):
    pipe = sdlite.load(checkpoints / "sd1")
    pipe.embeddings["<cat>"] = tmp_path / "cat.pt"   # as load_embedding records one
    with pytest.raises(sdlite.UserError, match="embeddings are loaded"):
        sdlite.save(pipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def sdlite_default():
    from sdlite.__main__ import default_model
    return default_model()
