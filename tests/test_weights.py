"""Weights memory-mapped from safetensors files: read in place, and released between uses without changing."""
import mmap

import torch
from safetensors.torch import save_file
from torch import nn

from sdlite.weights import read_safetensors, release, streaming
from tolerances import float_rounding_tolerance

MB = 2**20


def resident_file_pages() -> int:
    """Bytes of mapped files this process holds in memory (RssFile in /proc/self/status)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def mapped_linear(tmp_path, dtype=torch.float32) -> tuple[nn.Linear, torch.Tensor]:
    """A 1024 x 8192 Linear (32 MB in fp32) whose weight is read from a file, and a copy of that weight."""
    weight = torch.randn(1024, 8192, generator=torch.Generator().manual_seed(0))
    save_file({"weight": weight, "bias": torch.zeros(1024)}, tmp_path / "w.safetensors")
    layer = nn.Linear(8192, 1024, device="meta")
    layer.load_state_dict(read_safetensors(tmp_path / "w.safetensors", dtype), assign=True)
    return layer, weight


def test_a_tensor_in_its_stored_dtype_is_a_view_of_the_file(tmp_path):
    layer, weight = mapped_linear(tmp_path)
    before = resident_file_pages()
    assert torch.equal(layer.weight, weight)                      # reading it brings its pages in
    assert resident_file_pages() - before > 24 * MB


def test_release_drops_the_pages_and_keeps_the_values(tmp_path):
    layer, weight = mapped_linear(tmp_path)
    x = torch.randn(3, 8192)
    expected = layer(x)                                           # pages in
    before = resident_file_pages()
    release(layer)
    assert before - resident_file_pages() > 24 * MB
    assert torch.equal(layer(x), expected)                        # read back from the page cache
    assert torch.equal(layer.weight, weight)


def test_a_changed_weight_is_never_released(tmp_path):
    layer, weight = mapped_linear(tmp_path)
    with torch.no_grad():
        layer.weight.mul_(2)                                      # its pages are now private copies
    before = resident_file_pages()
    release(layer)
    assert torch.equal(layer.weight, 2 * weight)
    assert before - resident_file_pages() < MB


def test_cast_weights_are_copies_and_stay(tmp_path):
    layer, weight = mapped_linear(tmp_path, torch.bfloat16)
    release(layer)
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, weight.to(torch.bfloat16))


def test_streaming_releases_each_layer_after_it_runs(tmp_path):
    """Two 16 MB layers from one file: after a forward inside `streaming`, neither holds its pages; outside, both do."""
    g = torch.Generator().manual_seed(0)
    save_file({"0.weight": torch.randn(4096, 1024, generator=g), "1.weight": torch.randn(1024, 4096, generator=g)},
              tmp_path / "two.safetensors")
    model = nn.Sequential(nn.Linear(1024, 4096, bias=False), nn.Linear(4096, 1024, bias=False)).to("meta")
    model.load_state_dict(read_safetensors(tmp_path / "two.safetensors", torch.float32), assign=True)
    x = torch.randn(2, 1024)
    before = resident_file_pages()
    expected = model(x)
    assert resident_file_pages() - before > 24 * MB
    release(model)
    before = resident_file_pages()
    with streaming(model):
        out = model(x)
    assert resident_file_pages() - before < 2 * MB
    assert_same_computation(out, expected, model)
    assert all(not layer._forward_hooks for layer in model)       # the hooks go with the block


def test_streaming_leaves_the_layers_skip_names_and_the_small_ones_their_pages(tmp_path):
    """Two 16 MB layers and a 4 KB norm from one file, the second layer named by skip (as a layer computing from a
    packed copy is): after a forward inside `streaming`, only the first layer's pages are gone, and every layer's
    output is its own (a hook's return value would replace it)."""
    g = torch.Generator().manual_seed(0)
    save_file({"0.weight": torch.randn(4096, 1024, generator=g), "1.weight": torch.randn(1024, 4096, generator=g),
               "2.weight": torch.rand(1024, generator=g), "2.bias": torch.rand(1024, generator=g)},
              tmp_path / "three.safetensors")
    model = nn.Sequential(nn.Linear(1024, 4096, bias=False), nn.Linear(4096, 1024, bias=False),
                          nn.LayerNorm(1024)).to("meta")
    model.load_state_dict(read_safetensors(tmp_path / "three.safetensors", torch.float32), assign=True)
    x = torch.randn(2, 1024)
    expected = model(x)
    release(model)
    before = resident_file_pages()
    with streaming(model, skip=lambda layer: layer is model[1]):
        out = model(x)
    assert 15 * MB < resident_file_pages() - before < 18 * MB     # the second layer's 16 MB and the norm's pages
    assert_same_computation(out, expected, model)
    assert mapping_resident(model[2].weight)


def assert_same_computation(out: torch.Tensor, expected: torch.Tensor, model: nn.Module):
    """The same layers on the same input twice: equal to float rounding (the BLAS may sum in another order for other
    buffers' alignment), which a hook's return value in place of a layer's output would not be."""
    relative_error = (out - expected).abs().max() / expected.abs().max()
    assert out.shape == expected.shape and relative_error <= float_rounding_tolerance(model)


def mapping_resident(tensor: torch.Tensor) -> bool:
    """Whether the page that holds `tensor`'s first byte is in this process's memory (/proc/self/pagemap's present
    bit)."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        page = tensor.data_ptr() // mmap.PAGESIZE
        pagemap.seek(page * 8)
        return bool(int.from_bytes(pagemap.read(8), "little") >> 63)
