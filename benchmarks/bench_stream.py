"""Streaming X3D against the clip model, per prediction, in one run on this machine (batch 1).

    python benchmarks/bench_stream.py [--models x3d_s x3d_m] [--steps 60] [--clips 10] [--stages 2] [--co3d CHECKOUT]

Per model (random weights; speed does not depend on them): the multiply-adds of one steady-state step
(FlopCounterMode: conv and linear layers, as the clip models' GMACs are counted; co3d measured 166.6 M
for S and 325.5 M for M), steady-state steps/s of the stream on eager PyTorch and on OpenVINO (where
installed) as one graph stepped by ``step`` and in ``--stages`` parts overlapped by ``run`` (the default
engine of ``x3dnet stream``), the clip model's clips/s on the same engines (when every prediction needs a
clip, clips/s is predictions/s), their ratio (target: at least 8x for X3D-M on the default engine), and
the latency of a step (median and 99th percentile; for overlapped stages, of the interval between results). Rates come from median calls (a noisy neighbour
moves a mean); rows are measured one after another in this process; run it on a quiet machine.
``--co3d CHECKOUT`` also times co3d's own CoX3D (same size, frame SE, replicate fill) from a co3d
checkout, with ``pip install continual-inference==1.2.4``: the issue's side-by-side (target: 3x its steps/s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from x3dnet import create_model
from x3dnet.backends import create_engine, installed
from x3dnet.profile import cpu_name
from x3dnet.streaming import StreamingX3D


def step_macs(stream: StreamingX3D, frame: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as counter:
        stream.step(frame)
    return counter.get_total_flops() / 2


def stream_rate(model, backend: str, steps: int, stages: int = 1) -> tuple[float, float, float, float | None]:
    """(steps/s from the median step, median ms, p99 ms) of steady-state steps, and (eager only) the
    multiply-adds of one step. One stage: ``step`` calls, timed one by one (a step's latency). Several:
    ``run`` over a stream of frames, overlapping the stages, timed between consecutive results (a
    frame's result comes that many intervals after it went in). The engine is gone when this returns:
    an idle engine's threads would compete with the next row's."""
    stream = StreamingX3D(model, backend=backend, stages=stages)
    crop = model.config.train_crop
    frames = torch.randn(8, 1, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    for t in range(stream.delay + 4):  # past the delay: the engine holds the state from here
        stream.step(frames[t % 8])
    times = []
    if stages == 1:
        for t in range(steps):
            start = time.perf_counter()
            stream.step(frames[t % 8])
            times.append(time.perf_counter() - start)
    else:
        last = time.perf_counter()
        for _ in stream.run(frames[t % 8] for t in range(steps + 1)):
            now = time.perf_counter()
            times.append(now - last)
            last = now
        times = times[1:]  # the first result waited for the pipeline to fill
    times.sort()
    median = statistics.median(times)
    macs = step_macs(stream, frames[0]) if backend == "torch" else None
    return 1 / median, 1e3 * median, 1e3 * times[int(0.99 * (len(times) - 1))], macs


def clip_rate(model, backend: str, clips: int) -> float:
    """Clips/s of the clip model from its median call (batch 1, the training clip)."""
    engine = create_engine(model, backend=backend)  # gone when this returns, as the stream's
    c = model.config
    x = torch.randn(1, 3, c.frames, c.train_crop, c.train_crop)
    engine(x)
    times = []
    for _ in range(clips):
        start = time.perf_counter()
        engine(x)
        times.append(time.perf_counter() - start)
    return 1 / statistics.median(times)


# co3d's hyper-parameters for its CoX3D (models/x3d/hparams/<size>.yaml), for --co3d.
CO3D_HPARAMS = {
    "x3d_s": {"image_size": 160, "temporal_window_size": 13, "x3d_depth_factor": 2.2},
    "x3d_m": {"image_size": 224, "temporal_window_size": 16, "x3d_depth_factor": 2.2},
}


def co3d_rate(checkout: Path, name: str, steps: int) -> float:
    """Steady-state steps/s (median) of co3d's own CoX3D, built from a co3d checkout with
    continual-inference installed: run side by side, not copied. co3d's models/common/__init__ pulls in its
    training framework, so the three files CoX3D needs are loaded directly."""
    import importlib.util
    import sys
    import types

    def load(module: str, path: Path) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(module, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[module] = loaded
        spec.loader.exec_module(loaded)
        return loaded

    for package, folder in (("models", "models"), ("models.common", "models/common"),
                            ("models.cox3d", "models/cox3d"), ("models.cox3d.modules", "models/cox3d/modules")):
        module = types.ModuleType(package)
        module.__path__ = [str(checkout / folder)]
        sys.modules[package] = module
    res = load("models.common.res", checkout / "models/common/res.py")
    sys.modules["models.common"].CoResStage, sys.modules["models.common"].init_weights = res.CoResStage, res.init_weights
    x3d = load("models.cox3d.modules.x3d", checkout / "models/cox3d/modules/x3d.py")
    hp = CO3D_HPARAMS[name]
    net = x3d.CoX3D(dim_in=3, num_classes=400, x3d_conv1_dim=12, x3d_conv5_dim=2048, x3d_num_groups=1,
                    x3d_width_per_group=64, x3d_width_factor=2.0, x3d_bottleneck_factor=2.25,
                    x3d_use_channelwise_3x3x3=1, x3d_dropout_rate=0.5, x3d_head_activation="softmax",
                    x3d_head_batchnorm=0, x3d_fc_std_init=0.01, x3d_final_batchnorm_zero_init=1,
                    temporal_fill="replicate", se_scope="frame", **hp).eval()
    crop = hp["image_size"]
    frames = torch.randn(8, 1, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for t in range(net.delay + 4 + steps):
            start = time.perf_counter()
            net.forward_step(frames[t % 8])
            times.append(time.perf_counter() - start)
    return 1 / statistics.median(times[-steps:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["x3d_s", "x3d_m"])
    parser.add_argument("--steps", type=int, default=60, help="timed steady-state steps per row (default 60)")
    parser.add_argument("--clips", type=int, default=10, help="timed clips per clip-model row (default 10)")
    parser.add_argument("--stages", type=int, default=2,
                        help="also time the OpenVINO stream in this many overlapped stages, as x3dnet stream runs "
                             "it (default 2; 1: only the single graph)")
    parser.add_argument("--co3d", type=Path, metavar="CHECKOUT",
                        help="also time co3d's own CoX3D from this co3d checkout (needs continual-inference)")
    args = parser.parse_args()
    default = "openvino" if installed("openvino") else "torch"
    engines = ["torch"] + ([default] if default != "torch" else [])
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch 1")
    for name in args.models:
        model = create_model(name).eval()
        c = model.config
        rates = {}
        for backend in engines:
            clips_s = clip_rate(model, backend, args.clips)
            for stages in (1, args.stages) if backend == "openvino" and args.stages > 1 else (1,):
                steps_s, median, p99, macs = stream_rate(model, backend, args.steps, stages)
                label = backend if stages == 1 else f"{backend}, {stages} stages overlapped"
                rates[label] = steps_s
                what = "step" if stages == 1 else "interval"
                line = (f"{name} {label:>8}: stream {steps_s:6.2f} steps/s ({what} {median:.1f} ms median, {p99:.1f} "
                        f"ms p99), clip model {clips_s:5.2f} clips/s ({c.frames}x{c.train_crop}^2): "
                        f"{steps_s / clips_s:5.2f}x")
                if macs is not None:
                    line += f"; {macs / 1e6:.1f} M multiply-adds per step"
                print(line, flush=True)
        if args.co3d:
            theirs = co3d_rate(args.co3d, name, args.steps)
            print(f"{name} co3d's CoX3D (eager, continual-inference): {theirs:6.2f} steps/s; ours: eager "
                  f"{rates['torch'] / theirs:.2f}x" + "".join(f", {b} {rates[b] / theirs:.2f}x" for b in rates if b != "torch"),
                  flush=True)
        stream = StreamingX3D(model)
        print(f"{name}: delay {stream.delay} steps, receptive field {stream.receptive_field} (pool {stream.pool_frames}, "
              f"se {stream.se}, fill {stream.fill})", flush=True)


if __name__ == "__main__":
    main()
