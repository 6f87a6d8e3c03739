"""The CPU fast paths, applied to built models from outside: the model files describe the architecture only.

    with runtime.running(pipe.unet, packed_convolutions=True):   # one stage of the pipeline
        eps = pipe.unet(x, t, context)

`running(module)` does for the block what the module kind needs:
  UNet            convolutions on weights packed for oneDNN (below); each layer's pages streamed
  AutoencoderKL   encoder and decoder inputs in the channels-last memory format (below); pages streamed
  text encoder    its pages released after the block (it runs twice, once per prompt: streaming would read them back)
Streaming (weights.py): each layer hands the pages of its memory-mapped weights back to the OS right after it has run,
so that a call holds the weights of one layer at a time.

Packed convolutions. On the CPU, PyTorch runs a convolution with oneDNN, which computes on weights in a blocked layout
(ABcd16b16a for fp32: 16x16 tiles of output x input channels). F.conv2d reorders the weight from PyTorch's OIHW layout
into it at every call: for SD 1.5's UNet that is 2.4 GB (fp32) of weights copied at every step, about 6 % of the
step's time on this machine, most of it in the 1280-channel convolutions at 8x8 and 16x16 latents, where there is
little else to do. A weight packed without knowing the input does not help: oneDNN then reorders it again to the
layout it wants. So each nn.Conv2d of the UNet becomes a PackedConv2d, which makes, at its first call, a copy of its
weight in the layout oneDNN picks for that input shape (inductor's weight prepacking does the same), and passes it to
oneDNN's own convolution operator from then on; the output is channels-last, which the following layers keep. This is
8 % faster per fp32 UNet step (4 % in bf16) on this machine; the first step pays for the copies (about 4 s in fp32,
most of it the OS handing out 2.4 GB of fresh pages). Only weights that are views of a mapped checkpoint file are
packed, and their pages go back to the page cache (weights.release): the packed copy replaces the weight in memory
instead of adding to it. Weights held in process memory (cast to another dtype at load, or changed) keep the plain
path. The results agree with F.conv2d's to float rounding, not bit for bit (the sums run in another order);
tests/test_unet.py checks both paths against the reference. packed_convolutions=False turns the layers back into
plain nn.Conv2d, whose fp32 results are bit-identical to diffusers' UNet.

Channels-last VAE. With its inputs channels-last (N, H, W, C in memory; the shapes stay N, C, H, W), every layer of
the VAE keeps that layout, and oneDNN's convolutions take it as it is, where each convolution of an NCHW tensor costs
two reorders of its activations: a 512x512 decode is 13 % faster in fp32 and 15 % in bf16 on this machine. The sums
in the convolutions then run in another order than in diffusers: the results agree to float rounding (about 2e-5
relative at full size in fp32), no longer bit for bit.
"""
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .clip import CLIPTextModel
from .unet import UNet
from .vae import AutoencoderKL
from .weights import mapping, release, streaming

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


@contextmanager
def running(module: nn.Module, packed_convolutions: bool = True):
    """Within the block, `module` (a UNet, a VAE or a text encoder) runs on the fast paths its kind has."""
    with ExitStack() as stack:
        if isinstance(module, UNet):
            pack_convolutions(module, packed_convolutions)   # weights reordered once, not at every step
        if isinstance(module, AutoencoderKL):
            for part in (module.encoder, module.post_quant_conv):
                hook = part.register_forward_pre_hook(lambda part, inputs: channels_last(inputs))
                stack.callback(hook.remove)
        if isinstance(module, CLIPTextModel):
            stack.callback(release, module)
        else:
            stack.enter_context(streaming(module))
        yield


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
    """Make `module`'s convolutions PackedConv2d (on the CPU, where oneDNN is available), or plain nn.Conv2d again.

    Each layer stays the same object, only its class changes (PackedConv2d adds no parameter): what holds on to a layer
    (a merged LoRA's record of its original weight, streaming's hooks) keeps finding it."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            packing = on and AVAILABLE and conv.weight.device.type == "cpu"
            if not packing and isinstance(conv, PackedConv2d):
                conv.__dict__.pop("packed", None)
                conv.__dict__.pop("packed_for", None)
            conv.__class__ = PackedConv2d if packing else nn.Conv2d
