"""The tolerance of parity tests between two float32 computations of the same network."""
import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps
ROUNDING_LAYERS = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


def float_rounding_tolerance(model: nn.Module) -> float:
    """The largest relative error (max |ours - theirs| / max |theirs|) that float32 rounding alone explains between
    sdlite's and the reference's computation of `model`, on whatever kernels this CPU picks (oneDNN, MKL and SIMD
    widths sum in different orders). Each layer with weights rounds its result at about float32 epsilon relative
    (the kernels' blocked and pairwise sums keep a long sum's error near that); the errors of the layers add along
    the path from input to output, which passes each layer at most once; and both computations err:
    2 * layers * eps32. (About 1e-5 to 5e-5 for the fixtures; the UNet's measured errors are up to 4.0e-6 on any
    of the kernels .ci/run tries.)"""
    layers = sum(isinstance(m, ROUNDING_LAYERS) for m in model.modules())
    return 2 * layers * EPS32
