"""Batch norms folded into the convolutions that feed them, for inference.

In eval mode a batch norm is a fixed per-channel affine map, ``y = x * s + t``, run as a pass of
its own over every activation it sees. Right after a convolution it can be merged into that
convolution's weight and bias (``W' = W * s``, ``b' = b * s + t``): the same function, up to float
rounding, without the batch norm's pass. On an H200, torch's profiler puts the default model's
batch norms at 16.5% of its GPU time in fp32 and 17.0% in fp16 with channels-last (as much as
the convolutions there: benchmarks/results/2026-11-26-h200-levers-bare-model.txt).

Only pairs whose data flow is known from torchvision's own modules are folded: consecutive
children of an ``nn.Sequential`` (``Conv2dNormActivation``, ResNet's downsample) or of the
``IntermediateLayerGetter`` that runs a backbone's stem in order, and ``convN`` → ``bnN`` inside
ResNet's blocks. For the supported torchvision detectors that is every batch norm.
"""

from __future__ import annotations

import torch
from torch import nn


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every batch norm a convolution feeds directly into it (the norm becomes an
    ``nn.Identity``); how many were folded. The model must be in eval mode: a batch norm in
    training mode normalises with each batch's own statistics and cannot be folded."""
    if any(isinstance(m, nn.BatchNorm2d) and m.training for m in model.modules()):
        raise ValueError("batch norms can only be folded in eval mode (model.eval())")
    folded = 0
    for parent in list(model.modules()):
        for conv_name, norm_name in _pairs(parent):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            if _foldable(conv, norm):
                _fold_into(conv, norm)
                setattr(parent, norm_name, nn.Identity())
                folded += 1
    return folded


def batch_norms(model: nn.Module) -> int:
    """Batch norms (regular or frozen) left in ``model``."""
    return sum(isinstance(m, _norm_types()) for m in model.modules())


def _pairs(parent: nn.Module) -> list[tuple[str, str]]:
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(parent, (nn.Sequential, IntermediateLayerGetter)):
        names = list(parent._modules)  # both run their children in this order, each on the last
        return list(zip(names, names[1:]))
    if isinstance(parent, (Bottleneck, BasicBlock)):  # bnN(convN(x)) in their forward
        return [(f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(parent, f"bn{i}")]
    return []


def _norm_types() -> tuple[type, ...]:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return (nn.BatchNorm2d, FrozenBatchNorm2d)


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d or not isinstance(norm, _norm_types()):
        return False
    if isinstance(norm, nn.BatchNorm2d) and norm.running_mean is None:
        return False  # track_running_stats=False: it always normalises with batch statistics
    return norm.running_mean.numel() == conv.out_channels


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: nn.Module) -> None:
    """The arithmetic in float64, so the folded weights carry one rounding, not three."""
    channels = conv.out_channels
    weight = conv.weight.double()
    bias = conv.bias.double() if conv.bias is not None else weight.new_zeros(channels)
    gamma = norm.weight.double() if norm.weight is not None else weight.new_ones(channels)
    beta = norm.bias.double() if norm.bias is not None else weight.new_zeros(channels)
    scale = gamma * torch.rsqrt(norm.running_var.double() + norm.eps)
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter((weight * scale.reshape(-1, 1, 1, 1)).to(dtype))
    conv.bias = nn.Parameter(((bias - norm.running_mean.double()) * scale + beta).to(dtype))
