"""The original's optimiser, learning-rate schedule and BN handling (SlowFast ``construct_optimizer``,
``get_lr_at_epoch``, fvcore's precise BN), written from ``shared/spec/training.md`` and checked against
what SlowFast itself computes (``tests/test_train.py``).

Also here: synchronised BN for data-parallel runs on any device (torch's ``SyncBatchNorm`` refuses CPU
tensors), and the BN freezing a small fine-tuning set needs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import ConfigError, require_float

# The original's configs give lrs per 8-GPU machine of 128 clips (64 for X3D-L, at half the lr): the same
# 0.1 per 128 clips everywhere, scaled linearly with the global batch.
REFERENCE_BATCH = 128


@dataclass(frozen=True)
class SolverConfig:
    """The original's SOLVER/BN keys for SGD with a warmed-up cosine schedule. Defaults: the X3D configs'."""

    base_lr: float = 0.1  # SOLVER.BASE_LR
    weight_decay: float = 5e-5  # SOLVER.WEIGHT_DECAY: every parameter but BN's, conv/linear biases included
    bn_weight_decay: float = 0.0  # BN.WEIGHT_DECAY: BN weights and biases
    momentum: float = 0.9  # SOLVER.MOMENTUM (dampening 0)
    nesterov: bool = True  # SOLVER.NESTEROV
    max_epoch: float = 300  # SOLVER.MAX_EPOCH: the cosine reaches cosine_end_lr here
    warmup_epochs: float = 35.0  # SOLVER.WARMUP_EPOCHS
    warmup_start_lr: float = 0.01  # SOLVER.WARMUP_START_LR
    cosine_end_lr: float = 0.0  # SOLVER.COSINE_END_LR

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("base_lr", require_float("base_lr", self.base_lr, 0.0, 100.0, open_low=True))
        for name in ("weight_decay", "bn_weight_decay"):
            put(name, require_float(name, getattr(self, name), 0.0, 1.0))
        put("momentum", require_float("momentum", self.momentum, 0.0, 0.999999))
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"nesterov: must be true or false, not {self.nesterov!r}"[:200])
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov: needs a momentum above 0")
        put("max_epoch", require_float("max_epoch", self.max_epoch, 0.0, 1e6, open_low=True))
        put("warmup_epochs", require_float("warmup_epochs", self.warmup_epochs, 0.0, self.max_epoch))
        put("warmup_start_lr", require_float("warmup_start_lr", self.warmup_start_lr, 0.0, 100.0))
        # The original asserts this: the cosine must come down.
        put("cosine_end_lr", require_float("cosine_end_lr", self.cosine_end_lr, 0.0, 100.0))
        if not self.cosine_end_lr < self.base_lr:
            raise ConfigError(f"cosine_end_lr ({self.cosine_end_lr:g}) must be below base_lr ({self.base_lr:g})")

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def scaled(self, factor: float) -> SolverConfig:
        """The learning rates times ``factor`` (the linear scaling rule), the rest unchanged."""
        return dataclasses.replace(self, base_lr=self.base_lr * factor, warmup_start_lr=self.warmup_start_lr * factor,
                                   cosine_end_lr=self.cosine_end_lr * factor)


def lr_at(cfg: SolverConfig, epoch: float) -> float:
    """The learning rate at ``epoch`` (``cur_epoch + cur_iter / iters_per_epoch``), as ``get_lr_at_epoch``.

    The operations are the original's, in its order, so the value is the same double.
    """
    def cosine(e: float) -> float:
        # COSINE_AFTER_WARMUP is False for X3D: the cosine runs from epoch 0, under the warm-up.
        return cfg.cosine_end_lr + (cfg.base_lr - cfg.cosine_end_lr) * (math.cos(math.pi * e / cfg.max_epoch) + 1.0) * 0.5

    if epoch < cfg.warmup_epochs:
        # A line to the cosine's value where the warm-up ends, not to base_lr.
        slope = (cosine(cfg.warmup_epochs) - cfg.warmup_start_lr) / cfg.warmup_epochs
        return epoch * slope + cfg.warmup_start_lr
    return cosine(epoch)


def is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.SGD:
    """SGD with the original's parameter groups: BN weights and biases at ``bn_weight_decay``, every other
    trainable parameter (biases too) at ``weight_decay``; frozen parameters are left out."""
    bn, rest = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (bn if is_bn(module) else rest).append(p)
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((bn, cfg.bn_weight_decay), (rest, cfg.weight_decay)) if ps]
    if not groups:
        raise ConfigError("nothing to train: every parameter is frozen")
    return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           dampening=0.0, nesterov=cfg.nesterov)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[Tensor], *, limit: int) -> int:
    """Recompute every train-mode BN's running mean and variance over up to ``limit`` batches (forwards
    only), as fvcore's ``update_bn_stats`` (0.1.5, which SlowFast runs); returns the batches used.

    The statistics are the population's, all values of all batches pooled: each batch enters weighted by
    its size, and the variance is the pooled biased one, ``E[x^2] - E[x]^2`` (the older fvcore averaged the
    per-batch unbiased variances instead). A momentum of 1 makes each forward leave its batch's mean and
    unbiased variance in the buffers, which are read back after it; the momenta are restored at the end.
    """
    layers = [m for m in model.modules() if is_bn(m) and m.track_running_stats and m.training]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    counts = dict.fromkeys(layers, 0)  # values per channel of this batch, per layer
    seen = [0] * len(layers)  # values per channel so far
    means = [torch.zeros_like(m.running_mean) for m in layers]
    squares = [torch.zeros_like(m.running_var) for m in layers]  # E[x^2]

    def count(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        n = inputs[0].numel() // inputs[0].shape[1]
        if isinstance(module, SyncBatchNorm3d) and dist.is_initialized():
            n *= dist.get_world_size()  # its statistics are the global batch's (every process holds as many)
        counts[module] = n

    hooks = [m.register_forward_pre_hook(count) for m in layers]
    used = 0
    try:
        for m in layers:
            m.momentum = 1.0
        for batch in _take(batches, limit):
            for m in layers:
                counts[m] = 0
            model(batch)
            used += 1
            for i, m in enumerate(layers):
                n = counts[m]
                if n == 0:
                    continue  # not reached by this forward
                seen[i] += n
                weight = n / seen[i]
                batch_square = m.running_mean.square() + m.running_var * ((n - 1) / n)  # undo Bessel's correction
                means[i] += (m.running_mean - means[i]) * weight
                squares[i] += (batch_square - squares[i]) * weight
        if used:
            for m, mean, square, n in zip(layers, means, squares, seen, strict=True):
                if n == 0:
                    continue
                m.running_mean.copy_(mean)
                m.running_var.copy_(square - mean.square())
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        for hook in hooks:
            hook.remove()
    return used


def _take(items: Iterable[Tensor], limit: int) -> Iterator[Tensor]:
    for i, item in enumerate(items):
        if i >= limit:
            return
        yield item


def _sum_over_processes(t: Tensor) -> Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()


def _channel_sum(t: Tensor) -> Tensor:
    """Per channel, the sum of a (N, C, T, H, W) tensor: torch's cascade summation. Channels-last, rows of a
    whole width of channels at a time, then the widths: twice as fast as summing rows of C."""
    if not _channels_last(t):
        return t.sum((0, 2, 3, 4))
    width, channels = t.shape[-1], t.shape[1]
    return t.permute(0, 2, 3, 4, 1).reshape(-1, width * channels).sum(0).view(width, channels).sum(0)


def _chunks(x: Tensor) -> Iterator[slice]:
    """A few samples at a time (about 4 MB on the CPU: what is made of them stays in cache on its way to a sum)."""
    step = max(1, (1 << 20) // max(x[0].numel(), 1)) if x.device.type == "cpu" else len(x)
    for start in range(0, len(x), step):
        yield slice(start, start + step)


def _view(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1, 1)


class _BatchNormFunction(torch.autograd.Function):
    """Training-mode BN whose per-channel sums are ``torch.sum``'s (cascade summation, accurate in either
    layout), of deviations taken from the mean before they are squared or multiplied, in the forward and
    the backward alike. ``reduce`` sums a tensor over the processes (``None``: one process): the statistics
    and the input's gradient are then the global batch's, the parameters' gradients this process's share
    (DDP averages them). Returns the output, the batch mean and the biased batch variance. At least fp32
    inside: a half-precision input (CUDA autocast) is widened and the output narrowed back."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, count: float, reduce):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        weight, bias = weight.to(xf.dtype), bias.to(xf.dtype)
        # Each part's mean and squared deviations from it (the part read from memory once, then in cache),
        # then the parts pooled about the batch's mean (Chan et al.): a two-pass variance in one pass.
        sums, squares, sizes = [], [], []
        buffer = torch.empty_like(xf[next(_chunks(xf))])
        for part in _chunks(xf):
            sums.append(_channel_sum(xf[part]))
            sizes.append(xf[part].numel() / xf.shape[1])
            dev = torch.sub(xf[part], _view(sums[-1] / sizes[-1]), out=buffer[: len(xf[part])])
            squares.append(_channel_sum(dev.mul_(dev)))
        total = torch.stack(sums).sum(0)
        mean = (total if reduce is None else reduce(total)) / count
        sq = sum(q + n * (s / n - mean).square() for s, q, n in zip(sums, squares, sizes, strict=True))
        var = (sq if reduce is None else reduce(sq)) / count
        rstd = (var + eps).rsqrt()
        # The transform, torch's in one pass: inference-mode BN with this batch's statistics.
        y = torch.batch_norm(xf, weight, bias, mean, var, False, 0.0, eps, False)
        ctx.save_for_backward(x, mean, rstd, weight * rstd)
        ctx.count, ctx.reduce = count, reduce
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(ctx, grad: Tensor, _mean: Tensor, _var: Tensor):
        x, mean, rstd, scale = ctx.saved_tensors
        xf, grad, centre = x.to(mean.dtype), grad.to(mean.dtype), _view(mean)
        grad_sum, grad_dev = torch.zeros_like(mean), torch.zeros_like(mean)  # sums of grad, grad * (x - mean)
        buffer = torch.empty_like(xf[next(_chunks(xf))])
        for part in _chunks(xf):
            grad_sum += _channel_sum(grad[part])
            dev = torch.sub(xf[part], centre, out=buffer[: len(xf[part])])
            grad_dev += _channel_sum(dev.mul_(grad[part]))
        grad_weight = grad_dev * rstd if ctx.needs_input_grad[1] else None
        grad_bias = grad_sum if ctx.needs_input_grad[2] else None
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, grad_bias, None, None, None
        sums = torch.cat([grad_sum, grad_dev])
        grad_sum, grad_dev = (sums if ctx.reduce is None else ctx.reduce(sums)).chunk(2)
        # d/dx of scale * (x - mean) + bias through the batch's statistics: scale * (grad - mean of grad)
        # minus the deviation times scale * rstd**2 * (the mean of grad * deviation).
        slope, shift = _view(-scale * rstd.square() * grad_dev / ctx.count), _view(-scale * grad_sum / ctx.count)
        grad_x = torch.empty_like(xf)
        for part in _chunks(xf):  # each part's deviations in cache for the two operations after
            dev = torch.sub(xf[part], centre, out=grad_x[part])
            torch.addcmul(shift, dev, slope, out=dev).addcmul_(grad[part], _view(scale))
        return grad_x.to(x.dtype), grad_weight, grad_bias, None, None, None


class SyncBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d whose training statistics are those of the whole global batch, over every process
    (torch's ``SyncBatchNorm`` refuses CPU tensors), computed by ``_BatchNormFunction``.

    On one process it is BatchNorm3d, except for channels-last CPU tensors: torch's CPU kernel sums their
    channels row after row, which at X3D-XS's sizes is 50 times less accurate (1e-5 of the values against
    fp64 BN; 2e-7 here, 1e-6 contiguous) and made one process and two disagree by 2.2e-5 after an epoch.
    So those go through ``_BatchNormFunction`` too, and one process computes what several do, to fp32
    rounding. (Not every BN: here it is slower than torch's kernel.) Evaluation is BatchNorm3d's own. The
    parameter and buffer names are BatchNorm3d's: checkpoints are the same."""

    def forward(self, x: Tensor) -> Tensor:
        world = dist.get_world_size() if dist.is_initialized() else 1
        last = x.device.type == "cpu" and x.dim() == 5 and _channels_last(x)
        if not (self.training and self.affine and self.track_running_stats and (world > 1 or last)):
            return super().forward(x)
        count = x.numel() / x.shape[1]
        reduce = None
        if world > 1:
            counts = torch.tensor([count], dtype=torch.float64, device=x.device)
            dist.all_reduce(counts)
            count, reduce = counts.item(), _sum_over_processes
        y, mean, var = _BatchNormFunction.apply(x, self.weight, self.bias, self.eps, count, reduce)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - m).add_(mean, alpha=m)
            self.running_var.mul_(1 - m).add_(var * (count / max(count - 1, 1)), alpha=m)
        return y


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Every BatchNorm3d of ``model`` turned into a ``SyncBatchNorm3d`` sharing its parameters and buffers."""
    for module in model.modules():
        if type(module) is nn.BatchNorm3d:
            module.__class__ = SyncBatchNorm3d  # same fields, another forward
    return model


def freeze_bn(model: nn.Module) -> None:
    """Fix every BN: running statistics used as they are (eval mode) and weight and bias not trained.
    ``model.train()`` would undo the eval mode: call this after it (``train_mode`` does)."""
    for m in model.modules():
        if is_bn(m):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)


__all__ = ["SolverConfig", "SyncBatchNorm3d", "build_optimizer", "convert_sync_bn", "freeze_bn", "lr_at",
           "precise_bn", "set_lr"]
