"""Model cost: parameters and multiply-adds, counted the way the published tables count them, and
throughput (clips per second) of every engine, measured interleaved so that their ratios hold on a
noisy machine."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .backends import check_device, create_engine, pick_backend
from .errors import X3DNetError
from .model import VARIANTS, X3D, X3DConfig, get_config
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


def profile(
    models: Sequence[str] = ("x3d_xs", "x3d_s", "x3d_m", "x3d_l"),
    *,
    backends: Sequence[str] = ("auto",),
    precisions: Sequence[str] = ("fp32",),
    batch_sizes: Sequence[int] = (1,),
    device: str = "cpu",
    runs: int = 10,
    warmup: int = 2,
    crop: str = "train",
    log: Callable[[str], None] | None = None,
) -> list[dict[str, object]]:
    """Throughput of each model x backend x precision x batch size, with random weights.

    Every engine is built (and checked against eager PyTorch) first and warmed up; then each of ``runs``
    rounds times one batch of every row in turn, so slow phases of the machine hit all rows alike.
    ``crop`` is ``"train"`` (the published tables' input) or ``"test"`` (the 3-crop test size).
    """
    check_device(device)
    rows, engines = [], []
    for name in models:
        config = get_config(name)
        size = config.train_crop if crop == "train" else RECIPES[config.name].test_crop
        shape = (config.frames, size, size)
        torch.manual_seed(0)
        model = X3D(config).eval()
        seen = set()
        for backend in backends:
            for precision in precisions:
                chosen = pick_backend(device, precision) if backend == "auto" else backend
                if (chosen, precision) in seen:
                    continue
                seen.add((chosen, precision))
                if log:
                    log(f"building {config.name} {chosen} {precision} at {'x'.join(map(str, shape))}")
                engine = create_engine(model, backend=chosen, device=device, precision=precision, input_shape=shape)
                for batch in batch_sizes:
                    clips = torch.randn(batch, 3, *shape)
                    peak = _peak_memory(device, lambda e=engine, c=clips: [e(c) for _ in range(max(warmup, 1))])
                    engines.append((engine, clips))
                    rows.append({
                        "model": config.name, "backend": chosen, "precision": precision, "device": device,
                        "batch_size": batch, "input": "x".join(map(str, shape)),
                        "gmacs": round(count_macs(config, shape) / 1e9, 4),
                        "params_m": round(count_params(model) / 1e6, 3),
                        "params_m_no_bn": round(count_params(model, batchnorm=False) / 1e6, 3),
                        "peak_mem_mb": round(peak, 1), "parity": engine.parity, "_times": [],
                    })
    if log:
        log(f"timing {len(rows)} rows, {runs} rounds")
    for run in range(runs):
        # Each round starts one row later, so every row follows every other as often: an engine whose
        # threads linger after a call would otherwise slow down always the same neighbour.
        for i in range(len(rows)):
            k = (i + run) % len(rows)
            rows[k]["_times"].append(_timed(*engines[k], device))
    for row in rows:
        times = row.pop("_times")
        rates = [row["batch_size"] / t for t in times]
        row["clips_per_s"] = round(statistics.mean(rates), 3)
        row["clips_per_s_std"] = round(statistics.stdev(rates), 3) if len(rates) > 1 else 0.0
        row["latency_ms"] = round(1000 * statistics.mean(times) / row["batch_size"], 2)
        row["gflops_per_s"] = round(2 * row["gmacs"] * row["clips_per_s"], 1)
    return rows


def plot_path(path: str | Path) -> Path:
    """Where ``plot`` will write: ``path``, with ``.png`` added when it has no extension (matplotlib would add
    it silently); a folder, or a file in a folder that does not exist, is refused."""
    path = Path(path)
    if str(path) == "" or path.is_dir():
        raise X3DNetError(f"{path}: is a folder; name the image file (e.g. {path / 'profile.png'})")
    if not path.resolve().parent.is_dir():
        raise X3DNetError(f"{path}: its folder does not exist")
    return path if path.suffix else path.with_suffix(".png")


def plot(rows: Sequence[dict[str, object]], path: str | Path) -> Path:
    """Throughput against GMACs, one line per backend and precision, one point per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise X3DNetError("--plot needs matplotlib (pip install 'x3dnet[plot]')") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r["backend"], r["precision"], r["batch_size"]) for r in rows):
        sel = [r for r in rows if (r["backend"], r["precision"], r["batch_size"]) == key]
        ax.errorbar([r["gmacs"] for r in sel], [r["clips_per_s"] for r in sel],
                    yerr=[r["clips_per_s_std"] for r in sel], marker="o", capsize=3,
                    label=f"{key[0]} {key[1]}" + (f" batch {key[2]}" if key[2] != 1 else ""))
        for r in sel:
            ax.annotate(r["model"].replace("x3d_", "").upper(), (r["gmacs"], r["clips_per_s"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="GMACs per clip", ylabel="clips per second",
           title=f"X3D throughput on {rows[0]['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = plot_path(path)
    try:
        fig.savefig(path)
    except OSError as e:
        raise X3DNetError(f"{path}: cannot write the plot ({e.strerror})") from None
    finally:
        plt.close(fig)
    return path


def cpu_name() -> str:
    """The CPU model and its vector extensions, as lscpu names them: every number printed depends on them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")
    return f"{model} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def _timed(engine, clips: torch.Tensor, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine(clips)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_memory(device: str, work: Callable[[], object]) -> float:
    """MiB at the peak of ``work``: max allocated on CUDA; on the CPU the process's peak RSS, reset first
    where Linux allows (/proc/self/clear_refs), else the peak since the process started."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        work()
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        work()
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration, ValueError):
        work()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
