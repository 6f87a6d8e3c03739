"""The CPU fast path of the UNet's convolutions: weights reordered for oneDNN once, not at every step.

On the CPU, PyTorch runs a convolution with oneDNN, which computes on weights in a blocked layout (ABcd16b16a for
fp32: 16x16 tiles of output x input channels). F.conv2d reorders the weight from PyTorch's OIHW layout into it at
every call: for SD 1.5's UNet that is 2.4 GB (fp32) of weights copied at every step, about 6 % of the step's time on
this machine, most of it in the 1280-channel convolutions at 8x8 and 16x16 latents, where there is little else to do.

`pack_convolutions(unet)` (the pipeline calls it before its loop) gives each Conv2d a copy of its weight in that
layout, which its forward then passes to oneDNN's own convolution operator (the one torch.compile's weight
prepacking uses); the output is channels-last, which the following layers keep. It packs only weights that are
views of a mapped checkpoint file, and hands their pages back to the page cache (weights.release): the packed copy
replaces the weight in memory instead of adding to it. Weights held in process memory (cast to another dtype at
load, or changed) keep the plain path. The results agree with F.conv2d's to float rounding, not bit for bit (the
sums run in another order); tests/test_unet.py checks both paths against the reference.
"""
import torch
from torch import nn

from .weights import mapping, release

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that runs on `packed`, its weight in oneDNN's layout, when
    that is a copy of the weight as it is now and no gradient is wanted."""
    packed: torch.Tensor | None = None
    packed_from: tuple[int, int] | None = None  # (address, version) of the weight that `packed` copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or torch.is_grad_enabled() or self.packed_from != weight_state(self.weight):
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, "none", [], "")


def weight_state(weight: torch.Tensor) -> tuple[int, int]:
    """Changes when the weight is replaced (module.to) or changed in place."""
    return weight.data_ptr(), weight._version


def pack_convolutions(module: nn.Module) -> None:
    """Pack the weights of `module`'s Conv2d layers that are untouched views of a mapped file; drop stale packs."""
    for conv in module.modules():
        if not isinstance(conv, Conv2d) or conv.packed_from == weight_state(conv.weight):
            continue
        conv.packed, conv.packed_from = None, None
        if AVAILABLE and conv.weight.device.type == "cpu" and mapping(conv.weight) is not None:
            conv.packed = torch.ops.mkldnn._reorder_convolution_weight(conv.weight, conv.padding, conv.stride,
                                                                       conv.dilation, conv.groups, None)
            conv.packed_from = weight_state(conv.weight)
            release(conv)
