"""Inference engines behind one interface: eager torch, torch-opt, OpenVINO and ONNX Runtime.

Every engine is built from the one ``X3D`` model (folded, exported or converted from it, never a second
copy of the network) and, unless told otherwise, checked against eager PyTorch when it is built, for
its input size and precision: fp32 must agree to 1e-4 in probability, bf16/fp16 must pick the same
top-1 class. An engine that disagrees refuses to run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .banding import BandedX3D
from .errors import BackendError
from .model import X3D, fold_batchnorm

BACKENDS = ("torch", "torch-opt", "openvino", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "fp16")
FP32_TOLERANCE = 1e-4  # max |p_engine - p_eager| for an fp32 engine
FP32_LOG_TOLERANCE = 1e-3  # and max |log p_engine - log p_eager|
TIE_TOLERANCE = 1e-2  # a bf16/fp16 top-1 is the same if eager's log-probability for it is this close to its best
_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


class Engine:
    """``engine(clips)`` returns what ``X3D.forward`` returns (its softmax is the original's output)."""

    backend = "torch"

    def __init__(self, model: X3D, *, device: str, precision: str, input_shape: tuple[int, int, int],
                 threads: int | None = None):
        self.config = model.config
        self.device, self.precision, self.input_shape = device, precision, input_shape
        self.threads = threads  # CPU threads for inference (None: the engine's default, every core)
        self.parity: float | None = None  # max |dp| against eager, once checked

    def __call__(self, clips: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.backend} {self.precision} on {self.device}"


def cuda_fp32() -> None:
    """fp32 on CUDA means fp32: no TF32, PyTorch's default for cuDNN's convolutions (it rounds their inputs to
    10-bit mantissas). With it X3D's probabilities moved by 1e-3 on an H100, which the parity checks rightly
    refuse. Process-wide flags: inference, streaming and fp32 training set them."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class TorchEngine(Engine):
    """Eager PyTorch; bf16/fp16 by autocast."""

    def __init__(self, model: X3D, **kw: object):
        super().__init__(model, **kw)
        self.model = model.eval().to(self.device)
        if self.threads:
            torch.set_num_threads(self.threads)  # process-wide: torch has no per-model setting
        if self.cuda and self.precision == "fp32":
            cuda_fp32()

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=torch.device(self.device).type, dtype=dtype)

    @torch.inference_mode()
    def __call__(self, clips: Tensor) -> Tensor:
        with self._autocast():
            return self.model(self._prepare(clips)).float()

    def _prepare(self, clips: Tensor) -> Tensor:
        return clips.to(self.device)


class TorchOptEngine(TorchEngine):
    """BN folded into the convs and inference mode; on the CPU channels-last 3-D, on CUDA cudnn autotuning
    and one CUDA graph per input shape (the network is hundreds of small kernels: replaying them as one
    graph ran X3D-M at batch 1 4x faster on an H100; channels-last 3-D there was 2.5x slower at batch 16).
    ``compile=True`` uses ``torch.compile`` instead of graphs."""

    backend = "torch-opt"
    _GRAPHS = 4  # input shapes kept captured (each holds its own memory)

    def __init__(self, model: X3D, *, compile: bool = False, **kw: object):
        super().__init__(fold_batchnorm(model), **kw)
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self.use_graphs = self.cuda and not compile
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        else:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        if compile:
            self.model = torch.compile(self.model)

    def _prepare(self, clips: Tensor) -> Tensor:
        if self.cuda:
            return clips.to(self.device)
        return clips.to(self.device, memory_format=torch.channels_last_3d)

    @torch.inference_mode()
    def __call__(self, clips: Tensor) -> Tensor:
        if not self.use_graphs:
            return super().__call__(clips)
        key = tuple(clips.shape)
        if key not in self.graphs:
            if len(self.graphs) >= self._GRAPHS:
                del self.graphs[next(iter(self.graphs))]
            self.graphs[key] = self._capture(clips)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(clips)
        graph.replay()
        return static_out.to(torch.float32, copy=True)

    def _capture(self, clips: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = clips.to(self.device, copy=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._autocast():  # warm-up: cudnn picks its kernels before capture
            for _ in range(3):
                self.model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._autocast():
            static_out = self.model(static_in)
        return graph, static_in, static_out


class OnnxRuntimeEngine(Engine):
    """The exported ONNX graph in ONNX Runtime (fp32; CPU, or CUDA where its CUDA build is installed)."""

    backend = "onnxruntime"

    def __init__(self, model: X3D, *, path: Path | None = None, **kw: object):
        super().__init__(model, **kw)
        import onnxruntime as ort

        provider = "CUDAExecutionProvider" if self.device.startswith("cuda") else "CPUExecutionProvider"
        if provider not in ort.get_available_providers():
            raise BackendError(f"onnxruntime: this build has no {provider}")
        with tempfile.TemporaryDirectory() as tmp:
            path = path or export_onnx(model, Path(tmp) / "x3d.onnx", input_shape=self.input_shape)
            options = ort.SessionOptions()
            # Idle threads must not spin: they would steal the cores from whatever runs next.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.threads:
                options.intra_op_num_threads = self.threads
            self.session = ort.InferenceSession(str(path), options, providers=[provider])

    def __call__(self, clips: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {"clips": clips.float().cpu().numpy()})[0])


_OPENVINO_LOCK = threading.Lock()


@functools.cache
def _openvino_core_once():
    import openvino as ov

    return ov.Core()


def openvino_core():
    """The process's one OpenVINO ``Core``, which every engine, stream part and export here uses and which is
    never destroyed. Each Core makes its own CPU plugin, and each CPU plugin puts its own alternate signal
    stack on the thread that makes it and unmaps it when destroyed, restoring the one it replaced only if
    its own is still current. So two plugins alive at once and destroyed in the order they were made left
    the thread's alternate stack pointing at unmapped memory (measured with OpenVINO 2026.4): the next
    signal that Python handles there (SIGCHLD as a DataLoader worker or a subprocess ends, SIGINT) killed
    the process with SIGSEGV, or wrote its frame into whatever had been mapped there since. One Core,
    kept, makes one plugin."""
    with _OPENVINO_LOCK:
        return _openvino_core_once()


class OpenVinoEngine(Engine):
    """The model compiled by OpenVINO for the CPU, with an inference precision hint: exported to ONNX in its
    banded form (``x3dnet.banding``; X3D-M fp32 ran 10-16% faster than the plain graph on 2 cores), compiled
    for one clip, and a batch is run clip by clip: a batch of 4 compiled as one ran X3D-M 19% slower per
    clip in fp32 and 5% in bf16 (its tensors leave the caches). ``path``: run that ONNX or IR file instead."""

    backend = "openvino"
    _HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}

    def __init__(self, model: X3D, *, path: Path | None = None, **kw: object):
        super().__init__(model, **kw)
        if self.device != "cpu":
            raise BackendError("openvino: x3dnet runs OpenVINO on the CPU only")
        core = openvino_core()
        with tempfile.TemporaryDirectory() as tmp:
            path = path or export_onnx(model, Path(tmp) / "x3d.onnx", input_shape=self.input_shape, banded=True)
            graph = core.read_model(str(path))
        graph.reshape([1, 3, *self.input_shape])
        self.hint = self._HINTS[self.precision]
        self.ov_config = {"INFERENCE_PRECISION_HINT": self.hint, "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            self.ov_config["INFERENCE_NUM_THREADS"] = self.threads
        compiled = core.compile_model(graph, "CPU", self.ov_config)
        runs_in = compiled.get_property("INFERENCE_PRECISION_HINT")
        runs_in = runs_in.get_type_name() if hasattr(runs_in, "get_type_name") else str(runs_in)
        if runs_in != self.hint:
            raise BackendError(f"openvino: this CPU cannot run {self.precision} (it would run {runs_in})")
        self.request = compiled.create_infer_request()

    def __call__(self, clips: Tensor) -> Tensor:
        clips = np.ascontiguousarray(clips.float().cpu().numpy())
        out = np.empty((0, self.config.num_classes), np.float32)
        for i in range(len(clips)):
            self.request.infer({0: clips[i:i + 1]}, share_inputs=True)  # no copy of the clip
            scores = self.request.get_output_tensor(0).data
            if i == 0:
                out = np.empty((len(clips), *scores.shape[1:]), scores.dtype)
            out[i] = scores[0]
        return torch.from_numpy(out)


_ENGINES: dict[str, type[Engine]] = {
    "torch": TorchEngine, "torch-opt": TorchOptEngine, "openvino": OpenVinoEngine, "onnxruntime": OnnxRuntimeEngine,
}


def installed(backend: str) -> bool:
    return backend not in _MODULES or importlib.util.find_spec(_MODULES[backend]) is not None


def supported(backend: str, device: str, precision: str) -> str | None:
    """Why ``backend`` cannot run ``precision`` on ``device`` here, or None if it can."""
    cuda = device.startswith("cuda")
    if not installed(backend):
        return f"{backend} is not installed (pip install 'x3dnet[fast]')"
    if cuda and not torch.cuda.is_available():
        return f"device {device}: CUDA is not available here"
    if backend == "openvino" and cuda:
        return "openvino runs on the CPU only here"
    if backend == "onnxruntime" and precision != "fp32":
        return "onnxruntime runs fp32 only here"
    if precision == "fp16" and not cuda and backend != "openvino":
        return f"{backend} runs fp16 on CUDA only"
    if backend == "openvino" and precision != "fp32" and precision.upper() not in cpu_units():
        return f"openvino: this CPU has no {precision} units"
    return None


@functools.cache
def cpu_units() -> frozenset[str]:
    """The precisions this CPU computes natively, as OpenVINO reports them (FP32, BF16, FP16, INT8, ...).

    CPUs differ: an AMD Zen 3 has no BF16, a Xeon with AVX-512 BF16 or AMX has it. This is the one probe
    that decides what ``auto`` picks and what OpenVINO is allowed to run; the tests fake it to cover both.

    It asks in a child process: an OpenVINO core in this one makes every later fork (DataLoader workers)
    crash. Without OpenVINO it says FP32 only."""
    if not installed("openvino"):
        return frozenset({"FP32"})
    query = "import openvino as ov; print(' '.join(ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')))"
    done = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True, check=False)
    if done.returncode:
        raise BackendError(f"openvino cannot read this CPU's capabilities: {done.stderr.strip()[-200:]}")
    return frozenset(done.stdout.split())


def check_device(device: str) -> None:
    """Refuse, in one line, a device x3dnet cannot run on: only ``cpu`` and a ``cuda[:N]`` present here."""
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BackendError(f"device {device!r}: not a device; x3dnet runs on cpu or cuda[:N]") from None
    if kind.type not in ("cpu", "cuda"):
        raise BackendError(f"device {device}: x3dnet runs on cpu or cuda[:N], not {kind.type}")
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {device}: CUDA is not available here")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise BackendError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def pick_backend(device: str = "cpu", precision: str = "fp32") -> str:
    """``auto``: the fastest engine installed for the device and precision (measured by
    benchmarks/bench_backends.py: OpenVINO on the CPU, torch-opt on CUDA)."""
    order = ("torch-opt",) if device.startswith("cuda") else ("openvino", "torch-opt")
    for backend in order:
        if supported(backend, device, precision) is None:
            return backend
    return "torch"


def create_engine(
    model: X3D, *, backend: str = "auto", device: str = "cpu", precision: str = "fp32",
    input_shape: tuple[int, int, int] | None = None, check: bool = True, compile: bool = False,
    threads: int | None = None,
) -> Engine:
    """An engine for ``model`` on inputs ``(B, 3, *input_shape)`` (default: the training clip).

    Exported graphs have a dynamic batch and a fixed clip size; the torch engines take any size.
    ``threads`` caps the CPU threads it computes with (several processes sharing one machine).
    """
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    check_device(device)  # before auto picks an engine: a bad device is the device's fault, not an engine's
    backend = pick_backend(device, precision) if backend == "auto" else backend
    if backend not in _ENGINES:
        raise BackendError(f"backend must be auto or one of {', '.join(BACKENDS)}, not {backend!r}")
    reason = supported(backend, device, precision)
    if reason:
        raise BackendError(reason)
    c = model.config
    shape = input_shape or (c.frames, c.train_crop, c.train_crop)
    kw = {"device": device, "precision": precision, "input_shape": shape, "threads": threads}
    engine = TorchOptEngine(model, compile=compile, **kw) if backend == "torch-opt" else _ENGINES[backend](model, **kw)
    if check:
        engine.parity = check_engine(engine, model)
    return engine


def check_engine(engine: Engine, model: X3D) -> float:
    """Compare ``engine`` with eager fp32 ``model`` on a fixed input (two random clips); raise
    ``BackendError`` if they disagree. Returns the max |dp|. ``create_engine`` calls it once per engine."""
    generator = torch.Generator().manual_seed(0)
    clips = torch.randn(2, 3, *engine.input_shape, generator=generator)
    with torch.inference_mode():
        expected = copy.deepcopy(model).float().cpu().eval()(clips).log_softmax(1)
    got = engine(clips).float().cpu().log_softmax(1)
    diff = (got.exp() - expected.exp()).abs().max().item()
    if engine.precision == "fp32":
        # Probabilities of an untrained model are all close to 1/classes, where any output passes a
        # probability tolerance; log-probabilities still tell a wrong engine apart.
        log_diff = (got - expected).abs().max().item()
        if not (diff <= FP32_TOLERANCE and log_diff <= FP32_LOG_TOLERANCE):
            raise BackendError(f"{engine.describe()} disagrees with eager PyTorch: max |dp| {diff:.1e}, "
                               f"max |d log p| {log_diff:.1e}; refusing to run it")
    else:
        chosen = expected.gather(1, got.argmax(1, keepdim=True))[:, 0]
        if not bool((chosen >= expected.max(1).values - TIE_TOLERANCE).all()):
            raise BackendError(f"{engine.describe()} picks another top-1 class than eager PyTorch fp32; "
                               "refusing to run it")
    return diff


def export_onnx(model: X3D, path: str | os.PathLike[str], *, input_shape: tuple[int, int, int] | None = None,
                banded: bool = False) -> Path:
    """Write ``model`` as ONNX with a dynamic batch dimension, input ``clips`` (B, 3, T, H, W) and output
    ``scores``. The graph is traced at one clip size: head windows are fixed by it. ``banded``: BN folded
    and the wide blocks computed in bands of rows (``x3dnet.banding``), the form OpenVINO runs fastest."""
    c = model.config
    shape = input_shape or (c.frames, c.train_crop, c.train_crop)
    path = Path(path)
    model = copy.deepcopy(model).float().cpu().eval()
    if banded:
        model = BandedX3D(model, shape).eval()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings about the window checks: the size is fixed here
        torch.onnx.export(
            model, (torch.zeros(1, 3, *shape),), str(path), input_names=["clips"], output_names=["scores"],
            dynamic_axes={"clips": {0: "batch"}, "scores": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    return path


def export_openvino(
    model: X3D, path: str | os.PathLike[str], *, input_shape: tuple[int, int, int] | None = None,
    banded: bool = False,
) -> Path:
    """Write ``model`` as OpenVINO IR (``.xml`` + ``.bin``), converted from its ONNX export."""
    import openvino as ov

    path = Path(path).with_suffix(".xml")
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(model, Path(tmp) / "x3d.onnx", input_shape=input_shape, banded=banded)
        graph = openvino_core().read_model(str(onnx))
        ov.save_model(graph, str(path), compress_to_fp16=False)  # the default halves the weights
    return path


def export_model(model: X3D, path: str | os.PathLike[str], *, format: str,
                 input_shape: tuple[int, int, int] | None = None, banded: bool = False) -> tuple[Path, float]:
    """Write ``model`` as ``onnx`` or ``openvino`` IR (``banded``: in the form x3dnet's OpenVINO engine runs,
    see ``export_onnx``), then run the written file (ONNX Runtime, else OpenVINO) against eager PyTorch:
    returns the path and the max |dp|; raises if they disagree."""
    c = model.config
    shape = input_shape or (c.frames, c.train_crop, c.train_crop)
    runner = "openvino" if format == "openvino" or not installed("onnxruntime") else "onnxruntime"
    if not installed(runner):
        raise BackendError(f"{format} export is checked with {runner}, which is not installed "
                           "(pip install 'x3dnet[fast]')")
    final = Path(path).with_suffix(".xml") if format == "openvino" else Path(path)
    writer = export_openvino if format == "openvino" else export_onnx
    try:
        # Written and checked in a folder of its own beside the target: a graph that fails its check
        # (or a write cut short) never takes the target's name.
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}.") as tmp:
            written = writer(model, Path(tmp) / final.name, input_shape=shape, banded=banded)
            engine = _ENGINES[runner](model, path=written, device="cpu", precision="fp32", input_shape=shape)
            parity = check_engine(engine, model)
            for part in Path(tmp).iterdir():  # the .onnx, or the IR's .xml and .bin
                os.replace(part, final.parent / part.name)
    except OSError as e:
        raise BackendError(f"{path}: cannot write ({e.strerror or e})") from None
    return final, parity
