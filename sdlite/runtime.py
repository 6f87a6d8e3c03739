"""The CPU fast paths, applied to built models from outside: the model files describe the architecture only.

    with runtime.running(pipe.unet):   # one stage of the pipeline
        eps = pipe.unet(x, t, context)

`running(module)` does for the block what the module kind needs:
  UNet            convolutions (and bf16 linear layers) on weights packed for oneDNN, other linear layers on
                  oneDNN, GEGLU's gelu and product fused into its projections, attention in blocks (below); pages
                  streamed
  AutoencoderKL   inputs channels-last, linear layers on oneDNN, attention in blocks, SiLU and the resnets' sums in
                  place, in bf16 or fp16 large blocks reused from malloc's heap (below); pages streamed
  text encoder    linear layers on oneDNN; its pages released after the block (it runs twice, once per prompt:
                  streaming would read them back)
Streaming (weights.py): each layer that reads its memory-mapped weights (not one that runs on a packed copy) hands
their pages back to the OS right after it has run, so that a call holds the weights of one layer at a time (and the
packed copies). running(module, onednn=False) keeps the layers plain
nn.Conv2d and nn.Linear, whose fp32 results are bit-identical to diffusers'; the oneDNN paths agree with them to float
rounding, not bit for bit (the sums run in another order). Measured in benchmarks/RESULTS.md ("Next to OpenVINO").

Linear layers on oneDNN. F.linear calls the BLAS library PyTorch is built with (MKL): on AMD CPUs MKL's float32
matrix product takes its generic kernels, 0.20 TFLOP/s on the 2-core EPYC here, where oneDNN's inner product on the
same shapes runs at 0.45 (bf16: level, 0.8-0.9). Each nn.Linear becomes a OneDNNLinear, which calls oneDNN's: the fp32
UNet step at 256x256 went from 1.54 s to 1.06 s (its 184 linear layers from 725 to 353 ms). The UNet's become
PackedLinear, which in bf16 also packs its weight once, as PackedConv2d does (below), rather than oneDNN reordering it
at every call: 0-25 % off each layer, a UNet step at 256x256 6 % faster (fp32: 12 %, but not kept, for memory).

Attention in blocks. PyTorch's CPU flash-attention kernel computes its products with oneDNN's brgemm only where it
can pack for AMX; elsewhere it calls the BLAS in fp32, even for bf16 inputs, and MKL's fp32 product on AMD is the slow
one above: 54 % of the kernel's time (perf) at SD's 4096-token self-attention. blocked_attention computes the same
attention in blocks of 2M scores (512 queries x 4096 keys of one head; several heads at once where a head has fewer
scores; 1M until the softmax was folded into the products, after which 2M was 5 % faster), the block's scores staying
in the cache, with oneDNN's products: bf16 matrix products (148 against
321 ms per 4096-token call, a 512x512 bf16 UNet step 3.1 s instead of 4.0 s; grouping the heads of short sequences and
of cross-attention (77 keys) saves the per-call costs of many small products: 25 ms of a 256x256 step, 60 ms of a
512x512 one), and in fp32 inner products on each head's K and V^T (183 against 258 ms per 4096-token call, 1.09
against 1.51 s of a 512x512 fp32 step's attention). The softmax is folded into the products (e^s in place of the
scores, the sums from a column of ones in V's padding, one division at the end): 20-30 % off a 4096-token bf16
layer's attention, a 512x512 bf16 step 7 % faster. bf16 scores and probabilities are rounded to bf16 as diffusers'
AttnProcessor rounds them: the UNet's output is 0.034 from the fp32 one against flash's 0.032 (0.044 against the
separate softmax's 0.042 on other inputs). The VAE's one-head attention at 512x512 (4096 tokens, 512 channels): 106
against 188 ms in fp32, 49 against 180 in bf16.

Packed convolutions. On the CPU, PyTorch runs a convolution with oneDNN, which computes on weights in a blocked layout
(ABcd16b16a for fp32: 16x16 tiles of output x input channels). F.conv2d reorders the weight from PyTorch's OIHW layout
into it at every call: for SD 1.5's UNet that is 2.4 GB (fp32) of weights copied at every step, most of it in the
1280-channel convolutions at 8x8 and 16x16 latents, where there is little else to do. A weight packed without knowing
the input does not help: oneDNN then reorders it again to the layout it wants. So each nn.Conv2d of the UNet becomes a
PackedConv2d, which makes, at its first call, a copy of its weight in the layout oneDNN picks for that input shape
(inductor's weight prepacking does the same), and passes it to oneDNN's own convolution operator from then on; the
output is channels-last, which the following layers keep. Weights that are views of a mapped checkpoint file are
packed, and their pages go back to the page cache (weights.release): the packed copy replaces the weight in memory.
Weights held in process memory (cast to another dtype at load, or changed) keep the plain path: a packed copy would
add to them. Measured for bf16 cast at load from the fp32 files: packing them too made the bf16 UNet step at 256x256
0.57 s instead of 0.83 s, and the peak of a bf16 txt2img 4.5 GB instead of 2.7 GB (benchmarks/RESULTS.md, "Next to
OpenVINO"). A bf16 checkpoint file loaded in bf16 has its weights packed. The first step pays for the copies.

Channels-last VAE. With its inputs channels-last (N, H, W, C in memory; the shapes stay N, C, H, W), every layer of
the VAE keeps that layout, and oneDNN's convolutions take it as it is, where each convolution of an NCHW tensor costs
two reorders of its activations: a 512x512 decode is 13 % faster in fp32 and 15 % in bf16 on this machine.

Heap reuse. A 512x512 decode allocates and frees dozens of 32-256 MB activations. glibc's malloc maps each block
over 32 MB from the OS afresh and unmaps it when freed, so every layer's output is new pages that the kernel zero-fills
at the first touch: 0.35 s of a 3.4 s bf16 decode. Within the block, malloc serves them from its heap and keeps freed
ones for the next (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GB); after it, glibc's defaults come back and malloc_trim
returns the free memory. The heap's fragments raise the peak of a 512x512 txt2img: in fp32 from 3.5 to 4.0 GB (for 1 s
of a 6.7 s decode), over the 0.7 of diffusers' peak that sdlite keeps to; in bf16 from 2.8 to 3.0-3.1 GB, within it.
So only reduced-precision VAEs run within it.
"""
import ctypes
import functools
import math
import platform
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIPTextModel
from .unet import GEGLU, Attention, UNet
from .vae import AttentionBlock, AutoencoderKL, VAEResnetBlock
from .weights import mapping, release, streaming

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") and \
    hasattr(torch.ops.mkldnn, "_linear_pointwise")


@contextmanager
def running(module: nn.Module, onednn: bool = True):
    """Within the block, `module` (a UNet, a VAE or a text encoder) runs on the fast paths its kind has; onednn=False
    keeps (or makes again) its layers plain nn.Conv2d and nn.Linear."""
    with ExitStack() as stack:
        if isinstance(module, (UNet, AutoencoderKL, CLIPTextModel)):
            use_onednn(module, onednn and isinstance(module, UNet), onednn)
        if isinstance(module, AutoencoderKL):
            if next(module.parameters()).dtype in REDUCED:
                stack.enter_context(heap_reuse())
            for part in (module.encoder, module.post_quant_conv):
                hook = part.register_forward_pre_hook(lambda part, inputs: channels_last(inputs))
                stack.callback(hook.remove)
        if isinstance(module, CLIPTextModel):
            stack.callback(release, module)
        else:
            stack.enter_context(streaming(module, skip=runs_packed))
        yield


@contextmanager
def heap_reuse():
    """Within the block, glibc's malloc serves large blocks from its heap and keeps the freed ones for the next
    (M_MMAP_MAX 0, a high M_TRIM_THRESHOLD); after it, the defaults, and the free memory goes back to the OS."""
    libc = glibc()
    if libc is None or not libc.mallopt(M_MMAP_MAX, 0):
        yield
        return
    try:
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, 65536)              # glibc's defaults
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # mallopt's parameters (malloc.h)


@functools.cache
def glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def channels_last(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x.contiguous(memory_format=torch.channels_last) for x in inputs)


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that, when no gradient is wanted, runs on `packed`: its
    weight in the layout oneDNN picks for inputs of the shape at hand, made at the first such call."""
    packed: torch.Tensor | None = None
    packed_for: tuple | None = None  # ((address, version) of the weight, input shape) that `packed` was decided for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        packed = packed_weight(self, self.weight, tuple(x.shape), lambda: torch.ops.mkldnn._reorder_convolution_weight(
            self.weight, self.padding, self.stride, self.dilation, self.groups, list(x.shape)))
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, "none", [], "")


class OneDNNLinear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) that, when no gradient is wanted, runs as oneDNN's inner
    product instead of the BLAS matrix product F.linear calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not onednn_takes(x.dtype):
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class PackedLinear(OneDNNLinear):
    """OneDNNLinear on `packed`, in bf16 or fp16: its weight in the layout oneDNN's inner product picks for inputs of
    as many rows as the call at hand, made at the first such call. fp32 weights stay unpacked: the packed copies of
    SD 1.5's UNet linear layers (1.0 GB in fp32) would be held beside those of its convolutions (2.2 GB), which took
    the peak of an fp32 txt2img from 0.62-0.67 of diffusers' to 0.81, over the 0.7 that sdlite keeps to."""
    packed: torch.Tensor | None = None
    packed_for: tuple | None = None  # ((address, version) of the weight, rows of the input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.weight.dtype not in REDUCED or not onednn_takes(x.dtype):
            return super().forward(x)
        rows = x.numel() // x.shape[-1]
        packed = packed_weight(self, self.weight, rows, lambda: torch.ops.mkldnn._reorder_linear_weight(self.weight,
                                                                                                         rows))
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


class FusedGEGLU(GEGLU):
    """The UNet's GEGLU (same weights) that, when no gradient is wanted, runs as two oneDNN inner products with the
    activation and the product fused into them: gate = gelu(x W_b^T + b_b), then (x W_a^T + b_a) * gate, W_a and W_b
    the halves of its projection (in bf16 or fp16 packed, as PackedLinear's): no pass over the projection's output,
    its halves or the gelu's. The feed-forward's first layer at 512x512: 73 -> 54 ms per call in fp32, 40 -> 17 in
    bf16."""
    packed: tuple[torch.Tensor, torch.Tensor] | None = None
    packed_for: tuple | None = None  # ((address, version) of the weight, rows of the input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.proj.weight, self.proj.bias
        if torch.is_grad_enabled() or not onednn_takes(x.dtype):
            return super().forward(x)
        half = weight.shape[0] // 2
        a, b = weight[:half], weight[half:]
        if weight.dtype in REDUCED:
            rows = x.numel() // x.shape[-1]
            a, b = packed_weight(self, weight, rows, lambda: tuple(
                torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in (a, b))) or (a, b)
        gate = torch.ops.mkldnn._linear_pointwise(x, b, bias[half:], "gelu", [], "none")  # erf's gelu, as F.gelu's
        out = torch.ops.mkldnn._linear_pointwise.binary(x, gate, a, bias[:half], "mul")
        if not runs_packed(self):
            release(self)   # the mapped pages, as streaming does after each layer's forward: proj's is not called
        return out


def runs_packed(layer: nn.Module) -> bool:
    """Whether `layer` computes from a packed copy of its weights, leaving the mapped file's pages untouched (none
    to release after its calls)."""
    return getattr(layer, "packed", None) is not None


def packed_weight(layer: nn.Module, weight: torch.Tensor, inputs, pack):
    """`layer.packed`: pack() of `weight`, made at the first call for these `inputs` (a shape, a row count) and kept;
    None for a weight that is not a view of a mapped file, held in process memory, which a packed copy would add to."""
    key = (weight_state(weight), inputs)
    if layer.packed_for != key:
        layer.packed, layer.packed_for = None, key
        if mapping(weight) is not None and onednn_takes(weight.dtype):
            layer.packed = pack()
            release(layer)   # the copy is used from now on: the file's pages can go
    return layer.packed


class BlockedAttention(Attention):
    """The UNet's Attention (same weights) that, in fp32 or bf16 with no gradient wanted, attends in blocks
    (blocked_attention) instead of through PyTorch's flash kernel."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if in_blocks(q, self.upcast):
            return blocked_attention(q, k, v, self.heads)
        return super().attend(q, k, v)


class BlockedAttentionBlock(AttentionBlock):
    """The VAE's one-head AttentionBlock (same weights) that attends in blocks, as BlockedAttention."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if in_blocks(q, upcast=False):
            return blocked_attention(q, k, v, heads=1)
        return super().attend(q, k, v)


class InPlaceResnetBlock(VAEResnetBlock):
    """The VAE's resnet (same weights, same results) that, when no gradient is wanted, applies SiLU and adds the skip
    in place, to tensors it has just made. A 512x512 decode's activations are 32-256 MB each, which glibc maps afresh
    from the OS (zero-filled at the first touch) and unmaps when freed: with 3 of the 7 tensors a resnet made no longer
    new, an fp32 decode asks the OS for 4.2 GB instead of 6.7 GB (page faults 1.65 M -> 1.04 M)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.act is not F.silu:
            return super().forward(x)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


def in_blocks(q: torch.Tensor, upcast: bool) -> bool:
    """Whether blocked_attention computes this attention: no gradient wanted, fp32, or bf16 not upcast to fp32."""
    return not torch.is_grad_enabled() and (q.dtype == torch.float32 or q.dtype == torch.bfloat16 and not upcast)


SCORES = 512 * 4096   # scores per block: 4 MB in bf16 (512 queries x 4096 keys of one head at 512x512)
INNER = 2**17         # fp32 pairs with as many scores or more: products as oneDNN's inner products, not MKL's bmm


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1), as attention.attention, in blocks of about SCORES
    scores: as many queries of one (image, head) pair as fit, or, where the products are torch.bmm's, as many whole
    pairs as fit when a pair has fewer (short sequences, the 77 keys of cross-attention). Each block is a matrix
    product, an exponential and another product, on scores that stay in the cache: in bf16 torch.bmm (oneDNN's
    matmul); in fp32 where a pair has INNER scores or more, oneDNN's inner product on K and V^T packed once per pair,
    since bmm calls MKL there (slow on AMD CPUs, as F.linear; for fewer scores the inner products' per-call costs
    outweigh that: bmm, pairs grouped).

    The softmax is not a pass of its own. With log2(e) / sqrt(d) folded into Q, each score s becomes
    e^s = 2^(s log2 e) in place (exp2: PyTorch's fp32 exp calls MKL's vector math, 4x slower than its own exp2 on an
    AMD CPU), and the output is sum_j e^s_j v_j / sum_j e^s_j: the product with V gives the numerators and, in a
    column of ones where V's padding to a multiple of 16 has room (SD 1.5's 40-wide heads), the sums too (else they
    are summed apart, in fp32). Without each row's largest score subtracted first, e^s overflows for scores over 88,
    and the sums lose bits where all of a row's scores are under about -44: the blocks of such rows are computed
    again with it subtracted (the softmax's own shift, which the ratio cancels).
    bf16 scores and e^s are rounded to bf16, as diffusers' AttnProcessor rounds its scores and probabilities
    (baddbmm, softmax, bmm in the model's dtype), where PyTorch's flash kernel keeps them in fp32."""
    b, n, c = q.shape
    d, m = c // heads, k.shape[1]
    dv = -(-d // 16) * 16      # V's columns, padded to a multiple of 16, the width oneDNN's kernels work in
    q = (q * (math.log2(math.e) * d**-0.5)).reshape(b, n, heads, d).transpose(1, 2).reshape(b * heads, n, d)
    kt = k.reshape(b, m, heads, d).permute(0, 2, 3, 1).reshape(b * heads, d, m).contiguous()  # (B * heads, d, M)
    v = v.reshape(b, m, heads, d).transpose(1, 2)                                       # (B, heads, M, d)
    if dv > d:                 # the padding: a column of ones (the sums), zeros
        v = torch.cat([v, v.new_ones(b, heads, m, 1), v.new_zeros(b, heads, m, dv - d - 1)], -1)
    v = v.reshape(b * heads, m, dv)                                                     # (B * heads, M, dv)
    out = q.new_empty(b * heads, n, dv)
    sums = out[..., d] if dv > d else q.new_empty(b * heads, n, dtype=torch.float32)    # (B * heads, N)
    rows = min(n, max(1, SCORES // m))         # queries per block
    inner = q.dtype == torch.float32 and n * m >= INNER
    pairs = 1 if inner else max(1, SCORES // (rows * m))  # (image, head) pairs per block: > 1 only when rows == n

    def weights(p: int) -> list[torch.Tensor]:
        """x K^T and x V as inner products x W^T, W = the pair's K (M, d) and V^T (dv, M), packed if used
        again."""
        ws = [w.t().contiguous() for w in (kt[p], v[p])]
        return [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in ws] if rows < n else ws

    def block(p: int, r: int, ws: list[torch.Tensor], shift: bool) -> None:
        """Block (pairs p.., queries r..): e^s in place of its scores, their products with V (and the sums)."""
        at = slice(p, p + pairs), slice(r, r + rows)
        if inner:
            scores = torch.ops.mkldnn._linear_pointwise(q[at], ws[0], None, "none", [], "")
        else:
            scores = torch.bmm(q[at], kt[p:p + pairs])
        if shift:
            scores.sub_(scores.amax(-1, keepdim=True))
        scores.exp2_()
        if dv == d:
            torch.sum(scores, -1, dtype=torch.float32, out=sums[at])
        if inner:
            out[at] = torch.ops.mkldnn._linear_pointwise(scores, ws[1], None, "none", [], "")
        else:
            torch.bmm(scores, v[p:p + pairs], out=out[at])

    for p in range(0, b * heads, pairs):
        ws = weights(p) if inner else []
        for r in range(0, n, rows):
            block(p, r, ws, shift=False)
    # rows whose e^s underflowed (a sum under 2^-64; at or over it, a row's largest e^s is at least 2^-64 / M, far
    # above the 2^-126 under which floats lose bits) or overflowed (inf, and with it the row's products), or whose
    # products did (large values): those blocks again, shifted
    wrong = ~(sums >= 2**-64)                                                           # (B * heads, N)
    if not torch.isfinite(out.sum()):
        wrong |= ~torch.isfinite(out).all(-1)
    if wrong.any():
        for p in range(0, b * heads, pairs):
            for r in range(0, n, rows):
                if wrong[p:p + pairs, r:r + rows].any():
                    block(p, r, weights(p) if inner else [], shift=True)
    result = q.new_empty(b, n, heads, d)
    torch.div(out[..., :d].unflatten(0, (b, heads)), sums.unflatten(0, (b, heads))[..., None],
              out=result.transpose(1, 2))
    return result.reshape(b, n, c)


REDUCED = (torch.bfloat16, torch.float16)


@functools.cache
def onednn_takes(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN computes in `dtype` (fp16 needs AVX-512 FP16 or AVX-NE-CONVERT)."""
    try:
        torch.ops.mkldnn._linear_pointwise(torch.ones(1, 16, dtype=dtype), torch.ones(16, 16, dtype=dtype), None,
                                           "none", [], "")
    except RuntimeError:
        return False
    return True


# A reduced precision's name, and what oneDNN needs to compute it on an x86-64 CPU (AVX-NE-CONVERT: some recent
# AVX2-only CPUs).
INSTRUCTIONS = {torch.bfloat16: ("bf16", "AVX-512 or AVX-NE-CONVERT"),
                torch.float16: ("fp16", "AVX-512 FP16 or AVX-NE-CONVERT")}


def slow_precision(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why computing in `dtype` on `device` is slow, or None. Where this x86-64 CPU's oneDNN has no instructions for a
    reduced precision, PyTorch computes its convolutions on generic kernels: one guided SD 1.5 UNet step at 256x256
    took 116 s in fp16 on an AVX-512 BF16 CPU (1.2 s in fp32), and as long in bf16 with oneDNN capped at AVX2 (2.4 s
    in fp32)."""
    if device.type != "cpu" or dtype not in INSTRUCTIONS or platform.machine().lower() not in ("x86_64", "amd64") \
            or onednn_takes(dtype):
        return None
    name, needs = INSTRUCTIONS[dtype]
    faster = "fp32 or bf16" if onednn_takes(torch.bfloat16) else "fp32"
    return (f"this CPU lacks what oneDNN computes {name} with ({needs}): {name} runs on PyTorch's generic kernels, "
            f"50-100 times slower than fp32; {faster} is faster here")


def weight_state(weight: torch.Tensor) -> tuple[int, int]:
    """Changes when the weight is replaced (module.to) or changed in place."""
    return weight.data_ptr(), weight._version


def use_onednn(module: nn.Module, pack: bool = True, linears: bool = True) -> None:
    """Make `module`'s convolutions PackedConv2d and its linear layers PackedLinear (`pack`, the UNet), or its
    linear layers OneDNNLinear (`linears`), its attention layers (the UNet's, the VAE's) attend in blocks, GEGLU
    FusedGEGLU (`linears`), on the CPU where oneDNN is available, and the VAE's resnets InPlaceResnetBlock (`linears`);
    else plain nn.Conv2d, nn.Linear, attention layers, GEGLU and resnets again.

    Each layer stays the same object, only its class changes (none adds a parameter): what holds on to a layer
    (a merged LoRA's record of its original weight, streaming's hooks) keeps finding it."""
    for layer in module.modules():
        weights = next(layer.parameters(), None)
        on_cpu = AVAILABLE and weights is not None and weights.device.type == "cpu"
        if type(layer) in (nn.Conv2d, PackedConv2d):
            layer.__class__ = PackedConv2d if pack and on_cpu else nn.Conv2d
        elif type(layer) in (Attention, BlockedAttention):
            layer.__class__ = BlockedAttention if linears and on_cpu else Attention
        elif type(layer) in (AttentionBlock, BlockedAttentionBlock):
            layer.__class__ = BlockedAttentionBlock if linears and on_cpu else AttentionBlock
        elif type(layer) in (VAEResnetBlock, InPlaceResnetBlock):
            layer.__class__ = InPlaceResnetBlock if linears else VAEResnetBlock
        elif type(layer) in (GEGLU, FusedGEGLU):
            layer.__class__ = FusedGEGLU if linears and on_cpu else GEGLU
        elif type(layer) in (nn.Linear, OneDNNLinear, PackedLinear):
            layer.__class__ = (PackedLinear if pack and linears and on_cpu else OneDNNLinear if linears and on_cpu
                               else nn.Linear)
        if not isinstance(layer, (PackedConv2d, PackedLinear, FusedGEGLU)):
            layer.__dict__.pop("packed", None)      # a packed copy no longer used
            layer.__dict__.pop("packed_for", None)
