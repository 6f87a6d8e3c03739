"""The fast paths of runtime.py. The UNet's convolutions: weights of a mapped file packed for oneDNN at first use,
never used stale, and plain nn.Conv2d again when packing is off."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from torch import nn

from sdlite import runtime
from sdlite.weights import read_safetensors

pytestmark = pytest.mark.skipif(not runtime.AVAILABLE, reason="this torch build has no oneDNN")


def conv_from_file(tmp_path, dtype=torch.float32) -> runtime.PackedConv2d:
    """An nn.Conv2d whose weights are views of a safetensors file, made a PackedConv2d."""
    g = torch.Generator().manual_seed(0)
    save_file({"weight": torch.randn(48, 32, 3, 3, generator=g) / 10, "bias": torch.randn(48, generator=g)},
              tmp_path / "conv.safetensors")
    conv = nn.Conv2d(32, 48, 3, stride=2, padding=1, device="meta")
    conv.load_state_dict(read_safetensors(tmp_path / "conv.safetensors", dtype), assign=True)
    runtime.pack_convolutions(conv)
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
        runtime.pack_convolutions(conv, on=False)
        out = conv(x)
    assert type(conv) is nn.Conv2d and "packed" not in vars(conv)
    assert torch.equal(out, plain(conv, x))
