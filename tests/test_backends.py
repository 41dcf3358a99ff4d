"""Engines against the original's outputs, the checks that make an engine refuse, export and profile."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import checkpoint_path, reference_io, tiny_config
from test_cli import assert_one_line_error, x3dnet
from test_predict import (  # noqa: F401
    TINY_RECIPE,  # noqa: F401  (shares the module-scoped fixtures below)
    clip_video,
    tiny,
)

from x3dnet import X3D, load_weights
from x3dnet.backends import (
    BACKENDS,
    TorchEngine,
    check_engine,
    cpu_units,
    create_engine,
    fold_batchnorm,
    installed,
    openvino_core,
    pick_backend,
    supported,
)
from x3dnet.errors import BackendError

INSTALLED = [b for b in BACKENDS if installed(b)]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HAS_BF16 = installed("openvino") and "BF16" in cpu_units()  # this machine's CPU, as the product probes it
# What the probe says on the CPUs these tests run on: an AMD Zen 3 (no bf16), a Xeon with AVX-512 BF16/AMX.
CPUS = {"no bf16": frozenset({"FP32", "INT8"}), "bf16": frozenset({"FP32", "BF16", "INT8"}),
        "bf16 and fp16": frozenset({"FP32", "BF16", "FP16", "INT8"})}


@pytest.fixture(params=list(CPUS))
def fake_cpu(request, monkeypatch) -> frozenset[str]:
    """The capability probe answering as another CPU would."""
    monkeypatch.setattr("x3dnet.backends.cpu_units", lambda: CPUS[request.param])
    return CPUS[request.param]


@pytest.fixture(scope="module")
def tiny_a() -> X3D:
    model = X3D(tiny_config("tiny_a"))
    load_weights(model, checkpoint_path("tiny_a", "slowfast"))
    return model.eval()


def test_the_fast_engines_are_installed_for_the_tests():
    # make test installs x3dnet[fast]; without it the parity tests below would cover only torch.
    assert INSTALLED == list(BACKENDS)


@pytest.mark.parametrize("backend", INSTALLED)
@pytest.mark.parametrize("crop", ["train", "test"])
def test_fp32_engines_match_the_original(tiny_a, backend, crop):
    io = reference_io("tiny_a")
    x, expected = io[f"x_{crop}"].float(), io[f"probs_{crop}"]
    engine = create_engine(tiny_a, backend=backend, input_shape=tuple(x.shape[2:]))
    assert engine.parity is not None and engine.parity <= 1e-4
    torch.testing.assert_close(engine(x).softmax(1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", [b for b in INSTALLED if b in ("torch", "torch-opt", "openvino")])
def test_bf16_engines_pick_the_original_top1(tiny_a, backend):
    io = reference_io("tiny_a")
    x = io["x_train"].float()
    if backend == "openvino" and not HAS_BF16:
        # This CPU has no bf16 units: OpenVINO would run f32 while claiming bf16, so x3dnet refuses it.
        with pytest.raises(BackendError, match="this CPU has no bf16 units"):
            create_engine(tiny_a, backend=backend, precision="bf16", input_shape=tuple(x.shape[2:]))
        return
    engine = create_engine(tiny_a, backend=backend, precision="bf16", input_shape=tuple(x.shape[2:]))
    assert engine(x).argmax(1).tolist() == io["probs_train"].argmax(1).tolist()


@CUDA
@pytest.mark.parametrize("backend", ["torch", "torch-opt"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("crop", ["train", "test"])
def test_cuda_engines_match_the_original(tiny_a, backend, precision, crop):
    io = reference_io("tiny_a")
    x, expected = io[f"x_{crop}"].float(), io[f"probs_{crop}"]
    engine = create_engine(tiny_a, backend=backend, device="cuda", precision=precision,
                           input_shape=tuple(x.shape[2:]))
    probs = engine(x).softmax(1).cpu()
    if precision == "fp32":
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    else:
        assert probs.argmax(1).tolist() == expected.argmax(1).tolist()


@pytest.mark.parametrize("backend", INSTALLED)
def test_engines_take_any_batch_size(tiny_a, backend):
    # OpenVINO runs a batch clip by clip; every engine must agree at each batch size.
    x = reference_io("tiny_a")["x_train"].float()
    clips = torch.cat([x, x.flip(0), x])  # more clips than the parity check's two
    engine = create_engine(tiny_a, backend=backend, input_shape=tuple(x.shape[2:]))
    with torch.inference_mode():
        expected = tiny_a(clips).softmax(1)
    for batch in (1, 3, len(clips), 1):
        got = torch.cat([engine(clips[i:i + batch]) for i in range(0, len(clips), batch)]).softmax(1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_folding_batchnorm_is_exact(tiny_a):
    x = reference_io("tiny_a")["x_test"].float()
    folded = fold_batchnorm(tiny_a)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    with torch.inference_mode():
        torch.testing.assert_close(folded(x).softmax(1), tiny_a(x).softmax(1), atol=1e-6, rtol=0)


def test_an_engine_that_disagrees_refuses_to_run(tiny_a):
    other = X3D(tiny_a.config).eval()
    other.load_state_dict(tiny_a.state_dict())
    with torch.no_grad():
        other.fc2.bias[3] += 0.05  # a small change: probabilities move by ~1e-3
    engine = TorchEngine(other, device="cpu", precision="fp32", input_shape=(4, 64, 64))
    with pytest.raises(BackendError, match="disagrees with eager PyTorch"):
        check_engine(engine, tiny_a)
    untrained = X3D(tiny_a.config).eval()  # near-uniform probabilities: caught by log-probabilities
    engine = TorchEngine(untrained, device="cpu", precision="fp32", input_shape=(4, 64, 64))
    with pytest.raises(BackendError, match="max \\|d log p\\|"):
        check_engine(engine, X3D(tiny_a.config).eval())
    with torch.no_grad():
        other.fc2.bias[3] += 50.0  # class 3 always wins: another top-1
    engine = TorchEngine(other, device="cpu", precision="bf16", input_shape=(4, 64, 64))
    with pytest.raises(BackendError, match="another top-1"):
        check_engine(engine, tiny_a)


def test_auto_and_unsupported_combinations(tiny_a, fake_cpu):
    assert pick_backend("cpu", "fp32") == "openvino"
    # Without bf16 units OpenVINO cannot run bf16; torch-opt's autocast can, on any CPU.
    assert pick_backend("cpu", "bf16") == ("openvino" if "BF16" in fake_cpu else "torch-opt")
    assert pick_backend("cpu", "fp16") == ("openvino" if "FP16" in fake_cpu else "torch")
    for precision in ("bf16", "fp16"):
        reason = supported("openvino", "cpu", precision)
        assert reason == (None if precision.upper() in fake_cpu else f"openvino: this CPU has no {precision} units")
    if "BF16" not in fake_cpu:
        with pytest.raises(BackendError, match="this CPU has no bf16 units"):
            create_engine(tiny_a, backend="openvino", precision="bf16")
    if torch.cuda.is_available():
        assert pick_backend("cuda", "fp32") == "torch-opt"
    with pytest.raises(BackendError, match="onnxruntime runs fp32 only"):
        create_engine(tiny_a, backend="onnxruntime", precision="bf16")
    with pytest.raises(BackendError, match="runs fp16 on CUDA only"):
        create_engine(tiny_a, backend="torch", precision="fp16")
    if "FP16" not in fake_cpu:
        with pytest.raises(BackendError, match="this CPU has no fp16 units"):
            create_engine(tiny_a, backend="openvino", precision="fp16")
    with pytest.raises(BackendError, match="backend must be"):
        create_engine(tiny_a, backend="tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA is not available"):
            create_engine(tiny_a, backend="torch-opt", device="cuda")


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "openvino --banded"])
def test_export_writes_a_checked_graph_with_a_dynamic_batch(tiny, tmp_path, fmt):  # noqa: F811
    model, weights = tiny
    fmt, *flags = fmt.split()
    out = tmp_path / ("x3d.onnx" if fmt == "onnx" else "x3d.xml")
    result = x3dnet("export", "--weights", weights, "--format", fmt, "--out", out, "--crop", 80, *flags)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: tiny_a") and "input (batch, 3, 4, 80, 80)" in result.stdout
    x = reference_io("tiny_a")["x_test"].float().repeat(2, 1, 1, 1, 1)[:3]  # a batch of 3, unseen at export
    if fmt == "onnx":
        import onnxruntime as ort

        scores = ort.InferenceSession(str(out)).run(None, {"clips": x.numpy()})[0]
    else:
        assert out.with_suffix(".bin").exists()
        # f32 said explicitly: on CPUs with bf16 units OpenVINO would otherwise run bf16
        scores = openvino_core().compile_model(str(out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x.numpy())[0]
    with torch.inference_mode():
        expected = model(x).softmax(1)
    torch.testing.assert_close(torch.from_numpy(np.asarray(scores)).softmax(1), expected, atol=1e-5, rtol=0)


def test_export_errors(tiny, tmp_path):  # noqa: F811
    _, weights = tiny
    result = x3dnet("export", "--weights", weights, "--format", "onnx", "--out", tmp_path / "no" / "dir" / "x.onnx")
    assert_one_line_error(result, "cannot write")
    assert_one_line_error(x3dnet("export", "--format", "onnx", "--out", tmp_path / "x.onnx"), "needs --model")
    result = x3dnet("export", "--weights", weights, "--format", "onnx", "--out", tmp_path / "x.onnx", "--crop", 32)
    assert_one_line_error(result, "input too small for tiny_a's head window: the conv5 map is 4x1x1")


def test_predict_with_a_fast_backend_gives_the_same_scores(tiny, clip_video):  # noqa: F811
    _, weights = tiny
    runs = [x3dnet("predict", clip_video, "--weights", weights, "--views", 30, "--json", "--top", 10,
                   "--backend", backend) for backend in ("torch", "auto")]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr
    eager, fast = (json.loads(r.stdout)["predictions"] for r in runs)
    assert [p["index"] for p in eager][:3] == [p["index"] for p in fast][:3]
    for p, q in zip(sorted(eager, key=lambda p: p["index"]), sorted(fast, key=lambda p: p["index"]), strict=True):
        assert abs(p["score"] - q["score"]) <= 1e-5


@pytest.mark.parametrize("cpu", ["this CPU", "no bf16"])
def test_profile_rows(tmp_path, cpu):
    # In a process of its own (building engines and then forking DataLoader workers in one process is what
    # evaluate avoids, and later tests fork): there the capability probe can answer as a CPU without bf16.
    fake = "" if cpu == "this CPU" else f"backends.cpu_units = lambda: frozenset({sorted(CPUS[cpu])!r}); "
    bf16 = HAS_BF16 and cpu == "this CPU"
    plot = tmp_path / "profile.png"
    args = ["profile", "--model", "x3d_xs", "--backend", "torch", "auto", "--precision", "fp32", "bf16",
            "--runs", "2", "--warmup", "1", "--json", "--plot", str(plot)]
    code = f"from x3dnet import backends, cli; {fake}raise SystemExit(cli.main({args!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["backend"], r["precision"]) for r in rows] == [
        ("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino" if bf16 else "torch-opt", "bf16")]
    for r in rows:
        assert (r["model"], r["input"], r["batch_size"], r["gmacs"], r["params_m"]) == (
            "x3d_xs", "4x160x160", 1, 0.6053, 3.794)
        assert r["clips_per_s"] > 0 and r["clips_per_s_std"] >= 0 and r["peak_mem_mb"] > 0
        # latency is the mean time per clip, clips/s the mean rate: the mean of the reciprocals is at least the
        # reciprocal of the mean (equal when every run takes as long), whatever the machine's load does to the
        # runs (a 50% band around it failed on a loaded machine: 2354 ms against 1000 / clips/s = 1515 ms).
        assert r["latency_ms"] + 0.005 >= 1000 / (r["clips_per_s"] + 0.0005)  # both are rounded
    assert plot.stat().st_size > 10_000


def test_an_export_that_fails_its_check_leaves_nothing(tiny_a, tmp_path):
    broken = X3D(tiny_a.config).eval()
    broken.load_state_dict(tiny_a.state_dict())
    with torch.no_grad():
        broken.fc2.bias[3] += 0.05  # what the written graph computes differs from the model it is checked against
    from x3dnet import backends

    real = backends.export_onnx
    with pytest.MonkeyPatch.context() as patch:  # the graph is exported from the broken copy, checked against tiny_a
        patch.setattr(backends, "export_onnx", lambda model, path, **kw: real(broken, path, **kw))
        with pytest.raises(BackendError, match="disagrees with eager PyTorch"):
            backends.export_model(tiny_a, tmp_path / "x.onnx", format="onnx", input_shape=(4, 64, 64))
    assert list(tmp_path.iterdir()) == []
    path, diff = backends.export_model(tiny_a, tmp_path / "x.onnx", format="onnx", input_shape=(4, 64, 64))
    assert path == tmp_path / "x.onnx" and diff <= 1e-4 and [p.name for p in tmp_path.iterdir()] == ["x.onnx"]


# Builds OpenVINO engines and a two-stage OpenVINO stream the way x3dnet does, drops them in the order they
# were made, then has children end under a Python SIGCHLD handler (as DataLoader workers and subprocesses
# end in x3dnet's processes) and prints whether the main thread's alternate signal stack is still mapped.
_SIGNAL_STACK_SCRIPT = """
import ctypes, gc, signal, subprocess, sys
from x3dnet.backends import create_engine
from x3dnet.factory import load_model
from x3dnet.streaming import StreamingX3D

class Stack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

def state():
    s = Stack()
    ctypes.CDLL(None).sigaltstack(None, ctypes.byref(s))
    if s.flags & 2:  # SS_DISABLE
        return "none"
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= s.sp and s.sp + s.size <= hi:
            return "mapped"
    return "unmapped"

model, _ = load_model(weights=sys.argv[1])
made = [create_engine(model, backend="openvino", input_shape=(4, 48, 48)) for _ in range(2)]
made.append(StreamingX3D(model, pool_frames=3, backend="openvino", stages=2))
while made:
    del made[0]
    gc.collect()
print(state(), flush=True)
signal.signal(signal.SIGCHLD, lambda *_: None)
for _ in range(3):
    subprocess.run(["true"], check=True)
print("children reaped", state(), flush=True)
"""


@pytest.mark.skipif(not installed("openvino") or not sys.platform.startswith("linux"), reason="openvino on Linux")
def test_openvino_leaves_every_signal_handler_a_stack_to_run_on(tiny):  # noqa: F811
    """Each OpenVINO Core makes its own CPU plugin, which swaps in an alternate signal stack of its own and
    unmaps it when destroyed. With a Core per engine and per stream stage, dropping them in the order made
    left the thread's alternate stack unmapped, and the next child to end killed the process with SIGSEGV
    (si_code SI_KERNEL: the kernel found no stack to write a signal frame on), which is what struck the test suite
    at random. x3dnet keeps one Core for the process (``openvino_core``)."""
    _, weights = tiny
    done = subprocess.run([sys.executable, "-c", _SIGNAL_STACK_SCRIPT, str(weights)], capture_output=True, text=True)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split("\n")[:2] == ["mapped", "children reaped mapped"], done.stdout
    assert openvino_core() is openvino_core()
