"""Model cost: parameters and multiply-adds, counted the way the published tables count them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import X3D, X3DConfig


def count_params(model: nn.Module, *, batchnorm: bool = True) -> int:
    """Parameters; ``batchnorm=False`` leaves out BN's weight and bias, as the X3D paper counts them."""
    skip = () if batchnorm else (nn.modules.batchnorm._BatchNorm,)
    return sum(
        p.numel() for m in model.modules() if not isinstance(m, skip) for p in m.parameters(recurse=False)
    )


def count_macs(config: X3DConfig, input_size: tuple[int, int, int] | None = None) -> int:
    """Multiply-adds of Conv3d and Linear layers for one clip of ``(T, H, W)`` (default: the
    training clip). BN, activations, SE pooling, residual adds and pooling are not counted: that is
    the convention of the paper and SlowFast's MODEL_ZOO ("FLOPs" there means multiply-adds).

    Runs on the meta device: shapes only, no arithmetic, so it is instant for any size."""
    t, h, w = input_size or (config.frames, config.train_crop, config.train_crop)
    with torch.device("meta"):
        model = X3D(config).eval()
        clip = torch.empty(1, 3, t, h, w)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(clip)
    return counter.get_total_flops() // 2  # the counter reports 2 FLOPs per multiply-add
