"""Textual-inversion embeddings (Gal et al. 2022): a new word for the text encoder, learned as one or more vectors of
its token-embedding table, while the rest of the model stays frozen.

The files the model sites ship, as (n, D) vectors, D the text encoder's width (768 for SD 1.x, 1024 for SD 2.x):
  A1111 .pt           a torch pickle {"string_to_param": {"*": (n, D)}, "name", "step", "sd_checkpoint", ...}
  A1111 .safetensors  {"emb_params": (n, D)}
  diffusers           learned_embeds.safetensors / .bin: {token: (D,) or (n, D)}
A pickle is opened only by torch's weights-only loader, which builds tensors and plain containers (dicts, strings,
numbers) and refuses anything else: a file cannot run code.

The token is the A1111 file's stem (A1111 calls an embedding by its file name) or the diffusers file's stored key,
unless the caller names one. Loading adds the token (and `tok_1` ... `tok_{n-1}` for n vectors, as diffusers names
them) to the tokenizer, and the vectors as rows after the text encoder's embedding table; a prompt's `tok` stands for
all n tokens. The tokens are matched as transformers' added tokens are, after lowercasing (EasyNegative and
easynegative are one token), and `tok` is expanded on the ids: diffusers expands it by replacing the text, which misses
a `tok` typed in another case. The table itself, a view of the mapped checkpoint, is not copied (TokenEmbedding).
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIPTextModel
from .errors import UserError
from .tokenizer import Tokenizer
from .weights import read_file



def read_embedding(path: Path) -> tuple[str | None, torch.Tensor]:
    """(the token stored in the file or None, the vectors (n, D) in fp32)."""
    if not path.is_file():
        raise UserError(f"embedding not found: {path}")
    try:
        sd = read_file(path)
    except Exception as e:  # a pickle with code in it, a truncated file: all the user can act on is the message
        raise UserError(f"{path}: not a readable embedding file ({str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict):
        raise UserError(f"{path}: not an embedding file (holds a {type(sd).__name__}, not a dict of tensors)")
    if isinstance(sd.get("string_to_param"), dict) and "*" in sd["string_to_param"]:
        token, vectors = None, sd["string_to_param"]["*"]                   # A1111 .pt
    elif "emb_params" in sd:
        token, vectors = None, sd["emb_params"]                             # A1111 .safetensors
    elif len(sd) == 1 and isinstance(next(iter(sd.values())), torch.Tensor):
        token, vectors = next(iter(sd.items()))                             # diffusers
    else:
        keys = ", ".join(sorted(map(str, sd))[:5])
        hint = " (an SDXL embedding: SDXL is not supported)" if {"clip_l", "clip_g"} <= sd.keys() else ""
        raise UserError(f"{path}: not a textual-inversion embedding (keys {keys}){hint}")
    if not isinstance(vectors, torch.Tensor):
        raise UserError(f"{path}: the embedding holds a {type(vectors).__name__} where its vectors should be")
    vectors = vectors.detach().float()
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or len(vectors) == 0:
        raise UserError(f"{path}: the embedding's vectors have shape {tuple(vectors.shape)}, not (n, width)")
    return token, vectors


class TokenEmbedding(nn.Module):
    """The text encoder's token-embedding table with rows appended for added tokens: ids below the table's size look
    up `weight` (the same parameter and state-dict key as before, not copied), the others `added`."""

    def __init__(self, table: nn.Embedding, added: torch.Tensor):
        super().__init__()
        self.weight = table.weight
        self.register_buffer("added", added, persistent=False)  # (n, D), ids len(weight) .. len(weight) + n - 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        size = len(self.weight)
        new = ids >= size
        x = F.embedding(ids.masked_fill(new, 0), self.weight)
        if new.any():
            x[new] = self.added[ids[new] - size]
        return x


def add_embedding(tokenizer: Tokenizer, text_encoder: CLIPTextModel, path: Path, token: str | None = None) -> str:
    """Add the embedding in `path` under `token` (default: the file's, see the module's docstring); -> the token."""
    stored, vectors = read_embedding(path)
    token = token or stored or path.stem
    width = text_encoder.config.hidden_size
    if vectors.shape[1] != width:
        raise UserError(f"{path}: its vectors are {vectors.shape[1]} wide but this model's text encoder is {width} "
                        f"wide: the embedding was made for another model (768: SD 1.x, 1024: SD 2.x)")
    tokens = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
    taken = [t for t in tokens if tokenizer.backend.token_to_id(t) is not None]
    if taken:
        raise UserError(f"{path}: the token {taken[0]!r} is already in the vocabulary: choose another token")
    embeddings = text_encoder.text_model.embeddings
    table = embeddings.token_embedding
    rows = len(table.weight) + (len(table.added) if isinstance(table, TokenEmbedding) else 0)
    if tokenizer.backend.get_vocab_size(with_added_tokens=True) != rows:
        raise UserError(f"{path}: the tokenizer's vocabulary and the text encoder's embedding table differ in size "
                        f"({tokenizer.backend.get_vocab_size(with_added_tokens=True)} vs {rows}): cannot add tokens")
    tokenizer.add_tokens(tokens)                # ids rows .. rows + n - 1
    vectors = vectors.to(table.weight)
    if isinstance(table, TokenEmbedding):
        table.added = torch.cat([table.added, vectors])
    else:
        embeddings["token_embedding"] = TokenEmbedding(table, vectors)
    return token
