"""Textual-inversion embeddings as the model sites ship them (A1111 .pt / .safetensors, diffusers learned_embeds
.safetensors / .bin, multi-vector, SD 2.x) against diffusers' load_textual_inversion on the same files, from
fixtures/make_addons.py; and the files sdlite refuses."""
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdlite
from sdlite.errors import UserError
from sdlite.weights import mapping

from conftest import FIXTURES

ADDONS = FIXTURES / "addons"
with safe_open(ADDONS / "reference.safetensors", "pt") as f:
    REFERENCE = {name: f.get_tensor(name) for name in f.keys()}
    METADATA = f.metadata()
EMBEDDINGS = json.loads(METADATA["embeddings"])     # file -> (family, kind, vectors)
TOKENS = json.loads(METADATA["tokens"])             # file -> the token the reference used
PROMPTS = json.loads(METADATA["embedding_prompts"])  # family -> prompts
LAYOUTS = {"folder": "{family}", "single file": "{family}.safetensors"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_matches_diffusers_load_textual_inversion(checkpoints, family, layout):
    pipe = sdlite.load(checkpoints / LAYOUTS[layout].format(family=family))
    for name, (owner, _, _) in EMBEDDINGS.items():
        if owner == family:
            # no token given: the A1111 file's stem, or the diffusers file's stored token, as the reference was told
            assert pipe.load_embedding(ADDONS / name) == TOKENS[name]
    for i, prompt in enumerate(PROMPTS[family]):
        ids = pipe.tokenizer(prompt)
        assert torch.equal(ids, REFERENCE[f"embeddings.{family}.{i}.ids"]), prompt   # integers: exactly
        with torch.no_grad():
            context = pipe.text_encoder(ids)
        expected = REFERENCE[f"embeddings.{family}.{i}.context"]
        # the added rows are looked up exactly; what follows is the text encoder's chain, compared as test_clip does
        # (a few float32 roundings per layer, 1e-5 on outputs of order 1)
        torch.testing.assert_close(context[:, :expected.shape[1]], expected, rtol=1e-5, atol=1e-5)


def test_multi_vector_token_stands_for_all_its_vectors(checkpoints):
    pipe = sdlite.load(checkpoints / "sd1")
    pipe.load_embedding(ADDONS / "glass-style.pt")
    ids = pipe.tokenizer("glass-style")[0]
    first = pipe.tokenizer.backend.token_to_id("glass-style")
    assert ids[1:5].tolist() == [first, first + 1, first + 2, pipe.tokenizer.eos_id]
    assert torch.equal(pipe.tokenizer("Glass-Style")[0], ids)   # matched after lowercasing, as the prompt's words
    assert [pipe.tokenizer.backend.id_to_token(first + i) for i in (1, 2)] == ["glass-style_1", "glass-style_2"]
    stored = torch.load(ADDONS / "glass-style.pt", weights_only=True)["string_to_param"]["*"]
    with torch.no_grad():
        rows = pipe.text_encoder.text_model.embeddings.token_embedding(torch.arange(first, first + 3))
    assert torch.equal(rows, stored)   # a copy of the file's numbers, nothing computed


@pytest.mark.parametrize("syntax", ["a1111", "compel"])
def test_weighted_prompt_syntaxes_expand_a_multi_vector_token(checkpoints, syntax):
    """The prompt parsers tokenise their pieces themselves: the embedding's token still stands for all its vectors."""
    from sdlite import prompts
    pipe = sdlite.load(checkpoints / "sd1")
    pipe.load_embedding(ADDONS / "glass-style.pt")
    ids = prompts.windows(pipe.tokenizer, "a glass-style cat", syntax)[0]
    assert torch.equal(ids, pipe.tokenizer("a glass-style cat"))


def test_token_table_is_not_copied(checkpoints):
    """The checkpoint's table stays the mapped file's bytes: the new rows live beside it."""
    pipe = sdlite.load(checkpoints / "sd1")
    table = pipe.text_encoder.text_model.embeddings.token_embedding.weight
    pipe.load_embedding(ADDONS / "inkwash.safetensors", token="<ink>")
    assert pipe.text_encoder.text_model.embeddings.token_embedding.weight is table
    assert mapping(table) is not None
    assert "text_model.embeddings.token_embedding.weight" in pipe.text_encoder.state_dict()


def test_token_given_by_caller(checkpoints):
    pipe = sdlite.load(checkpoints / "sd1")
    assert pipe.load_embedding(ADDONS / "learned_embeds.safetensors", token="<toy>") == "<toy>"
    assert pipe.tokenizer("a <toy>")[0, 2] == pipe.tokenizer.backend.token_to_id("<toy>")


def assert_unchanged(pipe, vocabulary: int, table):
    assert pipe.tokenizer.backend.get_vocab_size(with_added_tokens=True) == vocabulary
    assert pipe.text_encoder.text_model.embeddings.token_embedding is table


@pytest.fixture
def sd1(checkpoints):
    pipe = sdlite.load(checkpoints / "sd1")
    return pipe, pipe.tokenizer.backend.get_vocab_size(with_added_tokens=True), \
        pipe.text_encoder.text_model.embeddings.token_embedding


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never be printed",))


def test_a1111_file_without_vectors_is_refused(sd1, tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"string_to_param": {"*": "no vectors"}, "name": "empty"}, path)
    with pytest.raises(UserError, match="holds a str where its vectors should be"):
        sd1[0].load_embedding(path)
    assert_unchanged(*sd1)


def test_pickle_with_code_is_refused(sd1, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": RunsCode()}}, protocol=2))
    with pytest.raises(UserError, match="not a readable embedding file"):
        sd1[0].load_embedding(path)
    assert "never" not in capsys.readouterr().out
    assert_unchanged(*sd1)


@pytest.mark.parametrize("name, content, message", [
    ("sd2-style", {"emb_params": torch.ones(2, 1024)}, "1024 wide but this model's text encoder is 128 wide"),
    ("castle", {"emb_params": torch.ones(1, 128)}, "'castle' is already in the vocabulary"),
    ("other", {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, "SDXL"),
    ("other", {"a": torch.ones(1, 128), "b": torch.ones(1, 128)}, "not a textual-inversion embedding"),
    ("other", {"emb_params": torch.ones(2, 3, 128)}, r"shape \(2, 3, 128\)"),
])
def test_files_that_do_not_fit_are_refused(sd1, tmp_path, name, content, message):
    path = tmp_path / f"{name}.safetensors"
    save_file(content, path)
    with pytest.raises(UserError, match=message):
        sd1[0].load_embedding(path)
    assert_unchanged(*sd1)
