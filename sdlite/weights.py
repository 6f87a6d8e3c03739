"""Checkpoint weights memory-mapped from safetensors files: reading them, and handing their pages back.

A tensor stored in the dtype it is used in is a view of the mapped file, never a copy: its pages are read from disk
(or the page cache) when first used, and `release` can drop them from the process again between uses. The pipeline
runs the UNet and the VAE `streaming`: every layer hands its pages back right after it has run, so that the process
holds the weights of the layer at work rather than those of all three networks (the fp32 SD 1.5 weights are 4.3 GB, of
which the UNet is 3.4 GB). Reading them back from the page cache at every step costs no time we could measure.
"""
import itertools
import json
import mmap
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

# The files read_safetensors mapped, by the address where each mapping starts (the data pointer of the storage that
# all of a file's tensors share); an entry goes when its mapping is gone.
MAPPINGS: "weakref.WeakValueDictionary[int, mmap.mmap]" = weakref.WeakValueDictionary()

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The format: the header's length (8 bytes, little-endian), the JSON header (each tensor's dtype, shape and byte
    range in the data), the data. The file is memory-mapped (copy-on-write) and each tensor is a view of its bytes:
    one already in `dtype` is used in place, never copied, its pages read from disk when first used; one cast to
    `dtype` is read once and its pages are released right after (madvise), so that a bf16 load of an fp32 file
    holds the bf16 weights only, never the fp32 ones as well."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    header_size = int.from_bytes(mapped[:8], "little")
    header = json.loads(mapped[8:8 + header_size])
    header.pop("__metadata__", None)
    begin = 8 + header_size                                            # where the data starts in the file
    whole = torch.frombuffer(mapped, dtype=torch.uint8)
    MAPPINGS[whole.untyped_storage().data_ptr()] = mapped
    data = whole[begin:]
    if max((info["data_offsets"][1] for info in header.values()), default=0) > len(data):
        raise ValueError("the data ends before the last tensor")
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        stored = data[start:end].view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        tensors[name] = cast(stored, dtype)
        if tensors[name] is not stored:
            drop_pages(mapped, begin + start, stored.nbytes)
    return tensors


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


@contextmanager
def streaming(module: nn.Module):
    """Within the block, each layer of `module` (each module without submodules that has weights) releases its
    mapped pages right after its forward."""
    layers = [m for m in module.modules() if next(m.children(), None) is None and next(m.parameters(), None) is not None]
    hooks = [layer.register_forward_hook(lambda layer, inputs, output: release(layer)) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
