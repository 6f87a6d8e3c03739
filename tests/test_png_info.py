"""PNG info: the "parameters" text sdlite writes, read back by the rules of AUTOMATIC1111's "PNG Info"
(modules/infotext_utils.py, parse_generation_parameters), re-implemented here from its published code: the last line
holds the `key: value` pairs when the pair pattern finds at least 3 in it; lines before it are the prompt up to a line
that starts with "Negative prompt:"; a value in double quotes is JSON; `WxH` values become key-1 / key-2; a missing
"Clip skip" means 1 and a missing "Schedule type" means "Automatic"."""
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

import sdlite
from sdlite.__main__ import main
from sdlite.image import generation_parameters, model_hash

from conftest import FIXTURES

PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_parse(text: str) -> dict:
    """parse_generation_parameters, without its UI settings (styles, hires fix)."""
    res = {}
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, done_with_prompt = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for key, value in PAIR.findall(last):
        if value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = IMAGE_SIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    res.setdefault("Clip skip", "1")
    res.setdefault("Schedule type", "Automatic")
    return res


PROMPTS = [
    ("a castle, (on a hill:1.2), [fog]", "blurry, lowres"),
    ("time: 5pm, ratio 16:9, \"quoted\" words and 'single' ones", "text: watermark, \"signature\""),
    ("first line\nsecond line, with a comma\nthird: colon", "bad\nworse"),
    ("日本の城、桜, 夕焼け：美しい", "低品質, ぼやけた"),
    ("Steps: 3, Sampler: fake, Seed: 1", ""),   # looks like a pairs line, but it is the prompt
]


@pytest.mark.parametrize("prompt, negative", PROMPTS)
def test_fields_read_back(prompt, negative):
    fields = {"Steps": 20, "Sampler": "dpmpp_2m_karras", "CFG scale": 7.5, "Seed": 123456789, "Size": "56x40",
              "Model hash": "0123456789", "Model": "my model, v2: final", "Denoising strength": 0.6, "Clip skip": 2}
    got = a1111_parse(generation_parameters(prompt, negative, fields))
    assert got["Prompt"] == prompt and got["Negative prompt"] == negative
    assert (got["Steps"], got["Sampler"], got["Schedule type"], got["CFG scale"], got["Seed"]) == \
        ("20", "DPM++ 2M", "Karras", "7.5", "123456789")
    assert (got["Size-1"], got["Size-2"], got["Model hash"], got["Model"]) == \
        ("56", "40", "0123456789", "my model, v2: final")
    assert (got["Denoising strength"], got["Clip skip"]) == ("0.6", "2")


@pytest.mark.parametrize("scheduler, sampler, schedule", [
    ("dpmpp_2m", "DPM++ 2M", "Uniform"), ("dpmpp_2m_karras", "DPM++ 2M", "Karras"), ("euler", "Euler", "Uniform"),
    ("euler_a", "Euler a", "Uniform"), ("lms", "LMS", "Uniform"), ("ddim", "DDIM", "Automatic"),
    ("pndm", "PLMS", "Automatic"), ("unipc", "UniPC", "Automatic"), ("ddpm", "DDPM", "Automatic"),
])
def test_sampler_and_schedule_type(scheduler, sampler, schedule):
    got = a1111_parse(generation_parameters("a cat", "", {"Steps": 5, "Sampler": scheduler, "CFG scale": 7,
                                                          "Seed": 1, "Clip skip": None}))
    assert (got["Sampler"], got["Schedule type"], got["Clip skip"]) == (sampler, schedule, "1")


def test_pipeline_png_reads_back(checkpoints, tmp_path):
    """End to end: generated, saved, opened, parsed; the hash is of the checkpoint file."""
    pipe = sdlite.load(checkpoints / "sd1.safetensors")
    prompt, negative = "a (red:1.2) castle, on a hill: at dusk\n城", "blurry, \"bad\""
    image = pipe.txt2img(prompt, negative_prompt=negative, steps=2, guidance_scale=6.5, width=32, height=24,
                         seed=77, scheduler="dpmpp_2m_karras", prompt_syntax="a1111", clip_skip=2)[0]
    sdlite.save_png(image, tmp_path / "a.png")
    got = a1111_parse(Image.open(tmp_path / "a.png").text["parameters"])
    digest = hashlib.sha256((checkpoints / "sd1.safetensors").read_bytes()).hexdigest()
    assert (got["Prompt"], got["Negative prompt"]) == (prompt, negative)
    assert (got["Steps"], got["Sampler"], got["Schedule type"], got["CFG scale"], got["Seed"]) == \
        ("2", "DPM++ 2M", "Karras", "6.5", "77")
    assert (got["Size-1"], got["Size-2"], got["Model hash"], got["Model"], got["Clip skip"]) == \
        ("32", "24", digest[:10], "sd1", "2")


def test_negative_prompt_unused_at_guidance_1_is_not_written(checkpoints):
    pipe = sdlite.load(checkpoints / "sd1")
    image = pipe.txt2img("a castle", negative_prompt="blurry", guidance_scale=1.0, steps=1, width=32, height=32,
                         seed=1, scheduler="ddim")[0]
    assert "Negative prompt" not in image.info["parameters"]
    assert a1111_parse(image.info["parameters"])["Negative prompt"] == ""


def test_model_hash_is_cached_by_size_and_mtime(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    first = model_hash(weights)
    assert first == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    cache_file = Path(os.environ["XDG_CACHE_HOME"]) / "sdlite" / "model-hashes.json"   # conftest's temporary cache
    cache = json.loads(cache_file.read_text())
    entry = cache[str(weights.resolve())]
    entry["sha256"] = "f" * 64               # the cache is what answers while size and mtime are unchanged
    cache_file.write_text(json.dumps(cache))
    assert model_hash(weights) == "f" * 10
    weights.write_bytes(b"other weights" * 1000)   # changed: hashed again
    assert model_hash(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]
    assert model_hash(None) is None
    weights.unlink()                              # gone since it was loaded: no hash, no error
    assert model_hash(weights) is None


def test_typed_prompt_and_lora_and_embedding_hashes_read_back(checkpoints, tmp_path, capsys):
    """The PNG holds the prompt as typed, <lora:...> tag included, A1111's "Lora hashes" (every LoRA merged, by
    the SHA-256 of a safetensors file's data after its header, 12 digits) and "TI hashes" (the embeddings the prompts
    call, by the SHA-256 of the file, 12 digits), as A1111's parser reads them."""
    addons, out = FIXTURES / "addons", tmp_path / "a.png"
    prompt = "a <cat-toy> castle <lora:sd1-peft:0.6>"
    code = main(["txt2img", prompt, "--model", str(checkpoints / "sd1"), "--steps", "1", "--width", "32",
                 "--height", "24", "--seed", "1", "--embedding", str(addons / "learned_embeds.safetensors"),
                 "--embedding", str(addons / "glass-style.pt"), "--lora", f"{addons / 'sd1-kohya.safetensors'}:0.8",
                 "--lora-dir", str(addons), "--out", str(out)])
    assert code == 0, capsys.readouterr().err

    def data_hash(path: Path) -> str:
        data = path.read_bytes()
        return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    got = a1111_parse(Image.open(out).text["parameters"])
    assert got["Prompt"] == prompt
    assert got["Lora hashes"] == (f"sd1-kohya: {data_hash(addons / 'sd1-kohya.safetensors')}, "
                                  f"sd1-peft: {data_hash(addons / 'sd1-peft.safetensors')}")
    embedding = hashlib.sha256((addons / "learned_embeds.safetensors").read_bytes()).hexdigest()[:12]
    assert got["TI hashes"] == f"<cat-toy>: {embedding}"     # glass-style is loaded but not called: not listed
