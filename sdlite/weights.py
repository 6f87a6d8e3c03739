"""Checkpoint weights memory-mapped from safetensors files: reading them, and handing their pages back.

A tensor stored in the dtype it is used in is a view of the mapped file, never a copy: its pages are read from disk
(or the page cache) when first used, and `release` can drop them from the process again between uses. The pipeline
runs the UNet and the VAE `streaming`: every layer that reads its weights from the file hands their pages back right
after it has run, so that the process holds the weights of the layer at work rather than those of all three networks
(the fp32 SD 1.5 weights are 4.3 GB, of which the UNet is 3.4 GB). Reading them back from the page cache at every step
costs about 4 % of an fp32 UNet step at 256x256 (1.52 against 1.46 s, benchmarks/RESULTS.md).
"""
import itertools
import json
import math
import mmap
import os
import warnings
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

# The files read_safetensors mapped, by the address where each mapping starts (the data pointer of the storage that
# all of a file's tensors share); an entry goes when its mapping is gone.
MAPPINGS: "weakref.WeakValueDictionary[int, mmap.mmap]" = weakref.WeakValueDictionary()

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_file(path: Path, dtype: torch.dtype = torch.float32):
    """A weights file as stored: safetensors (read_safetensors), or a pickle opened only by torch's weights-only
    loader, which refuses anything but tensors and plain containers, so a file cannot run code. Raises whatever the
    reader raises; the callers say which kind of file they wanted."""
    if Path(path).suffix not in PICKLE_SUFFIXES:
        return read_safetensors(path, dtype)
    with warnings.catch_warnings():   # torch warns about pickle protocols: the callers' one line says what matters
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def read_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The format: the header's length (8 bytes, little-endian), the JSON header (each tensor's dtype, shape and byte
    range in the data), the data. The file is memory-mapped (copy-on-write) and each tensor is a view of its bytes:
    one already in `dtype` is used in place, never copied, its pages read from disk when first used; one cast to
    `dtype` is read once and its pages are released right after (madvise), so that a bf16 load of an fp32 file
    holds the bf16 weights only, never the fp32 ones as well. A tensor whose bytes do not start at a multiple of its
    element size (the format does not require the header to be padded) is copied out of the mapping.
    A file that does not follow the format is refused (UserError) naming what is wrong."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise UserError(f"{path}: not a safetensors file ({size} bytes, shorter than the header's length field)")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header_size = int.from_bytes(mapped[:8], "little")
    if header_size > size - 8:
        raise UserError(f"{path}: not a safetensors file, or truncated (a header of {header_size} bytes "
                        f"in a file of {size})")
    header = parse_header(mapped[8:8 + header_size], path)
    begin = 8 + header_size                                            # where the data starts in the file
    whole = torch.frombuffer(mapped, dtype=torch.uint8)
    MAPPINGS[whole.untyped_storage().data_ptr()] = mapped
    data = whole[begin:]
    if max((info["data_offsets"][1] for info in header.values()), default=0) > len(data):
        raise UserError(f"{path}: the data ends before the last tensor: the file is truncated")
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        stored_dtype = SAFETENSORS_DTYPES[info["dtype"]]
        raw = data[start:end]
        if (begin + start) % stored_dtype.itemsize:
            raw = raw.clone()                                          # misaligned: a view would be refused
        stored = raw.view(stored_dtype).reshape(info["shape"])
        tensors[name] = cast(stored, dtype)
        if tensors[name] is not stored:
            drop_pages(mapped, begin + start, stored.nbytes)
    return tensors


def parse_header(text: bytes, path: Path) -> dict[str, dict]:
    """The header's tensors, each checked: a known dtype, a shape of non-negative integers, and a byte range
    [start, end) within the data that holds exactly that many elements."""
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:       # invalid UTF-8 or JSON, or nested deeper than Python parses
        raise UserError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (its header is a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        problem = tensor_entry_problem(info)
        if problem:
            raise UserError(f"{path}: tensor {name[:80]!r} has {problem} in the header")
    return header


def tensor_entry_problem(info) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        return "no dtype, shape and data_offsets"
    if not isinstance(info["dtype"], str) or info["dtype"] not in SAFETENSORS_DTYPES:
        return f"an unsupported dtype {str(info['dtype'])[:20]!r} (supported: {', '.join(SAFETENSORS_DTYPES)})"
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        return f"an invalid shape {str(shape)[:40]}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"invalid data_offsets {str(offsets)[:40]}"
    if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize:
        return f"a byte range ({offsets[1] - offsets[0]} bytes) that does not fit its shape {shape}"
    return None


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point tensors in `dtype`; integer ones (ids, counters) as they are."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def mapping(tensor: torch.Tensor) -> mmap.mmap | None:
    """The mapped file whose untouched bytes `tensor` is, or None: not from a mapped file, or changed in place.

    A file's tensors share one version counter, which any in-place change of any of them raises (an optimiser step,
    load_state_dict): the changed pages are then private to this process, and only the process holds them."""
    if tensor._version != 0 or tensor.nbytes == 0:
        return None
    return MAPPINGS.get(tensor.untyped_storage().data_ptr())


def release(module: nn.Module) -> None:
    """Drop from this process the pages of `module`'s weights that are still the untouched bytes of a mapped file.

    They stay valid: the next use reads them back from the page cache (about 0.1 s for the 3.4 GB of an fp32 SD UNet)
    or, if the system needed the memory meanwhile, from disk. Changed weights are left alone: dropping their pages
    would undo the change.
    """
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        mapped = mapping(tensor)
        if mapped is not None:
            drop_pages(mapped, tensor.data_ptr() - tensor.untyped_storage().data_ptr(), tensor.nbytes)


def drop_pages(mapped: mmap.mmap, offset: int, nbytes: int) -> None:
    """Drop from this process the pages that hold bytes offset .. offset + nbytes of the mapping."""
    first_page = offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, first_page, offset + nbytes - first_page)


STREAMED = 64 * 1024   # bytes: a layer with no weight this large (a norm: a few KB) keeps its pages


@contextmanager
def streaming(module: nn.Module, skip: Callable[[nn.Module], bool] = lambda layer: False):
    """Within the block, each layer of `module` (each module without submodules that has a weight of STREAMED bytes
    or more) releases its mapped pages right after its forward. Small layers (norms: a few KB) keep theirs, as do
    the layers skip(layer) names (those that compute from a copy, leaving the file's pages untouched): system calls
    at each of their calls would cost more than they save (at 64x64, 30 ms of a 160 ms bf16 UNet step)."""
    layers = [m for m in module.modules()
              if next(m.children(), None) is None and any(p.nbytes >= STREAMED for p in m.parameters())]

    def after(layer: nn.Module, inputs, output) -> None:
        if not skip(layer):
            release(layer)

    hooks = [layer.register_forward_hook(after) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
