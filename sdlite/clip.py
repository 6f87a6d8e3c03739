"""CLIP's text transformer (Radford et al. 2021): 77 token ids -> the context (B, 77, D) the UNet attends to.

A stack of pre-LayerNorm transformer layers with causal self-attention, then a final LayerNorm; SD conditions on every
position's output (CLIPTextModelWithProjection's pooled, projected `text_embeds` are there for folders that hold
one). One class, two configs:
  SD 1.x  OpenAI CLIP ViT-L/14's text tower: 12 layers, 768 wide, quick_gelu.
  SD 2.x  OpenCLIP ViT-H/14's: 24 layers, 1024 wide, gelu; SD takes the output of the penultimate layer (then the
          final LayerNorm), so its config has 23 layers and the last one is never loaded.

Attribute names equal the keys of transformers' CLIPTextModel as diffusers folders store them (`text_model.` ...),
so a folder's text_encoder/ loads as it is; formats/ldm.py maps the single files' two layouts (OpenAI CLIP's and
OpenCLIP's).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import ConfigFile, show
from .errors import UserError

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation of GELU
    "gelu": F.gelu,
    # GPT-2's tanh approximation of GELU (Hendrycks & Gimpel 2016, sec. 2), as transformers writes it out
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
}
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")

# Keys that cannot change the text encoder's outputs: the file's bookkeeping (versions, model_type, the dtype it was
# saved in: the caller picks the dtype), output switches of transformers' forward, the initialisation of untrained
# weights, the ids of special tokens the tokenizer adds (the text encoder never reads them), and the labels of
# classification heads CLIP has none of.
CLIP_NO_EFFECT = {
    "transformers_version", "model_type", "dtype", "torch_dtype", "output_hidden_states", "output_attentions",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "initializer_range", "initializer_factor", "pad_token_id", "bos_token_id",
}
# The keys CLIPTextConfig.from_json reads (eos_token_id: where CLIPTextModelWithProjection pools), and those above.
CLIP_IMPLEMENTED = {
    "vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "architectures", "eos_token_id",
} | CLIP_NO_EFFECT
# Dropout acts in training only, which sdlite runs without it.
CLIP_REFUSED = {"attention_dropout": (0, 0.0), "dropout": (0, 0.0)}


@dataclass
class CLIPTextConfig:
    """Defaults are SD 1.x's (OpenAI CLIP ViT-L/14); SD 2.x's: 1024, 4096, 23 layers, 16 heads, gelu."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None   # CLIPTextModelWithProjection's: the width of text_embeds
    eos_token_id: int | None = None     # CLIPTextModelWithProjection's: where text_embeds pools (2: the highest id)

    @classmethod
    def from_json(cls, config: dict, where="text_encoder/config.json") -> "CLIPTextConfig":
        """From a transformers config.json (text_encoder/config.json); a key sdlite cannot honour, or a value of the
        wrong type, is a UserError naming it."""
        c = ConfigFile(config, where, CLIP_IMPLEMENTED, CLIP_REFUSED)
        architectures = c.list_of("architectures", ["CLIPTextModel"], str)
        if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
            raise UserError(f"{where}: architectures = {show(config['architectures'])[:60]} is not supported by "
                            f"sdlite (only {' or '.join(ARCHITECTURES)})")
        hidden_act = c.choice("hidden_act", "quick_gelu", ACTIVATIONS)
        for key in ("dtype", "torch_dtype", "pad_token_id", "bos_token_id", "eos_token_id"):
            c.optional(key, str if key.endswith("dtype") else int)
        with_projection = architectures[0] == "CLIPTextModelWithProjection"
        result = cls(
            hidden_size=c.get("hidden_size", 512, int),
            intermediate_size=c.get("intermediate_size", 2048, int),
            num_hidden_layers=c.get("num_hidden_layers", 12, int),
            num_attention_heads=c.get("num_attention_heads", 8, int),
            hidden_act=hidden_act,
            vocab_size=c.get("vocab_size", 49408, int),
            max_position_embeddings=c.get("max_position_embeddings", 77, int),
            layer_norm_eps=c.get("layer_norm_eps", 1e-5, float),
            projection_dim=c.get("projection_dim", 512, int) if with_projection else None,
            eos_token_id=c.get("eos_token_id", 49407, int) if with_projection else None,
        )
        sizes = [result.hidden_size, result.intermediate_size, result.num_hidden_layers, result.num_attention_heads,
                 result.vocab_size, result.max_position_embeddings, result.projection_dim or 1]
        if min(sizes) < 1 or result.hidden_size % result.num_attention_heads or result.layer_norm_eps <= 0:
            raise UserError(f"{where}: sizes must be positive, hidden_size ({result.hidden_size}) a multiple of "
                            f"num_attention_heads ({result.num_attention_heads}) and layer_norm_eps positive")
        return result


class CLIPEncoderLayer(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)); attention is causal: a position sees itself and those before it."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.act = ACTIVATIONS[config.hidden_act]
        self.layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.self_attn = nn.ModuleDict({name: nn.Linear(d, d) for name in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.layer_norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, config.intermediate_size),
                                  "fc2": nn.Linear(config.intermediate_size, d)})

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: (B, L, L) bool, the causal mask with some keys hidden (CLIPTextModel.forward), or None."""
        a, m = self.self_attn, self.mlp
        h = self.layer_norm1(x)
        x = x + a.out_proj(attention(a.q_proj(h), a.k_proj(h), a.v_proj(h), self.heads, causal=True, mask=mask))
        return x + m.fc2(self.act(m.fc1(self.layer_norm2(x))))


class CLIPTextModel(nn.Module):
    """ids (B, L <= 77) -> last_hidden_state (B, L, hidden_size): what the reference pipeline takes as prompt_embeds."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        # ModuleDicts only give the parameters transformers' names (text_model.embeddings.token_embedding.weight, ...).
        self.text_model = nn.ModuleDict({
            "embeddings": nn.ModuleDict({
                "token_embedding": nn.Embedding(config.vocab_size, d),
                "position_embedding": nn.Embedding(config.max_position_embeddings, d),  # learned, one per position
            }),
            "encoder": nn.ModuleDict({
                "layers": nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)),
            }),
            "final_layer_norm": nn.LayerNorm(d, eps=config.layer_norm_eps),
        })
        if config.projection_dim is not None:   # CLIPTextModelWithProjection
            self.text_projection = nn.Linear(d, config.projection_dim, bias=False)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, clip_skip: int = 1) -> torch.Tensor:
        """mask: (B, L), 0 where a token is hidden from every other token's attention (as transformers'
        attention_mask), or None. clip_skip: 1 is the last layer's output; N > 1 stops N - 1 layers earlier (A1111's
        "Clip skip"); the final LayerNorm is applied either way."""
        t = self.text_model
        x = t.embeddings.token_embedding(ids) + t.embeddings.position_embedding.weight[:ids.shape[1]]
        if mask is not None:  # keys a query may see: those before it (causal) and not hidden
            causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()
            mask = causal & mask.bool()[:, None, :]
        for layer in t.encoder.layers[:len(t.encoder.layers) - (clip_skip - 1)]:
            x = layer(x, mask)
        return t.final_layer_norm(x)

    def text_embeds(self, ids: torch.Tensor, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """CLIPTextModelWithProjection's text_embeds (B, projection_dim): the output at each prompt's end-of-text token
        (CLIP's pooled text feature, Radford et al. 2021, sec. 2.4), projected. The end is the first eos_token_id, or,
        in old configs that say eos_token_id 2, the highest id (end-of-text is the vocabulary's last token)."""
        end = ids.argmax(-1) if self.config.eos_token_id == 2 else (ids == self.config.eos_token_id).int().argmax(-1)
        return self.text_projection(last_hidden_state[torch.arange(len(ids)), end])

