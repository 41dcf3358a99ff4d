"""Engines against eager PyTorch and against OpenVINO run by hand, batch 1, in one interleaved run.

    python benchmarks/bench_backends.py [--rounds 16] [--models x3d_xs x3d_m]

For each model (random weights, training clip): eager torch, torch-opt, ONNX Runtime, OpenVINO fp32 and
bf16 through x3dnet, and the same (banded) ONNX graph compiled for the same static shape and run directly
with OpenVINO's own API (no x3dnet code in the timed call), and the plain export run the same way. Every
round times one clip on each, so the ratios hold on a noisy machine.
Prints clips/s (best round, and the median), GFLOP/s (2 x MACs x clips/s) against a same-run fp32 matmul
peak, and ratios (best over best, and the median of the ratios within each round), among them the
targets: default CPU backend / eager >= 4 (X3D-M fp32), x3dnet's OpenVINO / raw OpenVINO >= 0.95,
bf16 / fp32 >= 1.6.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import openvino as ov
import torch

from x3dnet import create_model
from x3dnet.backends import cpu_units, create_engine, export_onnx, openvino_core, pick_backend, supported
from x3dnet.profile import count_macs, cpu_name


def matmul_peak(seconds: float = 2.0, n: int = 2048) -> float:
    """fp32 GFLOP/s of torch's matmul on this machine, the best of repeated 2048^3 products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["x3d_xs", "x3d_m"])
    args = parser.parse_args()
    peak = matmul_peak()
    print(f"torch {torch.__version__}, OpenVINO {ov.__version__}, {torch.get_num_threads()} threads; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s; default CPU backend: {pick_backend('cpu', 'fp32')}")
    print(f"CPU: {cpu_name()}; OpenVINO's units: {', '.join(sorted(cpu_units()))}")
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        c = model.config
        shape = (c.frames, c.train_crop, c.train_crop)
        clip = torch.randn(1, 3, *shape)
        runners = {}
        for label, backend, precision in [("eager torch", "torch", "fp32"), ("torch-opt", "torch-opt", "fp32"),
                                          ("onnxruntime", "onnxruntime", "fp32"), ("openvino fp32", "openvino", "fp32"),
                                          ("openvino bf16", "openvino", "bf16"), ("auto fp32", "auto", "fp32")]:
            if backend != "auto" and (reason := supported(backend, "cpu", precision)):
                print(f"skipping {label}: {reason}")  # what this CPU cannot run is left out, not an error
                continue
            engine = create_engine(model, backend=backend, precision=precision)
            runners[label] = lambda e=engine, x=clip: e(x)
        with tempfile.TemporaryDirectory() as tmp:
            core = openvino_core()  # the engines' one Core: see openvino_core
            # The graph x3dnet compiles (banded), and the plain export, to show what banding gains.
            for form, banded in (("", True), (" plain", False)):
                graph = core.read_model(str(export_onnx(model, Path(tmp) / "m.onnx", banded=banded)))
                graph.reshape([1, 3, *clip.shape[2:]])  # one clip, static, as x3dnet compiles it
                for precision in ("f32", "bf16") if "BF16" in cpu_units() else ("f32",):
                    compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                                 "PERFORMANCE_HINT": "LATENCY"})
                    request, data = compiled.create_infer_request(), clip.numpy()
                    runners[f"raw openvino {precision}{form}"] = (
                        lambda r=request, d=data: r.infer({0: d}, share_inputs=True))
        times = {k: [] for k in runners}
        for run in runners.values():  # warm-up
            run()
            run()
        labels = list(runners)
        for r in range(args.rounds):
            for i in range(len(labels)):  # rotated each round: every engine follows every other alike
                label = labels[(i + r) % len(labels)]
                t = time.perf_counter()
                runners[label]()
                times[label].append(time.perf_counter() - t)
        # The best round of each engine: other engines' lingering threads only ever slow a call down, so
        # the fastest of N estimates what an engine can do; medians show the spread.
        cps = {k: 1 / min(v) for k, v in times.items()}
        median = {k: 1 / statistics.median(v) for k, v in times.items()}
        gmacs = count_macs(c) / 1e9
        print(f"\n{name} at {'x'.join(map(str, shape))} ({gmacs:.4f} GMACs), batch 1, {args.rounds} rounds")
        for label, rate in cps.items():
            gflops = 2 * gmacs * rate
            print(f"  {label:24s} {rate:8.2f} clips/s (median {median[label]:7.2f})  {gflops:7.1f} GFLOP/s  "
                  f"({gflops / peak:.0%} of matmul peak)")

        def ratio(a: str, b: str, times: dict[str, list[float]] = times, cps: dict[str, float] = cps) -> str:
            """a's speed over b's: best over best, and the median over rounds of the ratio within a round
            (both timed within a second of each other, so a slow spell of the machine slows both)."""
            if a not in times or b not in times:
                return "   n/a (not run on this CPU)"
            rounds = statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))
            return f"{cps[a] / cps[b]:6.3f} {rounds:8.3f}"

        print("  ratios                        best  per-round median")
        print(f"  auto / eager:               {ratio('auto fp32', 'eager torch')}  (target >= 4 for x3d_m)")
        print(f"  openvino fp32 / raw f32:    {ratio('openvino fp32', 'raw openvino f32')}  (target >= 0.95)")
        print(f"  openvino bf16 / raw bf16:   {ratio('openvino bf16', 'raw openvino bf16')}")
        print(f"  openvino bf16 / fp32:       {ratio('openvino bf16', 'openvino fp32')}  (target >= 1.6)")
        print(f"  banded / plain graph, f32:  {ratio('raw openvino f32', 'raw openvino f32 plain')}")
        print(f"  banded / plain graph, bf16: {ratio('raw openvino bf16', 'raw openvino bf16 plain')}")
        print(f"  torch-opt / eager:          {ratio('torch-opt', 'eager torch')}")
        print(f"  auto / openvino fp32:       {ratio('auto fp32', 'openvino fp32')}  (the same engine twice: "
              "the run's noise)")

if __name__ == "__main__":
    main()
