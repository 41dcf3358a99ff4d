"""The X3D network: one config dataclass, one table of variants, the forward pass written out.

Numerically the same function as the original (facebookresearch/SlowFast ``X3D``) in eval mode, with
one deliberate difference in what ``forward`` returns: the original returns probabilities in eval and
logits in train; ours always returns scores whose softmax is the original's output (see ``X3D.forward``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, require_float, require_int, require_ints
from .recipe import MAX_FRAMES, MAX_SIZE

HeadPooling = Literal["window", "global"]


@dataclass(frozen=True)
class X3DConfig:
    """Everything that defines an X3D network. Defaults are X3D-M's."""

    name: str = "x3d_m"
    # Training clip: the head pools over fixed windows of (frames, ceil(train_crop/32)^2) positions, as
    # the original does, so these two set the head, and through it what larger inputs compute.
    frames: int = 16
    train_crop: int = 224
    stem_width: int = 24
    depths: tuple[int, ...] = (3, 5, 11, 7)  # blocks in res2..res5
    widths: tuple[int, ...] = (24, 48, 96, 192)  # block output widths of res2..res5
    inner_widths: tuple[int, ...] = (54, 108, 216, 432)  # channel-wise 3x3x3 width, int(2.25 * width)
    se_widths: tuple[int, ...] = (8, 8, 16, 32)  # squeeze-excitation hidden width per stage
    head_width: int = 2048  # fc1 (the original's lin_5, "DIM_C5")
    num_classes: int = 400
    # "window": the original's fixed AvgPool3d((frames, k, k), stride 1) with k = ceil(train_crop/32);
    # a larger input gives several windows whose softmaxes are averaged. "global": adaptive average
    # pooling to one window (mmaction2's choice); identical to "window" at the training crop.
    head_pooling: HeadPooling = "window"
    dropout: float = 0.5  # before fc2, training only
    derived: bool = False  # True for sizes with no published configuration (X3D-XL)

    def __post_init__(self) -> None:
        # Every field is checked here, once: configs also come from files, and a file must not be able to
        # size a network (or a clip) beyond reason before anything else looks at it.
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.name, str) or not 0 < len(self.name) <= 100:
            raise ConfigError(f"name: must be a short string, not {self.name!r}"[:200])
        put("frames", require_int("frames", self.frames, 1, MAX_FRAMES))
        put("train_crop", require_int("train_crop", self.train_crop, 1, MAX_SIZE))
        put("stem_width", require_int("stem_width", self.stem_width, 1, 4096))
        put("depths", require_ints("depths", self.depths, 4, 1, 100))
        for name in ("widths", "inner_widths", "se_widths"):
            put(name, require_ints(name, getattr(self, name), 4, 1, 8192))
        put("head_width", require_int("head_width", self.head_width, 1, 65536))
        put("num_classes", require_int("num_classes", self.num_classes, 1, 100_000))
        put("dropout", require_float("dropout", self.dropout, 0.0, 1.0))
        if self.dropout == 1.0:
            raise ConfigError("dropout: must be below 1 (1 drops every feature), not 1.0")
        if self.head_pooling not in ("window", "global"):
            raise ConfigError(f"head_pooling must be 'window' or 'global', not {self.head_pooling!r}"[:200])
        if not isinstance(self.derived, bool):
            raise ConfigError(f"derived: must be true or false, not {self.derived!r}"[:200])

    @property
    def conv5_width(self) -> int:
        # The original sizes conv_5 as the last stage's inner width (its "dim_inner"), not separately.
        return self.inner_widths[-1]

    @property
    def head_window(self) -> tuple[int, int, int]:
        side = math.ceil(self.train_crop / 32)  # 312 -> 10: ceil, not floor (spec pitfall 7)
        return (self.frames, side, side)

    def architecture(self) -> dict[str, object]:
        """The fields that decide the tensors of a checkpoint (not the head window or the classes)."""
        names = ("stem_width", "depths", "widths", "inner_widths", "se_widths", "head_width")
        return {n: getattr(self, n) for n in names}

    def replace(self, **changes: object) -> X3DConfig:
        return dataclasses.replace(self, **changes)


def _round_width(width: float, factor: float, *, minimum: int = 8, divisor: int = 8) -> int:
    # The 2020 SlowFast rule (also pytorchvideo's and mmaction2's). SlowFast HEAD applies the width
    # factor with divisor 1, which differs for factors other than 2.0 (spec pitfall 5).
    x = width * factor
    out = max(minimum, int(x + divisor / 2) // divisor * divisor)
    if out < 0.9 * x:
        out += divisor
    return int(out)


def derive_config(
    name: str,
    *,
    width_factor: float,
    depth_factor: float,
    bottleneck_factor: float = 2.25,
    base_width: int = 12,
    head_width: int = 2048,
    frames: int,
    train_crop: int,
    num_classes: int = 400,
) -> X3DConfig:
    """Apply the X3D expansion rules (2020 SlowFast code) to get the widths and depths of a new size.

    The published sizes are hard-coded in ``VARIANTS`` instead (spec pitfalls 5 and 6); this exists to
    build sizes with no published configuration, and the tests check it reproduces the table.
    """
    bases = [base_width]  # res2 keeps the stem's base width (SCALE_RES2 is False)
    for _ in range(3):
        bases.append(_round_width(bases[-1], 2.0))
    widths = tuple(_round_width(b, width_factor) for b in bases)
    inner = tuple(int(bottleneck_factor * w) for w in widths)  # truncation, as the original
    return X3DConfig(
        name=name,
        frames=frames,
        train_crop=train_crop,
        stem_width=_round_width(base_width, width_factor),
        # float64, as the original: ceil(2.2 * 5) is 11 here but 12 if 2.2 went through float32.
        depths=tuple(math.ceil(depth_factor * r) for r in (1, 2, 5, 3)),
        widths=widths,
        inner_widths=inner,
        se_widths=tuple(_round_width(c, 1 / 16) for c in inner),
        head_width=head_width,
        num_classes=num_classes,
        derived=True,
    )


_SMALL = {"depths": (3, 5, 11, 7), "widths": (24, 48, 96, 192), "inner_widths": (54, 108, 216, 432)}
VARIANTS: dict[str, X3DConfig] = {
    "x3d_xs": X3DConfig("x3d_xs", frames=4, train_crop=160, **_SMALL),
    "x3d_s": X3DConfig("x3d_s", frames=13, train_crop=160, **_SMALL),
    "x3d_m": X3DConfig("x3d_m", frames=16, train_crop=224, **_SMALL),
    "x3d_l": X3DConfig("x3d_l", frames=16, train_crop=312, depths=(5, 10, 25, 15)),
    # No published config: the paper's XL figures (35.84 / 48.42 GMACs, 11.0M params without BN) are
    # reproduced by width factor 2.9 and depth factor 5.0 with divisor-8 rounding (spec section 2).
    "x3d_xl": X3DConfig(
        "x3d_xl",
        frames=16,
        train_crop=312,
        stem_width=32,
        depths=(5, 10, 25, 15),
        widths=(32, 72, 136, 280),
        inner_widths=(72, 162, 306, 630),
        se_widths=(8, 16, 24, 40),
        derived=True,
    ),
}


def get_config(name: str, **overrides: object) -> X3DConfig:
    """The config of a variant (``"x3d_m"``; ``"X3D-M"`` and ``"m"`` work too), with fields replaced."""
    key = name.lower().replace("-", "_")
    key = key if key.startswith("x3d_") else f"x3d_{key}"
    if key not in VARIANTS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[key].replace(**overrides)


class _ChannelwiseConv3dFunction(torch.autograd.Function):
    """A channel-wise conv3d (groups = channels, no bias) whose backward is forward convs and per-tap
    products. Torch's CPU backward for grouped 3-D convs took 5-10 times its forward's time, and on X3D-XS
    two thirds of a training step (``benchmarks/bench_train.py`` measures the whole step)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv3d(x, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        # Each gradient in its tensor's memory format: a contiguous gradient meeting channels-last tensors
        # made every elementwise backward after it take torch's slow mixed-stride path (ReLU's 3.4x slower).
        if ctx.needs_input_grad[0]:
            grad_x = _channelwise_grad_input(grad, weight, x.shape, ctx.stride, ctx.padding, _layout(x))
        if ctx.needs_input_grad[1]:
            grad_w = _channelwise_grad_weight(grad, x, weight.shape, ctx.stride, ctx.padding)
            grad_w = grad_w.contiguous(memory_format=_layout(weight))
        return grad_x, grad_w, None, None


def _layout(t: Tensor) -> torch.memory_format:
    """Channels-last 3-D where ``t`` is laid out so (and is not also plain contiguous), else contiguous."""
    last = t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
    return torch.channels_last_3d if last else torch.contiguous_format


def _channelwise_grad_input(grad: Tensor, weight: Tensor, size, stride, padding,
                            layout: torch.memory_format = torch.contiguous_format) -> Tensor:
    """d/dx of a channel-wise conv, one phase of the input at a time (one phase where the stride is 1).

    Along one dimension, input position ``i + s*u`` (phase ``i`` of stride ``s``) receives output ``o``
    through tap ``k`` where ``s*o + k - p = i + s*u``: the taps ``k = r, r + s, ...`` with ``r = (i + p) % s``,
    from outputs ``u + q - m`` with ``q = (i + p) // s``. So each phase is a stride-1 correlation of the
    gradient with those taps reversed, the gradient padded ``len(taps) - 1 - q`` before (a negative pad crops).
    The result is laid out in ``layout``.
    """
    out = torch.empty(size, dtype=grad.dtype, device=grad.device, memory_format=layout).zero_()
    phases = itertools.product(*(range(s) for s in stride))
    for phase in phases:
        taps, pads, lengths = [], [], []
        for dim, (i, s, p) in enumerate(zip(phase, stride, padding)):
            r, q = (i + p) % s, (i + p) // s
            k = len(range(r, weight.shape[2 + dim], s))
            n = len(range(i, size[2 + dim], s))  # input positions in this phase
            before = k - 1 - q
            taps.append(slice(r, None, s))
            pads.append((before, n + k - 1 - grad.shape[2 + dim] - before))
            lengths.append(n)
        if 0 in lengths:
            continue
        kernel = weight[:, :, taps[0], taps[1], taps[2]]
        if 0 in kernel.shape:
            continue  # no tap reaches this phase: its gradient is zero
        padded = F.pad(grad, [p for pair in reversed(pads) for p in pair])
        part = F.conv3d(padded, kernel.flip(2, 3, 4), None, 1, 0, 1, weight.shape[0])
        out[:, :, phase[0] :: stride[0], phase[1] :: stride[1], phase[2] :: stride[2]] = part
    return out


def _channelwise_grad_weight(grad: Tensor, x: Tensor, shape, stride, padding) -> Tensor:
    """d/dw[c, k] of a channel-wise conv: the sum over samples and output positions of the gradient times
    the input at the tap's offset. The padded input is split into its stride phases, so that every tap
    reads a window of one phase in unit steps, a few samples at a time (about 4 MB) so that the passes
    over them stay in cache."""
    kernel, channels, out = shape[2:], shape[0], grad.shape[2:]
    padded = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    # Summed in at least fp32 (bf16 sums of thousands of products would lose the gradient's low bits).
    taps = grad.new_zeros(math.prod(kernel), channels, dtype=torch.promote_types(grad.dtype, torch.float32))
    chunk = max(1, (1 << 20) // grad[0].numel())
    for n in range(0, grad.shape[0], chunk):
        g, p = grad[n : n + chunk], padded[n : n + chunk]
        phases: dict[tuple[int, ...], Tensor] = {}
        product = torch.empty_like(g)
        for k, tap in enumerate(itertools.product(*map(range, kernel))):
            phase = tuple(a % s for a, s in zip(tap, stride))
            if phase not in phases:
                phases[phase] = p[:, :, phase[0] :: stride[0], phase[1] :: stride[1], phase[2] :: stride[2]]
                if any(s > 1 for s in stride):
                    phases[phase] = phases[phase].contiguous(memory_format=_layout(g))
            a, b, c = (t // s for t, s in zip(tap, stride))
            torch.mul(phases[phase][:, :, a : a + out[0], b : b + out[1], c : c + out[2]], g, out=product)
            if product.is_contiguous():
                taps[k] += product.view(len(g), channels, -1).sum(2, dtype=taps.dtype).sum(0)
            else:  # channels-last: positions outer, channels inner; rows of a width at a time are summed faster
                rows = product.permute(0, 2, 3, 4, 1).reshape(-1, out[2] * channels).sum(0, dtype=taps.dtype)
                taps[k] += rows.view(out[2], channels).sum(0)
    return taps.t().reshape(shape).to(grad.dtype)


class ChannelwiseConv3d(nn.Conv3d):
    """``nn.Conv3d`` with ``groups = channels`` and no bias: the same forward everywhere, the same parameters
    and state dict. With ``fast_backward`` (``x3dnet train`` sets it: ``fast_channelwise_backward``), training
    on CPU takes the backward of ``_ChannelwiseConv3dFunction``: the same gradients computed in another
    order, so fp32 rounding differs from torch's (fp64 agrees to 1e-14). Off, autograd is torch's own, as the
    original's: what a step-by-step comparison with SlowFast needs."""

    fast_backward = False

    def __init__(self, channels: int, kernel_size, *, stride=1, padding=0) -> None:
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, groups=channels, bias=False)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (self.fast_backward and x.device.type == "cpu" and torch.is_grad_enabled()
                and (x.requires_grad or weight.requires_grad)
                and not torch.jit.is_tracing() and not torch.compiler.is_compiling()):
            if torch.is_autocast_enabled("cpu"):  # as autocast treats conv3d: both in its dtype, the cast differentiable
                dtype = torch.get_autocast_dtype("cpu")
                with torch.autocast("cpu", enabled=False):
                    return _ChannelwiseConv3dFunction.apply(x.to(dtype), weight.to(dtype), self.stride, self.padding)
            return _ChannelwiseConv3dFunction.apply(x, weight, self.stride, self.padding)
        return super()._conv_forward(x, weight, bias)


def fast_channelwise_backward(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Let every channel-wise conv of ``model`` train with the faster CPU backward (or torch's again)."""
    for module in model.modules():
        if isinstance(module, ChannelwiseConv3d):
            module.fast_backward = enabled
    return model


class Stem(nn.Module):
    """conv1: a spatial 1x3x3 conv (stride 2) then a depthwise temporal 5x1x1 conv, one BN + ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv_spatial = nn.Conv3d(3, width, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False)
        self.conv_temporal = ChannelwiseConv3d(width, (5, 1, 1), padding=(2, 0, 0))
        self.bn = nn.BatchNorm3d(width)

    def forward(self, x: Tensor) -> Tensor:
        # No BN or activation between the two convs, and no max-pool (spec pitfall 1).
        return F.relu(self.bn(self.conv_temporal(self.conv_spatial(x))), inplace=True)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        # The hidden activation is ReLU, not Swish, whatever the original's docstring says.
        gate = self.fc2(F.relu(self.fc1(x.mean((2, 3, 4))))).sigmoid()
        return x * gate[:, :, None, None, None]


class Block(nn.Module):
    """Bottleneck: 1x1x1 -> channel-wise 3x3x3 (+SE) -> Swish -> 1x1x1, plus a shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, c_inner: int, c_se: int, *, stride: int, se: bool) -> None:
        super().__init__()
        # Block 0 of every stage has a projection shortcut, res2's too: 24 -> 24 but stride 2.
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Conv3d(c_in, c_out, 1, stride=(1, stride, stride), bias=False)
            self.shortcut_bn = nn.BatchNorm3d(c_out)
        else:
            self.shortcut = self.shortcut_bn = None
        self.conv_a = nn.Conv3d(c_in, c_inner, 1, bias=False)
        self.bn_a = nn.BatchNorm3d(c_inner)
        self.conv_b = ChannelwiseConv3d(c_inner, 3, stride=(1, stride, stride), padding=1)
        self.bn_b = nn.BatchNorm3d(c_inner)
        self.se = SqueezeExcite(c_inner, c_se) if se else None
        self.conv_c = nn.Conv3d(c_inner, c_out, 1, bias=False)
        self.bn_c = nn.BatchNorm3d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        y = F.relu(self.bn_a(self.conv_a(x)), inplace=True)
        y = self.bn_b(self.conv_b(y))
        if self.se is not None:
            y = self.se(y)  # SE sits between the BN and the Swish (spec pitfall 3)
        y = F.silu(y)
        y = self.bn_c(self.conv_c(y))
        return F.relu(shortcut + y, inplace=True)


def _stage(c_in: int, c_out: int, c_inner: int, c_se: int, depth: int) -> nn.Sequential:
    # SE on blocks 0, 2, 4, ... counted within the stage; only block 0 downsamples (space, not time).
    return nn.Sequential(
        *(
            Block(c_in if i == 0 else c_out, c_out, c_inner, c_se, stride=2 if i == 0 else 1, se=i % 2 == 0)
            for i in range(depth)
        )
    )


class X3D(nn.Module):
    """X3D (Feichtenhofer, CVPR 2020). Input ``(B, 3, T, H, W)`` normalised RGB; output ``(B, classes)``."""

    def __init__(self, config: X3DConfig) -> None:
        super().__init__()
        self.config = config
        self.class_names: tuple[str, ...] | None = None  # set where the weights' file names its classes
        c = config
        self.stem = Stem(c.stem_width)
        c_in = (c.stem_width,) + c.widths[:-1]
        stages = [_stage(*args) for args in zip(c_in, c.widths, c.inner_widths, c.se_widths, c.depths, strict=True)]
        self.res2, self.res3, self.res4, self.res5 = stages
        self.conv5 = nn.Conv3d(c.widths[-1], c.conv5_width, 1, bias=False)
        self.conv5_bn = nn.BatchNorm3d(c.conv5_width)
        self.fc1 = nn.Linear(c.conv5_width, c.head_width, bias=False)  # the original's lin_5: no bias
        self.dropout = nn.Dropout(c.dropout)
        self.fc2 = nn.Linear(c.head_width, c.num_classes)
        self.apply(_init_weights)
        _init_classifier(self.fc2)
        for block in self.modules():
            if isinstance(block, Block):
                nn.init.zeros_(block.bn_c.weight)  # the original's ZERO_INIT_FINAL_BN

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, T, H, W)`` -> the conv5 map ``(B, conv5_width, T, H/32, W/32)``, before pooling."""
        x = self.stem(x)
        x = self.res2(x)
        x = self.res3(x)
        x = self.res4(x)
        x = self.res5(x)
        return F.relu(self.conv5_bn(self.conv5(x)), inplace=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, fc1 + ReLU, fc2; see ``forward``. ``pre_logits``: the fc1 features averaged over windows."""
        x = self._pool(x)  # (B, C, t, h, w): one position per head window
        x = x.flatten(2).transpose(1, 2)  # (B, C, t, h, w) -> (B, windows, C)
        x = self.dropout(F.relu(self.fc1(x), inplace=True))
        if pre_logits:
            return x.mean(1)
        logits = self.fc2(x)  # (B, windows, classes)
        windows = logits.shape[1]
        if windows == 1:
            return logits[:, 0]
        # The original averages the per-window softmaxes; return the log of that average, so softmax of
        # the output is exactly the original's probabilities and the output stays a valid logit vector.
        # log-mean-exp written out (not torch.logsumexp): OpenVINO's ONNX reader loses the shape of
        # ReduceLogSumExp.
        log_probs = F.log_softmax(logits, dim=-1)
        top = log_probs.amax(dim=1, keepdim=True)
        return (log_probs - top).exp().mean(dim=1).log() + top[:, 0]

    def forward(self, x: Tensor) -> Tensor:
        """Logits for an input with one head window (the training clip, or any size with "global"
        pooling); with several windows (larger test crops, longer clips), the log of the
        window-averaged probabilities. Either way ``forward(x).softmax(1)`` is the original's output."""
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace fc2 with a freshly initialised one for ``num_classes`` (fine-tuning)."""
        self.fc2 = nn.Linear(self.config.head_width, num_classes).to(self.fc1.weight)
        _init_classifier(self.fc2)
        self.config = self.config.replace(num_classes=num_classes)
        self.class_names = None

    def _pool(self, x: Tensor) -> Tensor:
        if self.config.head_pooling == "global":
            return F.adaptive_avg_pool3d(x, 1)
        window = self.config.head_window
        if any(size < w for size, w in zip(x.shape[-3:], window, strict=True)):
            t, s = self.config.frames, self.config.train_crop
            raise ConfigError(  # a ValueError; one line from the CLI (an export at too small a --crop)
                f"input too small for {self.config.name}'s head window: the conv5 map is "
                f"{'x'.join(str(int(n)) for n in x.shape[-3:])}, the window {'x'.join(map(str, window))} "
                f"(feed at least {t} frames at about {s}x{s}, or use head_pooling='global')"
            )
        return F.avg_pool3d(x, window, stride=1)


def fold_batchnorm(model: X3D) -> X3D:
    """A copy of ``model`` in eval mode with every BN folded into the conv before it (exact up to
    rounding): w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    model = copy.deepcopy(model).eval()
    pairs = [(model.stem, "conv_temporal", "bn"), (model, "conv5", "conv5_bn")]
    for block in model.modules():
        if isinstance(block, Block):
            pairs += [(block, f"conv_{k}", f"bn_{k}") for k in "abc"]
            if block.shortcut is not None:
                pairs.append((block, "shortcut", "shortcut_bn"))
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            setattr(owner, bn_name, nn.Identity())
    return model


def _init_weights(module: nn.Module) -> None:
    # Training-time init of the original: MSRA fill (fan_out) for every conv, for fc1 and for the SE
    # layers (1x1x1 convs there); BN weight 1, bias 0. The classifier is set apart (_init_classifier).
    if isinstance(module, (nn.Conv3d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm3d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _init_classifier(fc: nn.Linear) -> None:
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
