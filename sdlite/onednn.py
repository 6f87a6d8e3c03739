"""The CPU fast path of the UNet's convolutions: weights reordered for oneDNN once, not at every step.

On the CPU, PyTorch runs a convolution with oneDNN, which computes on weights in a blocked layout (ABcd16b16a for
fp32: 16x16 tiles of output x input channels). F.conv2d reorders the weight from PyTorch's OIHW layout into it at
every call: for SD 1.5's UNet that is 2.4 GB (fp32) of weights copied at every step, about 6 % of the step's time on
this machine, most of it in the 1280-channel convolutions at 8x8 and 16x16 latents, where there is little else to do.
A weight packed without knowing the input does not help: oneDNN then reorders it again to the layout it wants.

After `pack_convolutions(unet)` (the pipeline calls it before its loop) each Conv2d makes, at its first call, a copy
of its weight in the layout oneDNN picks for that input shape (inductor's weight prepacking does the same), and
passes it to oneDNN's own convolution operator from then on; the output is channels-last, which the following layers
keep. This is 8 % faster per fp32 UNet step (4 % in bf16) on this machine; the first step pays for the copies
(about 4 s in fp32, most of it the OS handing out 2.4 GB of fresh pages). Only weights that are views of a mapped
checkpoint file are packed, and their pages go back to the page cache (weights.release): the packed copy replaces
the weight in memory instead of adding to it. Weights held in process memory (cast to another dtype at load, or
changed) keep the plain path. The results agree with F.conv2d's to float rounding, not bit for bit (the sums run in
another order); tests/test_unet.py checks both paths against the reference.
"""
import torch
from torch import nn

from .weights import mapping, release

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that, once `packing` is on and no gradient is wanted, runs on
    `packed`: its weight in the layout oneDNN picks for inputs of the shape at hand, made at the first such call."""
    packing = False
    packed: torch.Tensor | None = None
    packed_for: tuple | None = None  # ((address, version) of the weight, input shape) that `packed` was decided for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packing or torch.is_grad_enabled():
            return super().forward(x)
        key = (weight_state(self.weight), tuple(x.shape))
        if self.packed_for != key:
            self.packed, self.packed_for = None, key
            if mapping(self.weight) is not None:   # a view of the file (else a copy would cost memory)
                try:
                    self.packed = torch.ops.mkldnn._reorder_convolution_weight(
                        self.weight, self.padding, self.stride, self.dilation, self.groups, list(x.shape))
                except RuntimeError:               # a dtype this CPU's oneDNN cannot pack (fp16 without AVX-512
                    pass                           # FP16 or AVX-NE-CONVERT): the plain path
                else:
                    release(self)                  # the copy is used from now on: the file's pages can go
        if self.packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, "none", [], "")


def weight_state(weight: torch.Tensor) -> tuple[int, int]:
    """Changes when the weight is replaced (module.to) or changed in place."""
    return weight.data_ptr(), weight._version


def pack_convolutions(module: nn.Module, on: bool = True) -> None:
    """Turn packing on (on the CPU, where oneDNN is available) or off for `module`'s Conv2d layers."""
    for conv in module.modules():
        if isinstance(conv, Conv2d):
            conv.packing = on and AVAILABLE and conv.weight.device.type == "cpu"
            if not conv.packing:
                conv.packed = conv.packed_for = None
