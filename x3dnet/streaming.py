"""Streaming (continual) X3D: one frame in, one prediction out, with the clip model's own weights.

What co3d's CoX3D computes (Hedegaard & Iosifidis, ECCV 2022), as state kept between steps instead of
clips recomputed: every temporal convolution keeps its last ``k - 1`` inputs and convolves them with the
new frame (the same multiply-adds as co3d's partial sums, and its ``fill`` falls out of what the buffer
starts with); a convolution padded by ``p`` withholds its first ``k - 1 - p`` outputs, so the stream
computes the clip network padded on the left only. Residual shortcuts are delayed by their branch's
delay, the head averages the last ``pool_frames`` spatially pooled conv5 frames, and squeeze-excitation
pools over the current frame (``se="frame"``, co3d's default) or the last ``pool_frames`` frames
(``se="clip"``, which gates each frame by the mean over it and the ``pool_frames - 1`` after it, so it
adds that much delay per SE block). Spatial layers run per frame, with BN folded into the convs.

The network is written out once, over chunks of frames (``_forward``): ``step`` feeds a chunk of one,
``forward_steps`` a whole clip, and in the steady state (every buffer full, nothing withheld) the same
function, traced with its buffers as explicit inputs and outputs, is the graph the engines run.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .backends import FP32_LOG_TOLERANCE, FP32_TOLERANCE, check_device, cuda_fp32, installed, openvino_core
from .errors import BackendError, ConfigError
from .model import X3D, Block, fold_batchnorm
from .recipe import Recipe
from .video import FrameFormat, FrameSource
from .views import crop_offsets

Fill = Literal["zeros", "replicate"]
Scope = Literal["frame", "clip"]
STREAM_BACKENDS = ("torch", "openvino")


class _State:
    """The buffers of one stream, by layer (its last frames, oldest first, along dim 2), and how many outputs
    each layer still withholds.

    Every operation takes a chunk ``(B, C, n, ...)`` of n consecutive frames and returns the frames it
    emits for them (fewer while it withholds its first outputs, possibly none). A temporal conv keeps its
    last k - 1 inputs as one tensor: a steady step is a concatenation, a conv and a slice. (Measured in
    OpenVINO on X3D-M: a tensor per past frame made the variables' writes three times dearer, and co3d's
    partial sums, written in the convs' blocked layout, cost more than the slices they save.)"""

    def __init__(self, fill: Fill, buffers: dict[str, Tensor] | None = None) -> None:
        self.fill = fill
        self.buffers: dict[str, Tensor] = dict(buffers or {})  # given buffers: every layer has emitted already
        self.withheld: dict[str, int] = {}

    def conv(self, key: str, x: Tensor, conv: nn.Conv3d, *, pad: int) -> Tensor:
        """A temporal conv (kernel k along time, left padding ``pad`` as the clip model's), causal."""
        k = conv.weight.shape[2]
        if key not in self.buffers:  # the first frames: the missing past is the fill
            first = x[:, :, :1]
            self.buffers[key] = (first if self.fill == "replicate" else torch.zeros_like(first)).expand(
                -1, -1, k - 1, -1, -1)
            self.withheld[key] = k - 1 - pad
        window = torch.cat((self.buffers[key], x), 2)  # (B, C, k - 1 + n, H, W)
        self.buffers[key] = window[:, :, window.shape[2] - (k - 1):]
        out = F.conv3d(window, conv.weight, conv.bias, (1, *conv.stride[1:]), (0, *conv.padding[1:]), 1, conv.groups)
        return self._withhold(key, out)

    def delay(self, key: str, x: Tensor, frames: int) -> Tensor:
        """``x`` as it was ``frames`` steps ago (nothing for the first ``frames`` steps)."""
        if frames == 0:
            return x
        if key not in self.buffers:
            self.buffers[key], x = x[:, :, :frames], x[:, :, frames:]
            if not x.shape[2]:
                return x
        past = self.buffers[key]
        if x.shape[2] == 1 and past.shape[2] == frames == 1:  # the steady step of a residual: a swap
            self.buffers[key] = x
            return past
        seen = torch.cat((past, x), 2)
        cut = max(0, seen.shape[2] - frames)
        self.buffers[key] = seen[:, :, cut:]
        return seen[:, :, :cut]

    def mean(self, key: str, v: Tensor, frames: int) -> Tensor:
        """``v`` (B, C, n) averaged over its last ``frames`` steps (nothing until that many have come)."""
        if frames == 1:
            return v
        seen = torch.cat((self.buffers[key], v), 2) if key in self.buffers else v
        self.buffers[key] = seen[:, :, max(0, seen.shape[2] - (frames - 1)):]
        if seen.shape[2] < frames:
            return v[:, :, :0]
        return F.avg_pool1d(seen, frames, 1)

    def _withhold(self, key: str, out: Tensor) -> Tensor:
        drop = min(self.withheld.get(key, 0), out.shape[2])
        if drop:
            self.withheld[key] -= drop
            out = out[:, :, drop:]
        return out


def _gate(se: nn.Module, v: Tensor) -> Tensor:
    """SE's excitation of pooled ``v`` (B, C, n) -> per-frame channel gates (B, C, n, 1, 1)."""
    g = se.fc2(F.relu(se.fc1(v.transpose(1, 2)))).sigmoid()
    return g.transpose(1, 2)[..., None, None]


def _block(key: str, block: Block, x: Tensor, st: _State, *, scope: Scope, pool: int) -> Tensor:
    shortcut = x if block.shortcut is None else block.shortcut(x)  # BN folded into the projection
    y = F.relu(block.conv_a(x))
    y = st.conv(key + ".b", y, block.conv_b, pad=1)
    branch_delay = 1
    if block.se is not None:
        if scope == "frame":
            y = y * _gate(block.se, y.mean((3, 4))) if y.shape[2] else y
        else:
            gate = st.mean(key + ".se", y.mean((3, 4)), pool)
            y = st.delay(key + ".se_in", y, pool - 1)
            y = y * _gate(block.se, gate) if y.shape[2] else y
            branch_delay += pool - 1
    shortcut = st.delay(key + ".shortcut", shortcut, branch_delay)
    if not y.shape[2]:
        return y
    return F.relu(shortcut + block.conv_c(F.silu(y)))


def _blocks(net: X3D) -> list[Block]:
    return [*net.res2, *net.res3, *net.res4, *net.res5]


def _unit(key: str, blocks: int) -> int:
    """The unit (0 the stem, 1..blocks the blocks, blocks + 1 the head) a buffer belongs to."""
    return 0 if key == "stem" else blocks + 1 if key == "head" else int(key.split(".")[0]) + 1


def _forward(net: X3D, x: Tensor, st: _State, *, scope: Scope, pool: int, lo: int = 0,
             hi: int | None = None) -> Tensor | None:
    """A chunk through units ``lo`` to ``hi - 1`` of the folded ``net`` (0 the stem, then its blocks, the head
    last; default all of them): frames ``(B, 3, n, H, W)`` into the stem, activations ``(B, C, n, H, W)``
    between units, scores ``(B, m, classes)`` out of the head for the last m frames (m < n while the
    network still withholds its first outputs), or None if nothing comes out."""
    blocks = _blocks(net)
    for unit in range(lo, len(blocks) + 2 if hi is None else hi):
        if unit == 0:
            x = F.relu(st.conv("stem", net.stem.conv_spatial(x), net.stem.conv_temporal, pad=2))
        elif unit <= len(blocks):
            x = _block(str(unit - 1), blocks[unit - 1], x, st, scope=scope, pool=pool)
        else:
            v = st.mean("head", F.relu(net.conv5(x)).mean((3, 4)), pool)  # conv5's whole map at the training crop
            return net.fc2(F.relu(net.fc1(v.transpose(1, 2)))) if v.shape[2] else None
        if not x.shape[2]:
            return None
    return x


class StreamingX3D:
    """A continual X3D over ``model``'s weights: ``step(frame)`` returns what ``X3D.forward`` returns for
    the stream so far (scores whose softmax is the probabilities), or None during the first ``delay``
    steps.

    ``pool_frames``: the head's average over the last P conv5 frames (default the training clip's T).
    ``se``: squeeze-excitation over the current frame or the last P frames. ``fill``: what temporal
    convolutions see before the first frame. ``backend``: ``torch`` (eager) or ``openvino`` (the steady
    state as one compiled graph whose buffers stay inside the engine; the first ``delay`` steps run
    eagerly), checked against eager when built. ``device``: where the eager network runs. ``stages``
    (openvino): cut the network into that many parts that ``run`` overlaps on consecutive frames, each
    with its share of ``threads`` (more frames per second on a stream; ``step`` runs them one after the
    other, so its latency is that of one part per core).
    """

    def __init__(self, model: X3D, *, pool_frames: int | None = None, se: Scope = "frame",
                 fill: Fill = "replicate", backend: str = "torch", device: str = "cpu", threads: int | None = None,
                 stages: int = 1, check: bool = True) -> None:
        config = model.config
        pool = config.frames if pool_frames is None else pool_frames
        if isinstance(pool, bool) or not isinstance(pool, int) or not 1 <= pool <= 4096:
            raise ConfigError(f"pool_frames must be a whole number of frames from 1 to 4096, not {pool!r}")
        if se not in ("frame", "clip"):
            raise ConfigError(f"se must be 'frame' or 'clip', not {se!r}")
        if fill not in ("zeros", "replicate"):
            raise ConfigError(f"fill must be 'zeros' or 'replicate', not {fill!r}")
        if backend not in STREAM_BACKENDS:
            raise BackendError(f"a stream runs on {' or '.join(STREAM_BACKENDS)}, not {backend!r}")
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= 8:
            raise ConfigError(f"stages must be a whole number from 1 to 8, not {stages!r}")
        if stages > 1 and backend != "openvino":
            raise ConfigError("stages: only the openvino stream runs in stages")
        check_device(device)
        if torch.device(device).type == "cuda":
            cuda_fp32()  # the stream runs in fp32: its steps must equal the clip network's
        self.config, self.pool_frames, self.se, self.fill, self.device = config, pool, se, fill, device
        self.net = fold_batchnorm(model).float().to(device)
        blocks = _blocks(self.net)
        gated = sum(b.se is not None for b in blocks) if se == "clip" else 0
        padding = 2 + len(blocks)  # the stem's 2 frames of temporal padding and each block's 1
        # As co3d counts them: the first output comes at step `delay`, and from step `receptive_field - 1`
        # on, no output depends on the fill.
        self.delay = padding + (pool - 1) * (1 + gated)
        self.receptive_field = self.delay + padding + 1
        self.engine: _OpenVinoStep | None = None
        self.parity: float | None = None  # the engine's max |dp| against eager, once checked
        self.reset()
        if backend == "openvino":
            self.engine = _OpenVinoStep(self, threads=threads, stages=stages)
            if check:
                self.parity = check_stream(self)

    @property
    def backend(self) -> str:
        return "torch" if self.engine is None else "openvino"

    def describe(self) -> str:
        engine = self.backend
        if self.engine is not None and len(self.engine.parts) > 1:
            engine += f" in {len(self.engine.parts)} overlapped stages (units cut at {self.engine.cuts[1:-1]})"
        return (f"streaming on {engine} ({self.device}): pool {self.pool_frames}, se {self.se}, fill "
                f"{self.fill}; first prediction at step {self.delay}, receptive field {self.receptive_field}")

    def reset(self) -> None:
        """Forget the stream: the next frame is a first frame."""
        self._state = _State(self.fill)
        self._on_engine = False
        self.steps = 0

    @torch.inference_mode()
    def step(self, frame: Tensor) -> Tensor | None:
        """One frame ``(B, 3, H, W)``, normalised, H = W = the training crop -> scores ``(B, classes)``."""
        self._check(frame, 4)
        if self.engine is not None and self.steps > self.delay:
            if not self._on_engine:
                self.engine.load(self._state.buffers)
                self._on_engine = True
            self.steps += 1
            return self.engine(frame)
        scores = self._eager(frame[:, :, None])
        return None if scores is None else scores[:, -1]

    def run(self, frames: Iterable[Tensor]) -> Iterator[Tensor | None]:
        """``step`` over ``frames``, yielding each result in order. On an engine in stages, consecutive
        frames overlap (stage 2 on frame n while stage 1 takes frame n + 1), so this is the fast way to
        stream: a frame is taken from ``frames`` before the previous frame's result is yielded. Stopping
        early finishes the frames already taken (the state has seen them) and drops their results."""
        frames = iter(frames)
        with torch.inference_mode():
            while self.engine is None or self.steps <= self.delay:
                frame = next(frames, None)
                if frame is None:
                    return
                yield self.step(frame)
            if not self._on_engine:
                self.engine.load(self._state.buffers)
                self._on_engine = True

            def fed() -> Iterator[Tensor]:
                for frame in frames:
                    self._check(frame, 4)
                    self.steps += 1
                    yield frame

            yield from self.engine.run(fed())

    @torch.inference_mode()
    def forward_steps(self, clip: Tensor) -> Tensor:
        """N frames ``(B, 3, N, H, W)`` at once -> ``(B, m, classes)``: the scores of the last m of them
        (m = N once the delay has passed), as N calls of ``step`` would give, computed batched over time."""
        self._check(clip, 5)
        if self._on_engine:  # the engine holds the latest state: take it back
            self._state = _State(self.fill, self.engine.state())
            self._on_engine = False
        scores = self._eager(clip) if clip.shape[2] else None
        return scores if scores is not None else torch.zeros(len(clip), 0, self.config.num_classes)

    def _eager(self, frames: Tensor) -> Tensor | None:
        self.steps += frames.shape[2]
        out = _forward(self.net, frames.to(self.device, torch.float32), self._state, scope=self.se,
                       pool=self.pool_frames)
        return None if out is None else out.float().cpu()

    def _check(self, x: Tensor, dims: int) -> None:
        crop = self.config.train_crop
        shape = "(B, 3, H, W)" if dims == 4 else "(B, 3, N, H, W)"
        if not isinstance(x, Tensor) or x.dim() != dims or x.shape[1] != 3 or tuple(x.shape[-2:]) != (crop, crop):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ConfigError(f"a stream of {self.config.name} takes frames {shape} with H = W = {crop} "
                              f"(its training crop), not {got}")


class _SteadyStep(nn.Module):
    """Units ``lo`` to ``hi - 1`` of one steady-state step as a module of explicit tensors:
    (input, *buffers) -> (output, *buffers). The input is a frame (B, 3, H, W) when the stem is in, else
    the activation of one frame (B, C, 1, H, W); the output is the scores (B, classes) when the head is in."""

    def __init__(self, stream: StreamingX3D, keys: list[str], lo: int, hi: int) -> None:
        super().__init__()
        self.net, self.keys, self.lo, self.hi = stream.net, keys, lo, hi
        self.fill, self.scope, self.pool = stream.fill, stream.se, stream.pool_frames
        self.last = hi == len(_blocks(stream.net)) + 2

    def forward(self, x: Tensor, *buffers: Tensor) -> tuple[Tensor, ...]:
        st = _State(self.fill, dict(zip(self.keys, buffers, strict=True)))
        out = _forward(self.net, x[:, :, None] if self.lo == 0 else x, st, scope=self.scope, pool=self.pool,
                       lo=self.lo, hi=self.hi)
        return (out[:, 0] if self.last else out, *(st.buffers[k] for k in self.keys))


def steady_state(stream: StreamingX3D, frames: Tensor | None = None) -> dict[str, Tensor]:
    """A copy of ``stream``'s buffers once its delay has passed, warmed on ``frames`` (B, 3, N, H, W)
    (default: random frames, batch 1) from a clean state; ``stream`` itself is left as it was."""
    probe = copy.copy(stream)
    probe.engine = None
    probe.reset()
    crop = stream.config.train_crop
    if frames is None:
        frames = torch.randn(1, 3, stream.delay + 1, crop, crop, generator=torch.Generator().manual_seed(0))
    probe.forward_steps(frames)
    return {k: v.clone() for k, v in probe._state.buffers.items()}


def export_stream_onnx(stream: StreamingX3D, path: str | Path, lo: int = 0, hi: int | None = None,
                       buffers: dict[str, Tensor] | None = None) -> tuple[Path, list[str]]:
    """Write units ``lo`` to ``hi - 1`` (default: the whole network) of the steady-state step (batch 1) as
    ONNX: inputs ``x`` (a frame, or the activation of the unit before) and ``state.<layer>``, outputs ``y``
    (the scores, or this part's activation) and ``next.<layer>``, traced from ``buffers`` (default: a
    ``steady_state``). Returns the path and the buffer names."""
    blocks = len(_blocks(stream.net))
    hi = blocks + 2 if hi is None else hi
    buffers = steady_state(stream) if buffers is None else buffers
    keys = [k for k in buffers if lo <= _unit(k, blocks) < hi]
    net = copy.deepcopy(stream.net).cpu() if next(stream.net.parameters()).device.type != "cpu" else stream.net
    crop = stream.config.train_crop
    x = torch.zeros(1, 3, crop, crop)
    if lo > 0:  # the activation that comes into unit lo, from the steady state
        st = _State(stream.fill, {k: v.cpu().clone() for k, v in buffers.items()})
        with torch.inference_mode():
            x = _forward(net, x[:, :, None], st, scope=stream.se, pool=stream.pool_frames, hi=lo)
    module = _SteadyStep(stream, keys, lo, hi).cpu().eval()
    module.net = net
    path = Path(path)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x, *(buffers[k].cpu() for k in keys)), str(path),
                          input_names=["x", *(f"state.{k}" for k in keys)],
                          output_names=["y", *(f"next.{k}" for k in keys)], opset_version=17, dynamo=False)
    return path, keys


class _OpenVinoPart:
    """Units ``lo`` to ``hi - 1`` of the steady-state step compiled by OpenVINO for the CPU, its buffers kept
    as the infer request's variables (OpenVINO's MakeStateful pass over the exported inputs/outputs), so a
    step moves its input in and its output out. ``pinned=False`` lets several parts run at once on
    different cores (OpenVINO's default pinning put them on the same one)."""

    def __init__(self, stream: StreamingX3D, lo: int, hi: int, buffers: dict[str, Tensor], *, threads: int | None,
                 pinned: bool) -> None:
        import openvino as ov
        from openvino._offline_transformations import apply_make_stateful_transformation

        self.lo, self.hi = lo, hi
        with tempfile.TemporaryDirectory() as tmp:
            path, self.keys = export_stream_onnx(stream, Path(tmp) / "step.onnx", lo, hi, buffers)
            core = openvino_core()
            graph = core.read_model(str(path))
        self.shape = tuple(graph.inputs[0].shape)
        if self.keys:
            apply_make_stateful_transformation(graph, {f"state.{k}": f"next.{k}" for k in self.keys})
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if not pinned:
            config["ENABLE_CPU_PINNING"] = False
        self.request = core.compile_model(graph, "CPU", config).create_infer_request()
        # The pass names each variable after its input and output joined (releases differ): map them back.
        by_name = {v.name: v for v in self.request.query_state()}
        self.variables = {k: by_name.get(f"state.{k}next.{k}", by_name.get(f"state.{k}")) for k in self.keys}
        if None in self.variables.values():
            raise BackendError("openvino: the stream's state variables were not made as expected")
        self._ov = ov

    def load(self, buffers: dict[str, Tensor]) -> None:
        for k in self.keys:
            self.variables[k].state = self._ov.Tensor(np.ascontiguousarray(buffers[k].float().cpu().numpy()))

    def state(self) -> dict[str, Tensor]:
        return {k: torch.from_numpy(self.variables[k].state.data.copy()) for k in self.keys}

    def start(self, x: np.ndarray) -> None:
        self.request.start_async({0: x}, share_inputs=True)

    def wait(self) -> np.ndarray:
        self.request.wait()
        return self.request.get_output_tensor(0).data.copy()


class _MacCounter(TorchFunctionMode):
    """Multiply-adds of the convolutions and linear layers run under it (FlopCounterMode takes seconds to
    import)."""

    macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (F.conv3d, F.linear):
            self.macs += out.numel() * args[1][0].numel()
        return out


def _unit_costs(stream: StreamingX3D, buffers: dict[str, Tensor]) -> list[float]:
    """An estimate of each unit's share of a steady step on one core: its multiply-adds plus the elements
    it moves (its buffers, input and output), which dominate the early high-resolution units. Measured
    stage times correct it (``_OpenVinoStep``)."""
    blocks = len(_blocks(stream.net))
    st = _State(stream.fill, {k: v.clone() for k, v in buffers.items()})
    net = stream.net  # on the CPU, as OpenVINO
    crop = stream.config.train_crop
    x = torch.zeros(1, 3, 1, crop, crop)
    costs = []
    with torch.inference_mode():
        for unit in range(blocks + 2):
            with _MacCounter() as counter:
                y = _forward(net, x, st, scope=stream.se, pool=stream.pool_frames, lo=unit, hi=unit + 1)
            moved = x.numel() + y.numel() + sum(v.numel() for k, v in buffers.items() if _unit(k, blocks) == unit)
            costs.append(counter.macs + 50 * moved + 3e6)  # + a per-unit overhead
            x = y
    return costs


def _partition(costs: list[float], parts: int) -> list[int]:
    """Cut points ``[0, c1, ..., len(costs)]`` of ``parts`` contiguous runs of ``costs`` whose largest sum
    is the smallest possible."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[p][i]: the smallest largest sum of the first i units in p runs, and where its last run starts.
    best = [[(float("inf"), 0)] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = (0.0, 0)
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            best[p][i] = min((max(best[p - 1][j][0], prefix[i] - prefix[j]), j) for j in range(p - 1, i))
    cuts, i = [n], n
    for p in range(parts, 0, -1):
        i = best[p][i][1]
        cuts.append(i)
    return cuts[::-1]


class _OpenVinoStep:
    """The steady-state step on OpenVINO: one compiled graph (``stages=1``, every thread on each step), or
    the network cut into ``stages`` consecutive parts with ``threads // stages`` threads each, which
    ``run`` overlaps (part 2 on frame n while part 1 takes frame n + 1), so a stream of frames keeps every
    core busy with a one-frame network. The cuts balance the parts' measured times."""

    def __init__(self, stream: StreamingX3D, *, threads: int | None = None, stages: int = 1) -> None:
        if not installed("openvino"):
            raise BackendError("openvino is not installed (pip install 'x3dnet[fast]')")
        if stream.device != "cpu":
            raise BackendError("openvino: x3dnet runs OpenVINO on the CPU only")
        units = len(_blocks(stream.net)) + 2
        if stages > units:
            raise ConfigError(f"stages: {stream.config.name} has {units} units (stem, blocks, head) to cut, not {stages}")
        buffers = steady_state(stream)
        if stages == 1:
            self.parts = [_OpenVinoPart(stream, 0, units, buffers, threads=threads, pinned=True)]
            return
        per_part = max(1, (threads or os.cpu_count() or 1) // stages)
        costs = _unit_costs(stream, buffers)
        cuts = _partition(costs, stages)
        self.parts = self._build(stream, cuts, buffers, per_part)
        # Correct the estimate by each part's measured time, once: scale its units' costs and cut again
        # where that promises a clearly shorter slowest part (timings move by a few percent run to run).
        measured = [self._time(part) for part in self.parts]
        scaled = [c * m / sum(costs[a:b]) for a, b, m in zip(cuts, cuts[1:], measured) for c in costs[a:b]]
        better = _partition(scaled, stages)
        slowest = max(sum(scaled[a:b]) for a, b in zip(better, better[1:]))
        if better != cuts and slowest < 0.95 * max(measured):
            self.parts = self._build(stream, better, buffers, per_part)

    @staticmethod
    def _build(stream: StreamingX3D, cuts: list[int], buffers: dict[str, Tensor], threads: int) -> list[_OpenVinoPart]:
        return [_OpenVinoPart(stream, a, b, buffers, threads=threads, pinned=False) for a, b in zip(cuts, cuts[1:])]

    @staticmethod
    def _time(part: _OpenVinoPart, calls: int = 8) -> float:
        """Seconds of one call of ``part`` alone (the fastest of ``calls``, after one to warm up)."""
        x = np.zeros(part.shape, np.float32)
        times = []
        for _ in range(calls + 1):
            start = time.perf_counter()
            part.start(x)
            part.wait()
            times.append(time.perf_counter() - start)
        return min(times[1:])

    @property
    def cuts(self) -> list[int]:
        return [self.parts[0].lo, *(p.hi for p in self.parts)]

    def load(self, buffers: dict[str, Tensor]) -> None:
        for part in self.parts:
            part.load(buffers)

    def state(self) -> dict[str, Tensor]:
        return {k: v for part in self.parts for k, v in part.state().items()}

    def __call__(self, frame: Tensor) -> Tensor:
        x = self._input(frame)
        for part in self.parts:
            part.start(x)
            x = part.wait()
        return torch.from_numpy(x)

    def run(self, frames: Iterator[Tensor]) -> Iterator[Tensor]:
        """The scores of each of ``frames`` in order, the parts overlapped on consecutive frames. A source
        that raises still gets the scores of the frames it gave, then its error. Frames already taken
        when the consumer stops are finished (the state has seen them) but their scores are dropped."""
        n = len(self.parts)
        waiting: list[np.ndarray | None] = [None] * n  # the input each part takes next
        error, more = None, True
        try:
            while True:
                if more:
                    try:
                        waiting[0] = self._input(next(frames))
                    except StopIteration:
                        more = False
                    except Exception as e:  # noqa: BLE001 - raised again after the frames in flight
                        error, more = e, False
                busy = [j for j in range(n) if waiting[j] is not None]
                if not busy:
                    break
                for j in busy:
                    self.parts[j].start(waiting[j])
                done = {j: self.parts[j].wait() for j in busy}
                waiting = [None] * n
                for j, out in done.items():
                    if j + 1 < n:
                        waiting[j + 1] = out
                    else:
                        yield torch.from_numpy(out)
        finally:  # stopped early: the frames in flight go through the rest, oldest first
            for j in range(n - 1, -1, -1):
                x = waiting[j]
                for part in self.parts[j:] if x is not None else ():
                    part.start(x)
                    x = part.wait()
        if error is not None:
            raise error

    def _input(self, frame: Tensor) -> np.ndarray:
        if len(frame) != 1:
            raise BackendError("the openvino stream runs batch 1; use backend='torch' for batches")
        return np.ascontiguousarray(frame.float().cpu().numpy())


def check_stream(stream: StreamingX3D) -> float:
    """Run ``stream``'s engine and eager PyTorch one step from the same steady state on a random frame;
    raise ``BackendError`` if they disagree (1e-4 in probability). Returns the max |dp|."""
    crop = stream.config.train_crop
    generator = torch.Generator().manual_seed(1)
    frames = torch.randn(1, 3, stream.delay + 2, crop, crop, generator=generator)
    buffers = steady_state(stream, frames[:, :, :-1])
    eager = _State(stream.fill, {k: v.clone() for k, v in buffers.items()})
    with torch.inference_mode():
        expected = _forward(stream.net, frames[:, :, -1:].to(stream.device), eager, scope=stream.se,
                            pool=stream.pool_frames)[:, 0].float().cpu().log_softmax(1)
    stream.engine.load(buffers)
    got = stream.engine(frames[:, :, -1]).log_softmax(1)
    diff = (got.exp() - expected.exp()).abs().max().item()
    log_diff = (got - expected).abs().max().item()
    if not (diff <= FP32_TOLERANCE and log_diff <= FP32_LOG_TOLERANCE):
        raise BackendError(f"the openvino stream disagrees with eager PyTorch: max |dp| {diff:.1e}, "
                           f"max |d log p| {log_diff:.1e}; refusing to run it")
    return diff


@dataclass
class Step:
    """One decoded frame of a streamed video, and the prediction current once it has been through."""

    frame: int  # ordinal of the decoded frame
    time: float  # seconds into the video
    image: av.VideoFrame
    fps: float  # the source's frame rate
    steps: list[int]  # the network steps it was fed as (none between strides; several if the video is slow)
    probs: Tensor | None  # (classes,) probabilities after the latest step; None until the delay has passed


def stream_video(stream: StreamingX3D, source: str | os.PathLike[str], recipe: Recipe, *, threads: int = 0,
                 timeout: float = 10.0) -> Iterator[Step]:
    """Decode ``source`` (a file or a live URL) frame by frame and feed ``stream`` at the recipe's temporal
    stride: one step every ``stride`` frames at ``target_fps`` (every 5th frame of a 30 fps video for
    X3D-M, the same span of time at other rates). Each step's frame is resized as co3d's streams are
    (short side to the training crop, bilinear, the recipe's normalisation) and centre-cropped square.
    Yields every decoded frame, in order, once its steps are done (through ``stream.run``, so an engine
    in stages overlaps consecutive steps); a source that breaks raises ``VideoError`` after the frames it
    gave."""
    crop = stream.config.train_crop
    fmt = FrameFormat(crop, "bilinear", recipe.mean, recipe.std)
    with FrameSource(source, threads=threads, timeout=timeout) as frames:
        every = recipe.stride * frames.info.fps / recipe.target_fps  # source frames per step
        due: deque[list] = deque()  # decoded frames not yet yielded: [ordinal, seconds, image, steps, results due]

        def inputs() -> Iterator[Tensor]:
            next_at, step = 0.0, 0
            for ordinal, seconds, image in frames:
                fed, x = [], None
                while ordinal + 1e-6 >= next_at:  # a video slower than the step rate repeats frames, as linspace does
                    if x is None:
                        x = fmt(image)  # (3, H, W) normalised, short side = crop
                        y0, x0 = crop_offsets(x.shape[1], x.shape[2], crop, 1, "slowfast")[0]
                        x = x[None, :, y0:y0 + crop, x0:x0 + crop]
                    fed.append(step)
                    step += 1
                    next_at += every
                due.append([ordinal, seconds, image, fed, len(fed)])
                yield from (x for _ in fed)

        probs = None

        def ready() -> Iterator[Step]:
            while due and due[0][4] == 0:
                ordinal, seconds, image, fed, _ = due.popleft()
                yield Step(ordinal, seconds, image, frames.info.fps, fed, probs)

        try:
            for scores in stream.run(inputs()):
                next(entry for entry in due if entry[4])[4] -= 1  # the oldest frame still due a result
                probs = None if scores is None else scores[0].softmax(0)
                yield from ready()
        except Exception:
            yield from ready()  # the frames whose steps are done, then the source's error
            raise
        yield from ready()


def warmup_frames(stream: StreamingX3D) -> int:
    """Frames co3d feeds before the one it scores (its ``init_frame`` protocol): its scripts' forward frame
    delay, 0.7 x (the convolutions' receptive field + the pool), or the network's delay if longer."""
    padding = (stream.receptive_field - stream.delay - 1)
    return max(stream.delay, int(0.7 * (2 * padding + stream.pool_frames)) - 1)


class ClipScorer:
    """Scores clips ``(B, 3, N, H, W)`` as co3d evaluates a continual network: from a clean state, the N
    frames through the stream, and the last step's scores. Fed ``chunk`` frames at a time (batched over
    time and over the clips), so memory stays that of a ``chunk``-frame clip however long N is."""

    def __init__(self, stream: StreamingX3D, *, chunk: int = 16) -> None:
        self.stream, self.chunk, self.config = stream, chunk, stream.config

    def __call__(self, clips: Tensor) -> Tensor:
        self.stream.reset()
        scores = None
        for start in range(0, clips.shape[2], self.chunk):
            out = self.stream.forward_steps(clips[:, :, start:start + self.chunk])
            scores = out[:, -1] if out.shape[1] else scores
        if scores is None:
            raise ConfigError(f"{clips.shape[2]} frames do not reach past the stream's delay of {self.stream.delay}")
        return scores

    def describe(self) -> str:
        s = self.stream
        return (f"streaming {s.config.name} (eager torch on {s.device}): pool {s.pool_frames}, se {s.se}, "
                f"fill {s.fill}, delay {s.delay}, receptive field {s.receptive_field}")
