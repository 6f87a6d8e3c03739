"""CLIP's tokenizer: prompt -> 77 token ids, byte-level BPE (Radford et al. 2021) on the `tokenizers` library.

Each prompt becomes <|startoftext|>, at most 75 BPE tokens, <|endoftext|>, then padding up to 77. SD 1.x pads with
<|endoftext|> (id 49407), SD 2.x with "!" (id 0). The pad token is also a special token, so in SD 2.x every "!" in a
prompt becomes id 0, as it does in the reference (transformers' CLIPTokenizer).

The text goes through the steps of transformers' CLIPTokenizer: NFC, runs of whitespace to one space, lowercase;
CLIP's split into words (contractions, runs of letters, single digits, runs of other symbols); GPT-2's byte-to-
character alphabet; BPE with "</w>" marking the end of a word. (OpenAI's own tokenizer also runs ftfy and
html.unescape; the reference does not, and neither does this.)
"""
import gzip
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from .errors import UserError
from .formats.families import SD1

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
VENDORED_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
WORD_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_alphabet() -> list[str]:
    """GPT-2's 256 characters standing for the 256 byte values, in OpenAI's order: printable Latin-1 bytes as
    themselves, then the other bytes (controls, space, ...) as chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def vendored_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges as OpenAI's simple_tokenizer builds them from the vendored merges file: the 256
    byte characters, the same with "</w>", one token per merge (the first 49152 - 256 - 2), then BOS and EOS."""
    with gzip.open(VENDORED_BPE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # line 0 is a version header
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Backend:
    """A `tokenizers` pipeline with CLIP's normalisation, word split and BPE (no special tokens yet)."""
    tok = Backend(BPE(vocab, merges, unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>",
                      fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    return tok


def special_token(value) -> AddedToken:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string, or a dict whose
    "normalized" says whether it also matches after lowercasing (SD's files say so for BOS and EOS)."""
    if isinstance(value, dict):
        return AddedToken(value["content"], normalized=value.get("normalized", False), special=True)
    return AddedToken(value, normalized=False, special=True)


def read_specials(path: Path, names) -> dict:
    """The special tokens among `names` that a tokenizer_config.json or special_tokens_map.json states."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: must be a JSON object")
    specials = {k: v for k, v in config.items() if k in names}
    for key, value in specials.items():
        if not (isinstance(value, str) or isinstance(value, dict) and isinstance(value.get("content"), str)):
            raise UserError(f"{path}: {key} must be a token (a string, or an object with its content), "
                            f"not {json.dumps(value)[:40]}: sdlite pads every prompt to {MAX_LENGTH} tokens")
    return specials


# What the tokenizer folders of SD 1.x and 2.x say about their special tokens (the pad token aside).
SD_SPECIAL_TOKENS = {"bos_token": {"content": BOS, "normalized": True},
                     "eos_token": {"content": EOS, "normalized": True}}


class Tokenizer:
    """Prompts -> LongTensor (B, 77). Build it with `from_folder` (a diffusers tokenizer/ folder) or
    `from_vendored` (the merges file shipped in sdlite/data), then call it on a list of prompts."""

    def __init__(self, backend: Backend, specials: dict, max_length: int = MAX_LENGTH, where="the tokenizer"):
        """`specials` maps "bos_token", "eos_token" and "pad_token" to strings or dicts, as the folders' json files."""
        self.backend = backend
        self.backend.no_truncation()  # a tokenizer.json may carry its own; ours are applied in __call__
        self.backend.no_padding()
        tokens = {name: special_token(specials[name]) for name in ("bos_token", "eos_token", "pad_token")}
        known = {t.content for t in backend.get_added_tokens_decoder().values()}  # a tokenizer.json's stay as they are
        vocabulary = backend.get_vocab()
        for name, token in tokens.items():   # one the vocabulary lacks would get an id the text encoder has no row for
            if token.content not in vocabulary and token.content not in known:
                raise UserError(f"{where}: {name} {token.content!r} is not in the vocabulary")
        self.backend.add_special_tokens([t for t in tokens.values() if t.content not in known])
        self.bos_id, self.eos_id, self.pad_id = (self.backend.token_to_id(t.content) for t in tokens.values())
        self.max_length = max_length
        self.expansions: dict[int, list[int]] = {}  # a multi-vector embedding's token -> its tokens (embeddings.py)

    @classmethod
    def from_vendored(cls, pad_id: int = SD1.pad_id) -> "Tokenizer":
        """pad_id: the family's (formats/families.py): 49407 ("<|endoftext|>") for SD 1.x, 0 ("!") for SD 2.x."""
        vocab, merges = vendored_vocab()
        pad_token = next(token for token, i in vocab.items() if i == pad_id)
        return cls(clip_backend(vocab, merges), {**SD_SPECIAL_TOKENS, "pad_token": pad_token})

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """A diffusers tokenizer/ folder: tokenizer.json, or vocab.json + merges.txt; the special tokens come from
        tokenizer_config.json and special_tokens_map.json (the latter wins, as in transformers)."""
        folder = Path(folder)
        specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}   # CLIPTokenizer's defaults
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).exists():
                specials.update(read_specials(folder / name, specials))
        try:
            if (folder / "tokenizer.json").exists():
                backend = Backend.from_file(str(folder / "tokenizer.json"))
            else:
                backend = clip_backend(*BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        except Exception as e:   # the tokenizers library's errors: missing files, malformed JSON, a broken merges.txt
            raise UserError(f"{folder}: not a readable tokenizer folder ({str(e).splitlines()[0][:120]})") from None
        return cls(backend, specials, where=folder)

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """New words matched whole in prompts, before BPE (as transformers' add_tokens): their ids, numbered on from
        the vocabulary's. The first one stands for all of them in a prompt (a multi-vector embedding's)."""
        self.backend.add_tokens([AddedToken(t, normalized=True) for t in tokens])
        ids = [self.backend.token_to_id(t) for t in tokens]
        if len(ids) > 1:
            self.expansions[ids[0]] = ids
        return ids

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        """-> LongTensor (B, max_length): BOS, the prompt's tokens cut to max_length - 2, EOS, padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, tokens in zip(ids, self.tokens(prompts)):
            tokens = [self.bos_id, *tokens[:self.max_length - 2], self.eos_id]
            row[:len(tokens)] = torch.tensor(tokens)
        return ids

    def tokens(self, texts: list[str]) -> list[list[int]]:
        """Each text's BPE token ids, a multi-vector embedding's token expanded to all of its tokens, without start,
        end or padding tokens and not cut to any length."""
        return [[i for token in encoding.ids for i in self.expansions.get(token, (token,))]
                for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False)]
