"""X3D computed in horizontal bands: the same function, laid out so that a CPU runtime keeps the wide,
early tensors in cache. The OpenVINO engine compiles this form.

Block 0 of each stage widens its input (X3D-M's res2.0: 24 to 54 channels at 112 x 112, 43 MB per
16-frame clip in fp32) and its depthwise conv reads that back at stride 2; res2's other blocks move
11 MB tensors through four layers. Layer by layer, those tensors stream through main memory: on a
2-core machine these layers ran at a fifth to a half of the speed (multiply-adds per second) of the
later ones. Computed in bands of rows, one band through conv_a, the depthwise conv and conv_c before
the next, they stay in cache.

Rows at band edges: a 3x3x3 depthwise conv needs one neighbouring row on each side (two input rows at
stride 2, and the stem's stride-2 conv doubles that again), so each band recomputes those few rows of
the cheap layers before it. Zero padding is applied only at the clip's own top and bottom edges.
Squeeze-excitation gates rows with the mean of the whole depthwise output, so an SE block keeps its
bands' depthwise outputs, adds up their means, then gates and finishes band by band.

Every band has its own copy of the weights: OpenVINO fuses a bias and activation into a conv only when
the conv's weights are its own. The function is the model's up to fp32 rounding (summation order of
the SE mean); ``tests/test_banding.py`` checks it, and every engine is checked against eager anyway.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import X3D, Block, Stem, fold_batchnorm

# Sizes in bytes of a block's widened tensor (conv_a's output, per clip, in fp32): a block whose widened
# tensor is larger than BAND_BYTES[2] is computed in bands of about BAND_BYTES[its stride] each. Chosen on
# X3D-M at 16 x 224 x 224 with OpenVINO on 2 cores: plans with 0.7 to 1.5 times as many bands ran alike
# within this machine's noise (fp32 1.13 to 1.19 times the plain graph); banding nearly every block, in
# bands of a sixth to a third of these sizes, ran bf16 5 to 20% slower than the plain graph.
BAND_BYTES = {2: 6 * 2**20, 1: 3 * 2**20}
MIN_ROWS = 2  # rows per band at the least


def _rows_out(rows: int, stride: int) -> int:
    """Output rows of a 3-tap conv with padding 1."""
    return (rows - 1) // stride + 1


def _rows_in(first: int, stop: int, rows: int, stride: int) -> tuple[int, int, int, int]:
    """Input rows ``[begin, end)`` that output rows ``[first, stop)`` of a 3-tap conv (padding 1) read,
    and the zero rows to pad above and below (where they fall outside the ``rows`` input rows)."""
    begin, end = first * stride - 1, (stop - 1) * stride + 2
    return max(begin, 0), min(end, rows), max(0, -begin), max(0, end - rows)


def _split(rows: int, bands: int) -> list[tuple[int, int]]:
    edges = [round(i * rows / bands) for i in range(bands + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def count_bands(block: Block, frames: int, rows: int, cols: int, stride: int) -> int:
    """How many bands ``block`` is computed in, for a block input of ``rows`` x ``cols`` (1: as a whole)."""
    widened = block.conv_a.out_channels * frames * rows * cols * 4
    if widened <= BAND_BYTES[2]:
        return 1
    return max(1, min(math.ceil(widened / BAND_BYTES[stride]), _rows_out(rows, stride) // MIN_ROWS))


class _Band(nn.Module):
    """The weights one band computes with (copies: see the module's docstring)."""

    def __init__(self, block: Block, stem: Stem | None) -> None:
        super().__init__()
        self.conv_a, self.conv_b, self.conv_c = (copy.deepcopy(getattr(block, f"conv_{k}")) for k in "abc")
        self.shortcut = copy.deepcopy(block.shortcut)
        self.stem = copy.deepcopy(stem)


class BandedBlock(nn.Module):
    """A folded ``Block`` (and, for res2.0, the folded stem before it) computed in bands of rows."""

    def __init__(self, block: Block, *, rows: int, bands: int, stem: Stem | None = None, clip_rows: int = 0) -> None:
        super().__init__()
        self.stride = block.conv_b.stride[1]
        self.rows = rows  # input rows of the block (the stem's output rows when it starts with the stem)
        self.se = block.se
        self.out_rows = _rows_out(rows, self.stride)
        # Per band: its output rows [first, stop), the input rows [begin, end) they read, the zero rows to pad.
        self.plan = [(first, stop, *_rows_in(first, stop, rows, self.stride))
                     for first, stop in _split(self.out_rows, bands)]
        # For the stem: the clip rows each band's stem rows read (the stem's spatial conv is 3-tap, stride 2).
        self.stem_plan = [_rows_in(begin, end, clip_rows, 2) for _, _, begin, end, _, _ in self.plan] if stem else []
        self.bands = nn.ModuleList(_Band(block, stem) for _ in self.plan)

    def _stem(self, band: _Band, clips: Tensor, rows: tuple[int, int, int, int]) -> Tensor:
        begin, end, above, below = rows
        x = clips[:, :, :, begin:end]
        if above or below:
            x = F.pad(x, (0, 0, above, below))
        conv = band.stem.conv_spatial
        x = F.conv3d(x, conv.weight, conv.bias, conv.stride, (0, 0, conv.padding[2]))
        return F.relu(band.stem.bn(band.stem.conv_temporal(x)))

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        outs, kept, means = [], [], []
        for i, (band, (first, stop, begin, end, above, below)) in enumerate(zip(self.bands, self.plan, strict=True)):
            rows = self._stem(band, x, self.stem_plan[i]) if self.stem_plan else x[:, :, :, begin:end]
            # The shortcut: output rows [first, stop) of a 1x1x1 conv at stride s, or the rows themselves.
            shortcut = rows[:, :, :, first * s - begin:(stop - 1) * s - begin + 1:s]
            if band.shortcut is not None:  # a 1x1x1 conv: its stride is done by the slicing
                conv = band.shortcut
                shortcut = F.conv3d(shortcut[:, :, :, :, ::s] if s > 1 else shortcut, conv.weight, conv.bias)
            y = F.relu(band.conv_a(rows))
            if above or below:
                y = F.pad(y, (0, 0, above, below))
            conv = band.conv_b
            y = F.conv3d(y, conv.weight, conv.bias, conv.stride, (conv.padding[0], 0, conv.padding[2]), 1, conv.groups)
            if self.se is None:
                outs.append(F.relu(shortcut + band.conv_c(F.silu(y))))
            else:
                kept.append((y, shortcut))
                means.append(y.mean((2, 3, 4)) * ((stop - first) / self.out_rows))
        if self.se is not None:
            mean = means[0]
            for m in means[1:]:
                mean = mean + m
            gate = self.se.fc2(F.relu(self.se.fc1(mean))).sigmoid()[:, :, None, None, None]
            outs = [F.relu(sc + band.conv_c(F.silu(y * gate))) for band, (y, sc) in zip(self.bands, kept, strict=True)]
        return torch.cat(outs, 3)


class BandedX3D(nn.Module):
    """``model`` with BN folded and its wide blocks computed in bands, for clips of ``input_shape``
    (T, H, W); any batch size. ``forward`` returns what ``X3D.forward`` returns, up to fp32 rounding."""

    def __init__(self, model: X3D, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model = fold_batchnorm(model)
        frames, rows, cols = input_shape
        rows, cols = _rows_out(rows, 2), _rows_out(cols, 2)  # the stem's output
        layers: list[nn.Module] = []
        for stage in (model.res2, model.res3, model.res4, model.res5):
            for block in stage:
                stride = block.conv_b.stride[1]
                bands = count_bands(block, frames, rows, cols, stride)
                first = not layers
                if bands > 1:
                    layers.append(BandedBlock(block, rows=rows, bands=bands, stem=model.stem if first else None,
                                              clip_rows=input_shape[1]))
                else:
                    layers += [model.stem, block] if first else [block]
                rows, cols = _rows_out(rows, stride), _rows_out(cols, stride)
        self.layers = nn.Sequential(*layers)

    @property
    def banded(self) -> int:
        """How many blocks are computed in bands."""
        return sum(isinstance(layer, BandedBlock) for layer in self.layers)

    def forward(self, clips: Tensor) -> Tensor:
        m = self.model
        return m.forward_head(F.relu(m.conv5_bn(m.conv5(self.layers(clips)))))
