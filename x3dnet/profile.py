"""Model cost: parameters and multiply-adds, counted the way the published tables count them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .model import VARIANTS, X3D, X3DConfig
from .recipe import RECIPES


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


def size_table() -> list[dict[str, object]]:
    """Every variant's clip, depth, parameters and multiply-adds at its training and 3-crop test sizes."""
    rows = []
    for name, config in VARIANTS.items():
        test = RECIPES[name].test_crop
        with torch.device("meta"):  # shapes only: counting needs no arithmetic
            model = X3D(config)
        rows.append({
            "model": name + (" (derived)" if config.derived else ""),
            "clip": RECIPES[name].clip,
            "blocks": ",".join(map(str, config.depths)),
            "params_m": round(count_params(model) / 1e6, 3),
            "params_m_no_bn": round(count_params(model, batchnorm=False) / 1e6, 3),
            "gmacs_train": round(count_macs(config) / 1e9, 4),
            "train_input": f"{config.frames}x{config.train_crop}^2",
            "gmacs_test": round(count_macs(config, (config.frames, test, test)) / 1e9, 4),
            "test_input": f"{config.frames}x{test}^2",
        })
    return rows
