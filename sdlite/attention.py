"""The one attention function that the text encoder, the UNet and the VAE share.

Scaled dot-product attention (Vaswani et al. 2017, eq. 1): softmax(Q K^T / sqrt(d)) V, computed per head.
"""
import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              causal: bool = False, upcast: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, N, C), k and v: (B, M, C) -> (B, N, C), with C split into `heads` heads.

    `mask` (B, N, M) bool, True where a query may attend to a key, replaces `causal` when given.
    `upcast` computes in fp32 whatever the input dtype (SD 2.x's UNet asks for it: its fp16 attention overflows).
    """
    b, n, c = q.shape
    dtype = q.dtype
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    if mask is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, c).to(dtype)
