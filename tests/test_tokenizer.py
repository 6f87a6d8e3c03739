"""sdlite's tokenizer against transformers' CLIPTokenizer (fixtures by tests/fixtures/make_text.py)."""
import json
from pathlib import Path

import pytest
import torch

from sdlite.tokenizer import SD1_PAD_ID, SD2_PAD_ID, Tokenizer

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
@pytest.mark.parametrize("pad_id, name", [(SD1_PAD_ID, "sd1_legacy"), (SD2_PAD_ID, "sd2_legacy")])
def test_vendored_matches_reference(pad_id, name):
    assert torch.equal(Tokenizer.from_vendored(pad_id)(PROMPTS), reference(name))


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1_legacy", "sd2_legacy"])
def test_folder_matches_reference(folders, name):
    tokenizer = Tokenizer.from_folder(folders / name)
    assert tokenizer.pad_id == (SD2_PAD_ID if name.startswith("sd2") else SD1_PAD_ID)
    assert torch.equal(tokenizer(PROMPTS), reference(name))


def test_truncation_and_padding():
    tokenizer = Tokenizer.from_vendored(SD2_PAD_ID)
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
