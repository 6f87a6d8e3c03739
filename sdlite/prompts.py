"""Prompts as SD users write them: weighted words, prompts longer than 75 tokens, clip skip.

Three syntaxes turn a prompt into the context (1, 77*k, D) the UNet attends to:

  plain   the prompt as it is: one 77-token window, cut after 75 tokens (diffusers' StableDiffusionPipeline).
  a1111   AUTOMATIC1111's: `(word)` x1.1, `((word))` x1.21, `[word]` /1.1, `(word:1.3)`, nesting, `\\(` for a literal
          bracket, `BREAK` to start a new chunk. The prompt is cut into chunks of 75 tokens (a boundary moves back to
          just after the last comma when one lies within the last 20 tokens), each chunk encoded on its own between
          its start and end tokens, the contexts concatenated. A token's weight multiplies its row of the encoder's
          output, then the chunk is rescaled so its mean is the unweighted mean (A1111's emphasis "Original").
  compel  compel's: `word+` x1.1 and `word-` x0.9 per sign (`++` x1.21), `(several words)1.4`, `"quoted words"+`,
          `("a", "b").blend(0.7, 0.3)` (the contexts averaged with these weights), `("a", "b").and()` (concatenated).
          A weight w moves a token's output away from that of the empty prompt: e + w (z - e). A fragment with w < 1 is
          also encoded with its tokens hidden from the attention (the encoder's attention mask), and the two contexts
          are averaged with weights 1 and tan((1 - w) pi / 2), so that w -> 0 is the prompt without the fragment. One
          77-token window, as compel's default (truncate_long_prompts=True).

A plain prompt (no brackets, no `+`/`-` suffixes, at most 75 tokens) gives the very same context in all three.
"""
import math
import re
from dataclasses import dataclass

import torch

from .clip import CLIPTextModel
from .errors import UserError
from .tokenizer import Tokenizer

SYNTAXES = ("plain", "a1111", "compel")
CHUNK = 75              # prompt tokens per 77-token window (start and end tokens around them)
COMMA_BACKTRACK = 20    # A1111's comma_padding_backtrack default

# --- A1111: parsing -----------------------------------------------------------------------------------------------

A1111_TOKENS = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: the character itself
  | \\                      # a lone backslash: itself
  | \(                      # opens x1.1 (or x N when closed by ":N)")
  | \[                      # opens /1.1
  | :\s*([+-]?[.\d]+)\s*\)  # closes a "(" with an explicit weight
  | \)
  | ]
  | [^\\()\[\]:]+           # text
  | :                       # a colon that is not a weight
""", re.VERBOSE)
A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_a1111(prompt: str) -> list[tuple[str, float]]:
    """A1111's attention syntax -> (text, weight) pieces, neighbours of equal weight merged; ("BREAK", -1) marks a
    chunk break. Unclosed brackets apply to the end of the prompt; a closing bracket without its opener is text."""
    pieces: list[list] = []
    round_open, square_open = [], []   # indices into pieces where each open bracket started

    def multiply(start: int, factor: float):
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in A1111_TOKENS.finditer(prompt):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            pieces.append([text[1:], 1.0])  # (a lone backslash becomes nothing, as in A1111)
        elif text == "(":
            round_open.append(len(pieces))
        elif text == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif text == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif text == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(A1111_BREAK.split(text)):
                if i > 0:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    merged: list[list] = []
    for text, weight in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


@dataclass
class Chunks:
    """A prompt cut into 77-token windows."""
    ids: torch.Tensor       # (k, 77) start, up to 75 prompt tokens, end, padding
    weights: torch.Tensor   # (k, 77) one weight per token, 1 for the start, end and padding tokens
    token_count: int        # the prompt's tokens (BREAK padding included, as A1111 counts)


def chunk_a1111(tokenizer: Tokenizer, pieces: list[tuple[str, float]]) -> Chunks:
    """A1111's tokenize_line: pieces tokenized one by one and poured into 75-token chunks. When a chunk is full and a
    comma lies within its last COMMA_BACKTRACK tokens, what follows the comma moves to the next chunk. A chunk is
    filled up with end tokens (and, past the first end token, with the pad token: SD 2.x's differs)."""
    comma = tokenizer.backend.token_to_id(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma, count = -1, 0

    def close(last: bool = False):
        nonlocal tokens, weights, last_comma, count
        count += len(tokens) if last else CHUNK
        fill = CHUNK - len(tokens)
        ids = [tokenizer.bos_id, *tokens, tokenizer.eos_id] + [tokenizer.pad_id] * fill
        chunks.append((ids, [1.0, *weights, 1.0] + [1.0] * fill))
        tokens, weights, last_comma = [], [], -1

    for (text, weight), ids in zip(pieces, tokenizer.tokens([text for text, _ in pieces])):
        if weight == -1 and text == "BREAK":
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                moved_tokens, moved_weights = tokens[last_comma + 1:], weights[last_comma + 1:]
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                close()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close(last=True)
    return Chunks(torch.tensor([ids for ids, _ in chunks]), torch.tensor([w for _, w in chunks]), count)


def emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis "Original": z (1, 77, D) * weights (1, 77) per token, rescaled to z's own mean."""
    mean = z.mean()
    z = z * weights[..., None].to(z.dtype)
    return z * (mean / z.mean())


# --- compel: parsing ----------------------------------------------------------------------------------------------

COMPEL_STRUCTURE = re.compile(r"""\s*\((?P<args>.*)\)\s*\.(?P<op>blend|and)\((?P<weights>[^()]*)\)\s*""", re.S)
COMPEL_QUOTED = re.compile(r'"((?:\\.|[^"\\])*)"')
COMPEL_SYNTAX = r'()",.+\-='   # compel's syntactic characters: not part of a word unless escaped with a backslash
COMPEL_TOKENS = re.compile(rf"""
    (?P<open>\()
  | \)(?P<group_weight>\++|-+|[0-9]*\.?[0-9]+)?
  | "(?P<quoted>(?:\\.|[^"\\])*)"(?P<quoted_weight>\++|-+|[0-9]*\.?[0-9]+)?
  | (?P<word>(?:\\[{COMPEL_SYNTAX}]|[+-](?![\s{COMPEL_SYNTAX}]|$)|[^\s{COMPEL_SYNTAX}])+)(?P<word_weight>\++|-+)?
  | (?P<other>[{COMPEL_SYNTAX}])   # punctuation, a stray sign: text of weight 1
  | \s+
""", re.VERBOSE)


@dataclass
class CompelPrompt:
    """What a compel prompt asks for: one or more fragment lists, combined by `op` with `weights`."""
    prompts: list[list[tuple[str, float]]]
    op: str = "single"          # "single", "blend" or "and"
    weights: tuple[float, ...] = (1.0,)


def signs(suffix: str) -> float:
    """compel's weight suffixes: each + multiplies by 1.1, each - by 0.9; or a number."""
    if suffix.startswith("+"):
        return 1.1 ** len(suffix)
    if suffix.startswith("-"):
        return 0.9 ** len(suffix)
    return float(suffix)


def parse_compel(prompt: str) -> CompelPrompt:
    """compel's syntax -> CompelPrompt; `.blend(...)` and `.and(...)` take quoted prompts, each parsed alone."""
    m = COMPEL_STRUCTURE.fullmatch(prompt)
    if m:
        prompts = [compel_fragments(text.replace('\\"', '"')) for text in COMPEL_QUOTED.findall(m["args"])]
        numbers = [float(w) for w in m["weights"].replace(",", " ").split()]
        weights = tuple(numbers) if numbers else (1.0,) * len(prompts)
        if len(weights) != len(prompts):
            raise UserError(f"compel prompt: .{m['op']}() has {len(prompts)} prompts but {len(weights)} weights")
        return CompelPrompt(prompts, m["op"], weights)
    return CompelPrompt([compel_fragments(prompt)])


def compel_fragments(prompt: str) -> list[tuple[str, float]]:
    """Words, quoted strings and parenthesised groups with their weight suffixes -> (text, weight) fragments; words of
    one weight in a row are one fragment, as compel makes them. Commas, periods and compel's other syntax characters
    end a word; escaped with a backslash they are part of it; brackets that do not pair up are text."""
    words: list[tuple[str, float]] = []
    group_starts: list[int] = []
    for m in COMPEL_TOKENS.finditer(prompt):
        if m["open"]:
            group_starts.append(len(words))
        elif m.group(0).startswith(")"):
            if not group_starts:      # a closing bracket without its opener is text, as in compel
                words.append((m.group(0), 1.0))
                continue
            start = group_starts.pop()
            factor = signs(m["group_weight"]) if m["group_weight"] else 1.0
            words[start:] = [(w, weight * factor) for w, weight in words[start:]]
        elif m["quoted"] is not None:
            factor = signs(m["quoted_weight"]) if m["quoted_weight"] else 1.0
            words += [(w, factor) for w in m["quoted"].split()]
        elif m["word"]:
            words.append((m["word"], signs(m["word_weight"]) if m["word_weight"] else 1.0))
        elif m["other"]:
            words.append((m["other"], 1.0))
    for start in reversed(group_starts):   # an opening bracket never closed is text too
        words.insert(start, ("(", 1.0))
    fragments: list[tuple[str, float]] = []
    for word, weight in words:
        if fragments and fragments[-1][1] == weight:
            text = fragments[-1][0]
            space = "" if word[0] in ",.)" or text.endswith("(") else " "   # as the prompt spells it (the tokens
            fragments[-1] = (text + space + word, weight)                     # are the same either way)
        else:
            fragments.append((word, weight))
    return fragments


# --- encoding -----------------------------------------------------------------------------------------------------

class PromptEncoder:
    """Prompts -> contexts with one tokenizer, text encoder, syntax and clip skip (1: the last layer's output,
    2: the penultimate layer's, final LayerNorm applied, ...)."""

    def __init__(self, tokenizer: Tokenizer, text_encoder: CLIPTextModel, syntax: str = "plain", clip_skip: int = 1):
        if syntax not in SYNTAXES:
            raise UserError(f"unknown prompt syntax {syntax!r}: choose one of {', '.join(SYNTAXES)}")
        layers = text_encoder.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise UserError(f"clip skip must be between 1 and {layers} (this text encoder's layers), not {clip_skip}")
        self.tokenizer, self.text_encoder, self.syntax, self.clip_skip = tokenizer, text_encoder, syntax, clip_skip
        self.device = text_encoder.text_model.embeddings.token_embedding.weight.device

    def run(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(1, 77) ids -> (1, 77, D)."""
        mask = None if mask is None else mask.to(self.device)
        return self.text_encoder(ids.to(self.device), mask=mask, clip_skip=self.clip_skip)

    def __call__(self, prompt: str) -> torch.Tensor:
        """One prompt -> (1, 77*k, D)."""
        if self.syntax == "plain":
            return self.run(self.tokenizer([prompt]))
        if self.syntax == "a1111":
            chunks = chunk_a1111(self.tokenizer, parse_a1111(prompt))
            return torch.cat([emphasis(self.run(ids[None]), weights[None].to(self.device))
                              for ids, weights in zip(chunks.ids, chunks.weights)], dim=1)
        return self.compel(parse_compel(prompt))

    def contexts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's context, the shorter ones padded with the empty prompt's context to the longest's 77*k."""
        contexts = [self(p) for p in prompts]
        longest = max(c.shape[1] for c in contexts)
        if any(c.shape[1] < longest for c in contexts):
            empty = self("")
            contexts = [torch.cat([c, *[empty] * ((longest - c.shape[1]) // empty.shape[1])], dim=1)
                        for c in contexts]
        return contexts

    # compel

    def compel(self, prompt: CompelPrompt) -> torch.Tensor:
        contexts = [self.compel_fragments(fragments) for fragments in prompt.prompts]
        if prompt.op == "blend":  # a weighted average, the weights normalised to sum 1
            weights = torch.tensor(prompt.weights, dtype=contexts[0].dtype, device=self.device)
            weights = weights / weights.sum()
            return (torch.stack(contexts, dim=1) * weights[:, None, None]).sum(dim=1)
        if any(w != 1 for w in prompt.weights):
            empty = self.compel_fragments([])
            contexts = [c if w == 1 else empty + (c - empty) * w for c, w in zip(contexts, prompt.weights)]
        return torch.cat(contexts, dim=1)

    def compel_fragments(self, fragments: list[tuple[str, float]]) -> torch.Tensor:
        """compel's get_embeddings_for_weighted_prompt_fragments for one window (truncate_long_prompts=True)."""
        fragments = fragments or [("", 1.0)]
        ids, weights, spans = [], [], []
        for (_, weight), tokens in zip(fragments, self.tokenizer.tokens([text for text, _ in fragments])):
            start = 1 + len(ids)                       # after the start token
            spans.append((start, min(start + len(tokens) - 1, CHUNK + 1)) if start < CHUNK + 1 else None)
            ids += tokens
            weights += [float(weight)] * len(tokens)
        ids, weights = ids[:CHUNK], weights[:CHUNK]
        fill = CHUNK - len(ids)
        ids = torch.tensor([[self.tokenizer.bos_id, *ids, self.tokenizer.eos_id] + [self.tokenizer.pad_id] * fill])
        weights = torch.tensor([[1.0, *weights, 1.0] + [1.0] * fill], device=self.device)
        mask = torch.ones_like(ids)

        contexts = [self.compel_weighted(ids, weights, mask)]
        lerp_weights = [1.0]
        for (_, weight), span in zip(fragments, spans):
            if weight < 1 and span is not None:
                hidden = mask.clone()
                hidden[0, span[0]:span[1] + 1] = 0
                contexts.append(self.compel_weighted(ids, weights, hidden))
                lerp_weights.append(math.tan((1 - max(weight, 1e-5)) * math.pi / 2))
        if len(contexts) == 1:
            return contexts[0]
        lerp = torch.tensor(lerp_weights, dtype=contexts[0].dtype, device=self.device)
        lerp = lerp / lerp.sum()
        return (torch.stack(contexts, dim=1) * lerp[:, None, None]).sum(dim=1)

    def compel_weighted(self, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """compel's build_weighted_embedding_tensor: e + w (z - e) where w != 1, e the empty prompt's output."""
        z = self.run(ids, mask)
        if bool((weights == 1).all()):
            return z
        empty = self.run(self.tokenizer([""]))
        w = weights[..., None].expand(z.shape).to(z.dtype)
        return torch.where(w == 1, z, empty + (z - empty) * w)


def encode_prompts(tokenizer: Tokenizer, text_encoder: CLIPTextModel, prompt: str, negative_prompt: str | None,
                   batch_size: int, syntax: str = "plain", clip_skip: int = 1) -> torch.Tensor:
    """The UNet's context: (2B, 77*k, D), B copies of the negative prompt's context then B of the prompt's, or
    (B, 77*k, D) when negative_prompt is None (no guidance). One text-encoder call per prompt and window, as the
    reference makes them."""
    prompts = [negative_prompt, prompt] if negative_prompt is not None else [prompt]
    contexts = PromptEncoder(tokenizer, text_encoder, syntax, clip_skip).contexts(prompts)
    return torch.cat([c.repeat(batch_size, 1, 1) for c in contexts])


def windows(tokenizer: Tokenizer, prompt: str, syntax: str) -> tuple[torch.Tensor, int, int]:
    """The 77-token windows a prompt is encoded in (k, 77), its token count (A1111's count for a1111) and how many of
    its tokens are cut off (plain and compel keep 75 per prompt; compel's .blend and .and prompts each have theirs)."""
    if syntax == "a1111":
        chunks = chunk_a1111(tokenizer, parse_a1111(prompt))
        return chunks.ids, chunks.token_count, 0
    parts = [[text for text, _ in fragments] for fragments in parse_compel(prompt).prompts] \
        if syntax == "compel" else [[prompt]]
    counts = [sum(len(t) for t in tokenizer.tokens(texts)) for texts in parts]
    return tokenizer([" ".join(texts) for texts in parts]), sum(counts), sum(max(0, n - CHUNK) for n in counts)


def describe(tokenizer: Tokenizer, prompt: str, syntax: str) -> str:
    """What --show-tokens prints: the prompt's token count and how it is cut into 77-token windows."""
    ids, count, dropped = windows(tokenizer, prompt, syntax)
    lines = [f"{count} tokens, {len(ids)} chunk{'s' * (len(ids) > 1)} of 75 ({syntax} syntax)"
             + (f"; {dropped} tokens past the 75th are dropped" if dropped else "")]
    for i, row in enumerate(ids):
        inner = [t for t in row.tolist()[1:] if t not in (tokenizer.eos_id, tokenizer.pad_id)]
        words = " ".join(tokenizer.backend.id_to_token(t).removesuffix("</w>") for t in inner)  # one per token
        lines.append(f"  chunk {i + 1}: {len(inner)} tokens: {words}")
    return "\n".join(lines)
