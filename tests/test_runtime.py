"""The fast paths of runtime.py. The UNet's convolutions: weights of a mapped file packed for oneDNN at first use,
never used stale, and plain nn.Conv2d again when oneDNN is off; linear layers as oneDNN's inner product; large blocks
from malloc's heap within heap_reuse, glibc's defaults after it."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from torch import nn

from sdlite import runtime
from sdlite.attention import attention
from sdlite.unet import GEGLU, Attention, UNet, UNetConfig
from sdlite.vae import AttentionBlock, AutoencoderKL, VAEConfig, VAEResnetBlock
from sdlite.weights import read_safetensors, release, streaming
from test_weights import MB, resident_file_pages
from tolerances import EPS32, float_rounding_tolerance

pytestmark = pytest.mark.skipif(not runtime.AVAILABLE, reason="this torch build has no oneDNN")


def conv_from_file(tmp_path, dtype=torch.float32) -> runtime.PackedConv2d:
    """An nn.Conv2d whose weights are views of a safetensors file, made a PackedConv2d."""
    g = torch.Generator().manual_seed(0)
    save_file({"weight": torch.randn(48, 32, 3, 3, generator=g) / 10, "bias": torch.randn(48, generator=g)},
              tmp_path / "conv.safetensors")
    conv = nn.Conv2d(32, 48, 3, stride=2, padding=1, device="meta")
    conv.load_state_dict(read_safetensors(tmp_path / "conv.safetensors", dtype), assign=True)
    runtime.use_onednn(conv)
    assert isinstance(conv, runtime.PackedConv2d)
    return conv.requires_grad_(False)


def plain(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


def test_a_packed_convolution_computes_the_plain_one_for_each_input_shape(tmp_path):
    conv = conv_from_file(tmp_path)
    for x in torch.randn(3, 32, 19, 26), torch.randn(1, 32, 8, 8).contiguous(memory_format=torch.channels_last):
        with torch.no_grad():
            out = conv(x)
        assert conv.packed is not None and conv.packed_for[1] == x.shape
        torch.testing.assert_close(out, plain(conv, x), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)     # oneDNN's output, which later layers keep


def test_a_changed_weight_is_never_run_from_a_stale_pack(tmp_path):
    conv, x = conv_from_file(tmp_path), torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(2)
        out = conv(x)
    torch.testing.assert_close(out, plain(conv, x), rtol=1e-5, atol=1e-5)
    assert conv.packed is None          # the weight is the process's own now: a packed copy would cost memory


def test_weights_in_process_memory_and_training_use_the_plain_path(tmp_path):
    conv, x = conv_from_file(tmp_path, torch.bfloat16), torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        conv(x.bfloat16())                               # cast at load: a copy, not a view of the file
    assert conv.packed is None
    conv = conv_from_file(tmp_path).requires_grad_(True)
    conv(x).sum().backward()                             # with a gradient wanted, F.conv2d runs
    assert conv.weight.grad is not None and conv.packed is None


def test_packing_off_drops_the_copies_and_runs_f_conv2d(tmp_path):
    conv, x = conv_from_file(tmp_path), torch.randn(2, 32, 12, 20)
    with torch.no_grad():
        conv(x)
        runtime.use_onednn(conv, pack=False)
        out = conv(x)
    assert type(conv) is nn.Conv2d and "packed" not in vars(conv)
    assert torch.equal(out, plain(conv, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_onednn_linear_computes_f_linear(dtype, bias):
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(40, 24, bias=bias).to(dtype).requires_grad_(False)
    runtime.use_onednn(linear, pack=False)   # the text encoder's and the VAE's
    assert type(linear) is runtime.OneDNNLinear
    x = torch.randn(3, 7, 40, generator=g).to(dtype)   # (B, tokens, C), as in the transformers
    with torch.no_grad():
        out = linear(x)
    exact = F.linear(x.double(), linear.weight.double(), None if linear.bias is None else linear.bias.double())
    # sums of 40 products (+ bias) in float32, in any order: 41 roundings of float32 at most; bf16: one final rounding
    limit = 41 * 2**-24 * (x.double().abs() @ linear.weight.double().abs().T).max() + (2**-8 if dtype != torch.float32
                                                                                        else 0) * exact.abs().max()
    assert out.shape == (3, 7, 24) and out.dtype == dtype
    assert (out.double() - exact).abs().max() <= limit


def linear_from_file(tmp_path, dtype=torch.bfloat16) -> nn.Linear:
    """An nn.Linear whose weights are views of a safetensors file stored in `dtype`, made a PackedLinear (the
    UNet's)."""
    g = torch.Generator().manual_seed(2)
    weights = {"weight": torch.randn(48, 40, generator=g) / 10, "bias": torch.randn(48, generator=g)}
    save_file({name: w.to(dtype) for name, w in weights.items()}, tmp_path / "linear.safetensors")
    linear = nn.Linear(40, 48, device="meta")
    linear.load_state_dict(read_safetensors(tmp_path / "linear.safetensors", dtype), assign=True)
    runtime.use_onednn(linear)
    assert type(linear) is runtime.PackedLinear
    return linear.requires_grad_(False)


UNIT_ROUNDOFF = {torch.bfloat16: 2**-8, torch.float16: 2**-11}


def assert_linear_close(out: torch.Tensor, linear: nn.Linear, x: torch.Tensor):
    """Against the fp64 product of the same bf16 (fp16) numbers: sums of 40 products and the bias in float32, in any
    order, are 41 roundings of float32 at most, each within 2**-24 of the sum of magnitudes; then the output's
    rounding to bf16 (fp16), 2**-8 (2**-11) of its magnitude."""
    exact = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    limit = 41 * 2**-24 * (x.double().abs() @ linear.weight.double().abs().T + linear.bias.double().abs()).max() \
        + UNIT_ROUNDOFF[x.dtype] * exact.abs().max()
    assert out.shape == exact.shape and out.dtype == x.dtype and (out.double() - exact).abs().max() <= limit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_packed_linear_computes_f_linear_for_each_row_count(tmp_path, dtype):
    """Packed where this CPU's oneDNN computes the dtype (fp16: AVX-512 FP16 or AVX-NE-CONVERT), else F.linear's
    product; the same numbers to the rounding either way."""
    linear = linear_from_file(tmp_path, dtype)
    for x in torch.randn(2, 77, 40).to(dtype), torch.randn(3, 40).to(dtype):
        with torch.no_grad():
            out = linear(x)
        rows = x.numel() // 40
        assert (linear.packed is not None) == runtime.onednn_takes(dtype)
        if linear.packed is not None:
            assert linear.packed_for[1] == rows
        assert_linear_close(out, linear, x)


def test_a_packed_linear_never_runs_a_stale_pack_and_packs_only_bf16_views_of_the_file(tmp_path):
    linear, x = linear_from_file(tmp_path), torch.randn(5, 40).bfloat16()
    with torch.no_grad():
        linear(x)
        linear.weight.mul_(-1)
        assert_linear_close(linear(x), linear, x)
    assert linear.packed is None          # the weight is the process's own now: a packed copy would cost memory
    linear = nn.Linear(40, 48, device="meta")   # bf16 cast at load from an fp32 file: a copy, not a view of it
    save_file({"weight": torch.randn(48, 40), "bias": torch.randn(48)}, tmp_path / "fp32.safetensors")
    linear.load_state_dict(read_safetensors(tmp_path / "fp32.safetensors", torch.bfloat16), assign=True)
    runtime.use_onednn(linear.requires_grad_(False))
    with torch.no_grad():
        linear(x)
    assert type(linear) is runtime.PackedLinear and linear.packed is None
    linear = linear_from_file(tmp_path, torch.float32)   # fp32 stays unpacked (memory: see PackedLinear)
    with torch.no_grad():
        linear(x.float())
    assert linear.packed is None
    runtime.use_onednn(linear, pack=False)
    assert type(linear) is runtime.OneDNNLinear and "packed" not in vars(linear)


def test_linear_layers_back_to_plain_and_training_runs_f_linear():
    linear = nn.Linear(16, 8)
    runtime.use_onednn(linear)
    x = torch.randn(4, 16)
    linear(x).sum().backward()                           # with a gradient wanted, F.linear runs
    assert linear.weight.grad is not None
    runtime.use_onednn(linear, linears=False)
    assert type(linear) is nn.Linear
    with torch.no_grad():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_fused_geglu_computes_geglu_on_the_files_weights(tmp_path, dtype):
    """a * gelu(b) as two oneDNN inner products with the gelu and the product fused in, on weights read from a file
    (bf16, fp16: packed, as the UNet's, where this CPU's oneDNN computes them; fp32: unpacked), for two row counts;
    GEGLU's own path again when asked."""
    g = torch.Generator().manual_seed(3)
    save_file({"proj.weight": (torch.randn(48, 40, generator=g) / 10).to(dtype),
               "proj.bias": torch.randn(48, generator=g).to(dtype)}, tmp_path / "geglu.safetensors")
    with torch.device("meta"):
        geglu = GEGLU(40, 24)
    geglu.load_state_dict(read_safetensors(tmp_path / "geglu.safetensors", dtype), assign=True)
    runtime.use_onednn(geglu.requires_grad_(False))
    assert type(geglu) is runtime.FusedGEGLU
    w, bias = geglu.proj.weight.double(), geglu.proj.bias.double()
    fused = runtime.onednn_takes(dtype)   # (else, as bf16 on CPUs without AVX-512, GEGLU's own path)
    for x in torch.randn(2, 77, 40, generator=g).to(dtype), torch.randn(3, 40, generator=g).to(dtype):
        with torch.no_grad():
            out = geglu(x)
        assert (geglu.packed is not None) == (fused and dtype != torch.float32)
        a, b = F.linear(x.double(), w, bias).chunk(2, -1)
        gate = F.gelu(b)
        # each projection: 40 products and the bias summed in float32, 41 roundings of the sum of magnitudes at
        # most; gelu's slope is at most 1.13; u: the gelu's polynomial and rounding (a few float32 ulps) or, in bf16
        # (fp16), the gate's and the output's rounding to it (and, on GEGLU's own path, the projection's)
        u = UNIT_ROUNDOFF.get(dtype, 8 * 2**-24)
        e_a, e_b = (41 * 2**-24 * (x.double().abs() @ w.abs().T + bias.abs())
                    + (0 if fused else u) * torch.cat([a, b], -1).abs()).chunk(2, -1)
        limit = a.abs() * (1.13 * e_b + u * gate.abs()) + (gate.abs() + 1.13 * e_b) * e_a + u * (a * gate).abs()
        assert out.shape == a.shape and out.dtype == dtype and ((out.double() - a * gate).abs() <= limit).all()
    runtime.use_onednn(geglu, linears=False)
    assert type(geglu) is GEGLU and "packed" not in vars(geglu)


def test_a_fused_geglu_streams_its_weights_as_a_layer_does(tmp_path):
    """Its fast path does not call its projection's forward, where streaming releases a layer's pages: it releases
    them itself (fp32: unpacked, the file's pages in use)."""
    g = torch.Generator().manual_seed(4)
    save_file({"proj.weight": torch.randn(8192, 1024, generator=g), "proj.bias": torch.zeros(8192)},
              tmp_path / "geglu.safetensors")    # 32 MB
    with torch.device("meta"):
        geglu = GEGLU(1024, 4096)
    geglu.load_state_dict(read_safetensors(tmp_path / "geglu.safetensors", torch.float32), assign=True)
    runtime.use_onednn(geglu.requires_grad_(False))
    x = torch.randn(2, 1024, generator=g)
    with torch.no_grad():
        geglu(x)                  # the first call also brings in the pages of oneDNN's code: not measured
        release(geglu.proj)
        before = resident_file_pages()
        with streaming(geglu):
            geglu(x)
    assert type(geglu) is runtime.FusedGEGLU and resident_file_pages() - before < 2 * MB


def test_an_in_place_resnet_computes_the_resnet_and_leaves_its_input_alone():
    """SiLU and the skip's sum in place, on the tensors the block made: its input unchanged (bit for bit: nothing may
    write to it), its output the plain resnet's; with a gradient wanted, the plain path."""
    torch.manual_seed(5)
    block = VAEResnetBlock(32, 48, 8, "silu")
    x = torch.randn(2, 32, 9, 11)
    with torch.no_grad():
        expected, given = block(x), x.clone()
        runtime.use_onednn(block, pack=False)
        assert type(block) is runtime.InPlaceResnetBlock
        out = block(x)
    # the same operations on the same numbers, through vectorised kernels that may split them differently when
    # they write in place: float rounding of the block's layers at most
    assert torch.equal(x, given)
    assert ((out - expected).abs().max() / expected.abs().max()).item() < float_rounding_tolerance(block)
    block(x).sum().backward()
    assert block.conv1.weight.grad is not None
    runtime.use_onednn(block, linears=False)
    assert type(block) is VAEResnetBlock


class RecordingLibc:
    """Stands for glibc: records mallopt's settings and malloc_trim's calls."""
    def __init__(self):
        self.settings, self.trims = {}, 0

    def mallopt(self, parameter: int, value: int) -> int:
        self.settings[parameter] = value
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_heap_reuse_sets_malloc_within_the_block_and_restores_glibcs_defaults_after_it(monkeypatch):
    """What heap_reuse asks of glibc (whether a given block is then reused depends on what the heap holds, so it is
    measured in benchmarks/RESULTS.md, not asserted): no mapped blocks and no trimming within the block, glibc's
    defaults and the free memory handed back after it, also when the block raises."""
    libc = RecordingLibc()
    monkeypatch.setattr(runtime, "glibc", lambda: libc)
    with pytest.raises(KeyboardInterrupt):
        with runtime.heap_reuse():
            assert libc.settings == {runtime.M_MMAP_MAX: 0, runtime.M_TRIM_THRESHOLD: 2**31 - 1}
            raise KeyboardInterrupt
    assert libc.settings == {runtime.M_MMAP_MAX: 65536, runtime.M_TRIM_THRESHOLD: 128 * 1024} and libc.trims == 1


def attention_error_limit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                          shifted: bool = False) -> torch.Tensor:
    """How far blocked_attention's output may lie from the exact attention, per element, derived from its steps:
    each score a d-term dot product summed in fp32 ((d + 1) eps32 of its terms' sizes), q log2(e) / sqrt(d) rounded to
    the dtype (u of each term), the score rounded to it (u |s|) and, where the row is shifted, the difference from
    the row's largest score rounded too (u (|s| + max |s|)); e^s from exp2 (eps32) rounded (u). Each e^s off by at
    most a relative D moves out = sum_j e_j v_j / sum_j e_j by at most D (sum_j p_j |v_j| + |out|); the M-term fp32
    sums of the numerator and the denominator add M eps32 each, their roundings u each, the division's u."""
    u = 2**-8 if q.dtype == torch.bfloat16 else EPS32    # one rounding to the dtype (bf16 keeps 8 bits)
    d, m = q.shape[-1] // heads, k.shape[1]
    q64, k64, v64 = (t.double().reshape(2, -1, heads, d) for t in (q, k, v))   # (B, N or M, heads, d)
    scores = torch.einsum("bnhd,bmhd->bhnm", q64, k64) * d**-0.5
    terms = torch.einsum("bnhd,bmhd->bhnm", q64.abs(), k64.abs()) * d**-0.5   # sum_i |q_i k_i| / sqrt(d)
    score_error = ((d + 1) * EPS32 + u) * terms + u * scores.abs()
    if shifted:
        score_error += u * (scores.abs() + scores.abs().amax(-1, keepdim=True))
    row_error = (score_error.amax(-1) + EPS32 + u).transpose(1, 2)[..., None]  # (B, N, heads, 1)
    weighted_v = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v64.abs())
    out = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v64).abs()
    return ((row_error + m * EPS32) * (weighted_v + out) + 3 * u * out).reshape(2, -1, heads * d)


PATHS = {"fp32 inner products": (torch.float32, 0), "fp32 bmm": (torch.float32, 2**40), "bf16": (torch.bfloat16, 0)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, m, heads, d, scores", [
    (300, 300, 5, 8, 2**20),        # all 10 (image, head) pairs in one block (inner products: a pair a block)
    (300, 300, 5, 8, 7 * 300),      # 7 queries a block: the last block of each pair has 6 (inner products: packed)
    (300, 77, 5, 8, 3 * 300 * 77),  # 3 whole pairs a block: the last block has 1
    (9, 13, 1, 8, 2**20),
    (40, 50, 2, 16, 2**20)])        # 16-wide heads: no padding, the sums computed apart
def test_blocked_attention_computes_attention(monkeypatch, n, m, heads, d, scores, path):
    """Blocks of SCORES scores cut across queries and across (image, head) pairs, self- and cross-attention, batch 2,
    fp32 products both ways: the attention of attention.py computed in fp64 on the same inputs, to the rounding of
    the dtype."""
    dtype, inner = PATHS[path]
    monkeypatch.setattr(runtime, "SCORES", scores)
    monkeypatch.setattr(runtime, "INNER", inner)
    g = torch.Generator().manual_seed(n + m)
    q, k, v = (torch.randn(2, length, d * heads, generator=g).to(dtype) for length in (n, m, m))
    out = runtime.blocked_attention(q, k, v, heads)
    exact = attention(q.double(), k.double(), v.double(), heads)
    assert out.shape == q.shape and out.dtype == dtype
    assert ((out.double() - exact).abs() <= attention_error_limit(q, k, v, heads)).all()


@pytest.mark.parametrize("path", PATHS)
def test_blocked_attention_shifts_the_rows_whose_exponentials_overflow_or_underflow(monkeypatch, path):
    """Keys near (1, ..., 1): queries of +-40 make all of a row's scores about +-113, whose e^s overflow (inf) or
    underflow (0) in fp32 and bf16, queries of 26 scores about 74, whose sums of e^s are finite and their products
    with values of 10^6 not, among ordinary rows, in blocks of 7 queries (row 24's alone in its block). fp32: the
    exact attention to the rounding, the shift's included. bf16 rounds such scores by about 0.4, beyond what a bound
    of first order covers, in diffusers' attention as here: what holds is that each output is a weighted mean of the
    values, to the rounding of the numerator, the sum and the division (3 u) and their fp32 sums (M eps32 each)."""
    dtype, inner = PATHS[path]
    monkeypatch.setattr(runtime, "SCORES", 7 * 30)
    monkeypatch.setattr(runtime, "INNER", inner)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 30, 16, generator=g)
    q[:, 3] = 40.0
    q[:, 11, :8], q[0, 20] = -40.0, 40.0                   # the first head's row 11 only; both heads of one row 20
    q[:, 24] = 26.0                                        # scores about 74: the sums finite, the products inf
    k = 1 + 0.1 * torch.randn(2, 30, 16, generator=g)
    v = torch.randn(2, 30, 16, generator=g) * torch.tensor([1e6] + [1.0] * 15)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = runtime.blocked_attention(q, k, v, heads=2)
    if dtype == torch.float32:
        exact = attention(q.double(), k.double(), v.double(), 2)
        assert ((out.double() - exact).abs() <= attention_error_limit(q, k, v, 2, shifted=True)).all()
    else:
        values = v.double().reshape(2, 1, 30, 2, 8)                          # (B, 1, M, heads, d)
        slack = (3 * 2**-8 + 2 * 30 * EPS32) * values.abs().amax(2)          # (B, 1, heads, d)
        out = out.double().reshape(2, 30, 2, 8)
        assert torch.isfinite(out).all()
        assert ((out >= values.amin(2) - slack) & (out <= values.amax(2) + slack)).all()


def test_running_a_unet_or_a_vae_swaps_its_attention_and_back():
    config = UNetConfig.from_json(json.loads((Path(__file__).parent / "fixtures" / "unet_sd1.json").read_text()))
    unet = UNet(config)
    vae = AutoencoderKL(VAEConfig.from_json(json.loads((Path(__file__).parent / "fixtures" / "vae_config.json")
                                                       .read_text())))
    for model, plain, blocked in (unet, Attention, runtime.BlockedAttention), \
            (vae, AttentionBlock, runtime.BlockedAttentionBlock):
        with runtime.running(model):
            assert {type(m) for m in model.modules() if isinstance(m, plain)} == {blocked}
        with runtime.running(model, onednn=False):
            assert {type(m) for m in model.modules() if isinstance(m, plain)} == {plain}
    with torch.device("meta"):                           # weights off the CPU (as on a GPU): nothing swapped
        elsewhere = UNet(config)
    runtime.use_onednn(elsewhere)
    assert all(type(m) in (Attention, nn.Linear, nn.Conv2d) for m in elsewhere.modules()
               if isinstance(m, (Attention, nn.Linear, nn.Conv2d)))


@pytest.mark.parametrize("computes, slow, words", [
    ({torch.float32, torch.bfloat16}, torch.float16, r"FP16 or AVX-NE-CONVERT\): fp16 runs .* fp32 or bf16 is"),
    ({torch.float32}, torch.bfloat16, r"\(AVX-512 or AVX-NE-CONVERT\): bf16 runs .* slower than fp32; fp32 is faster"),
    ({torch.float32}, torch.float16, "fp16 runs .*; fp32 is faster here")])
def test_a_precision_this_cpus_onednn_lacks_is_named_slow(monkeypatch, computes, slow, words):
    """On an x86-64 CPU (as this test's fake oneDNN says what it computes) a reduced precision without oneDNN's
    instructions is named slow, with what is faster; a precision oneDNN takes (fp32 among them), the slow one on
    another device or on another architecture, is not."""
    monkeypatch.setattr(runtime.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "onednn_takes", lambda d: d in computes)
    assert re.search(words, runtime.slow_precision(slow, torch.device("cpu")) or "")
    assert all(runtime.slow_precision(fast, torch.device("cpu")) is None for fast in computes)
    assert runtime.slow_precision(slow, torch.device("meta")) is None
    monkeypatch.setattr(runtime.platform, "machine", lambda: "arm64")   # (measured on x86-64 CPUs only)
    assert runtime.slow_precision(slow, torch.device("cpu")) is None
