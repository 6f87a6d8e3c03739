"""sdlite's tokenizer against transformers' CLIPTokenizer (fixtures by tests/fixtures/make_text.py)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from sdlite import UserError
from sdlite.formats.families import SD1, SD2
from sdlite.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "tokenizer_ids.json").read_text(encoding="utf-8"))
PROMPTS = REFERENCE["prompts"]


def reference(name: str) -> torch.Tensor:
    return torch.tensor(REFERENCE["ids"][name])


def test_known_ids():
    ids = Tokenizer.from_vendored()(["a photograph of an astronaut riding a horse"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert (ids[0, 10:] == 49407).all()


# The vendored tokenizer follows the SD Hub folders (the _legacy ones); sd1/ and sd2/, written by transformers 5,
# differ from them only where an upper-case "<|STARTOFTEXT|>" in a prompt is or is not taken as the special token.
@pytest.mark.parametrize("pad_id, name", [(SD1.pad_id, "sd1_legacy"), (SD2.pad_id, "sd2_legacy")])
def test_vendored_matches_reference(pad_id, name):
    assert torch.equal(Tokenizer.from_vendored(pad_id)(PROMPTS), reference(name))


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1_legacy", "sd2_legacy"])
def test_folder_matches_reference(folders, name):
    tokenizer = Tokenizer.from_folder(folders / name)
    assert tokenizer.pad_id == (SD2.pad_id if name.startswith("sd2") else SD1.pad_id)
    assert torch.equal(tokenizer(PROMPTS), reference(name))


def test_truncation_and_padding():
    tokenizer = Tokenizer.from_vendored(SD2.pad_id)
    ids = tokenizer(["a " * 100, "a", ""])
    assert ids.shape == (3, 77)
    assert ids[0, 0] == 49406 and (ids[0, 1:76] == 320).all() and ids[0, 76] == 49407
    assert ids[1, :3].tolist() == [49406, 320, 49407] and (ids[1, 3:] == 0).all()
    assert ids[2, :2].tolist() == [49406, 49407] and (ids[2, 2:] == 0).all()
    assert torch.equal(tokenizer("a"), ids[1:2])  # one string is a batch of one


def test_tokenizer_json_keeps_its_special_tokens(folders, tmp_path):
    """A config that calls BOS normalized does not change the tokenizer.json's own entry (as in transformers)."""
    folder = tmp_path / "sd1"
    folder.mkdir()
    for f in (folders / "sd1").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|startoftext|>", "normalized": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert torch.equal(Tokenizer.from_folder(folder)(PROMPTS), reference("sd1"))


@pytest.mark.parametrize("name", sorted(REFERENCE["pad_ids"]))
def test_pad_token_as_the_folder_states_it(folders, name):
    """make_text.PAD_VARIANTS: special_tokens_map.json's pad_token over tokenizer_config.json's, the default
    <|endoftext|> when neither states one, the dict form, and an ordinary word as the pad token."""
    tokenizer = Tokenizer.from_folder(folders / name)
    assert tokenizer.pad_id == REFERENCE["pad_ids"][name]
    assert torch.equal(tokenizer(PROMPTS), reference(name))


@pytest.mark.parametrize("file, value, named", [
    ("special_tokens_map.json", None, "pad_token must be a token"),
    ("tokenizer_config.json", 5, "pad_token must be a token"),
    ("tokenizer_config.json", {"content": None}, "pad_token must be a token"),
    ("special_tokens_map.json", "<pad>", "pad_token '<pad>' is not in the vocabulary"),
    ("tokenizer_config.json", "{not json", "not valid JSON"),
])
def test_pad_token_mistakes_are_one_line(folders, tmp_path, file, value, named):
    folder = tmp_path / "tokenizer"
    shutil.copytree(folders / "sd1_legacy", folder)
    path = folder / file
    if value == "{not json":
        path.write_text(value)
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), "pad_token": value}))
    with pytest.raises(UserError) as e:
        Tokenizer.from_folder(folder)
    assert "\n" not in str(e.value) and named in str(e.value) and str(folder) in str(e.value)


def test_unreadable_tokenizer_folder_is_one_line(folders, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(folders / "sd1", folder)
    (folder / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(UserError, match="not a readable tokenizer folder"):
        Tokenizer.from_folder(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="not a readable tokenizer folder"):
        Tokenizer.from_folder(folder)   # neither tokenizer.json nor vocab.json + merges.txt
