"""Small pieces the model definitions share."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Convolutions without TF32 on CUDA, so a table extracted on GPUs matches one extracted on
    CPUs (rows from both can end up in one dataset): the detector's boxes and the regressor's
    coefficients alike. Costs little at these model sizes."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv whose weights and bias include the (eval-mode) batch norm that follows it: the
    inference copies of the detector and the regressor run one pass fewer over each activation."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, groups=conv.groups, bias=True,
                      device=conv.weight.device, dtype=conv.weight.dtype)  # stays on the model's device
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused
