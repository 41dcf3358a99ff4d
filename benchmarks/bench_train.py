"""``x3dnet train`` throughput against the model alone, and (``--learn``) whether it learns.

    python benchmarks/bench_train.py [--models x3d_xs x3d_s] [--workers 2] [--steps 10] [--device cuda] [--kinds KIND ...]
    python benchmarks/bench_train.py --learn [--folder D] [--device cuda] [--train-flags --lr 0.1 ...]

Default: per model, in one run, training clips per second (forward + backward + SGD step, batch 8, eager
fp32, random weights) of the model alone on clips already in memory, as ``x3dnet train`` runs it on the
CPU (channels-last 3-D, its own backward for the channel-wise convs, glibc's malloc keeping freed
memory); of ``x3dnet train``'s whole pipeline (decoding, augmentation and batching in DataLoader workers,
the lr schedule, the log; precise BN and validation off; its second epoch) on synthetic videos; and,
against that model-only rate, the model with one of those choices undone at a time, with ``--sync-bn``,
in bf16 autocast (where ``x3dnet train`` allows it on this CPU), and with all three undone (what ``x3dnet
train`` ran before any of them): ``KINDS``. The pipeline target is at least 0.75 of model-only with 2
workers. ``--device cuda``: the same on a GPU, with CUDA's choices (``CUDA_KINDS``: TF32, cuDNN's
autotuning, channels-last 3-D, bf16, fp16) against ``x3dnet train``'s way there.

``--learn``: the issue's fixed command, from scratch on held-out synthetic videos; prints the validation
top-1 of every epoch and the time of the whole ``train`` command (target: best >= 90% within 20 minutes).
``--train-flags`` adds flags to that command, for the experiments the README reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from x3dnet import create_model
from x3dnet.model import fast_channelwise_backward
from x3dnet.profile import cpu_name
from x3dnet.solver import SolverConfig, build_optimizer, convert_sync_bn
from x3dnet.synthetic import make_dataset
from x3dnet.train import cpu_bf16_refused, keep_freed_memory, read_train_log, train


def model_only(name: str, *, batch: int, steps: int, precision: str = "fp32", channels_last: bool = True,
               fast_backward: bool = True, keep_memory: bool = True, sync_bn: bool = False, device: str = "cpu",
               tf32: bool = False, cudnn_benchmark: bool = True) -> float:
    """Training clips per second of the model alone: random clips at the training size, already in memory
    (on CUDA: on the GPU). The defaults are how ``x3dnet train`` runs it on the CPU; on CUDA it runs
    contiguous, with TF32 off in fp32 and cuDNN's autotuning (``CUDA_KINDS`` change those)."""
    cuda = device.startswith("cuda")
    if keep_memory and not cuda:
        keep_freed_memory()
    if cuda:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.manual_seed(0)
    model = fast_channelwise_backward(create_model(name, num_classes=10).train(), fast_backward)
    if sync_bn:
        convert_sync_bn(model)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    opt = build_optimizer(model, SolverConfig(base_lr=0.01, warmup_epochs=0))
    c = model.config
    x = torch.randn(batch, 3, c.frames, c.train_crop, c.train_crop, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), device=device)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.split(":")[0], dtype=half or torch.bfloat16, enabled=half is not None)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def step() -> None:
        opt.zero_grad()
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    for _ in range(3 if cuda else 2):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - start)


# What each model-only row changes against x3dnet train's way ("fp32").
KINDS = {
    "fp32": {},
    "default_malloc": {"keep_memory": False},
    "contiguous": {"channels_last": False},
    "sync_bn": {"sync_bn": True},
    "bf16": {"precision": "bf16"},  # only where train allows it (cpu_bf16_refused)
    "torch_backward": {"channels_last": False, "fast_backward": False, "keep_memory": False},
}

# On CUDA: x3dnet train's way ("fp32": contiguous, TF32 off, cuDNN autotuned; the channel-wise backward is
# torch's there), then one choice changed at a time.
CUDA_KINDS = {
    "fp32": {"channels_last": False},
    "no_autotuning": {"channels_last": False, "cudnn_benchmark": False},
    "tf32": {"channels_last": False, "tf32": True},
    "channels_last": {"channels_last": True},
    "bf16": {"channels_last": False, "precision": "bf16"},
    "fp16": {"channels_last": False, "precision": "fp16"},
}


def pipeline(name: str, videos: Path, out: Path, *, batch: int, workers: int, device: str = "cpu") -> float:
    """Training clips per second of ``x3dnet train`` itself: its second epoch, timed by the epoch's own clock
    (its ``time_s``: every step and every wait for data; the run's one set of DataLoader workers has
    loaded its first batches while the first epoch ended). The run's set-up, the checkpoints after each
    epoch and the process's first step are left out, as model-only leaves out its warm-up steps: X3D-S's
    first step took 9.1 s against 3.4 s for the next ones, a quarter of a 5-step epoch, where a real epoch
    has hundreds."""
    train(videos, model=name, epochs=2, batch_size=batch, workers=workers, precise_bn_batches=0, out=out,
          progress=False, log=lambda line: None, checkpoint_minutes=0, device=device)
    records = read_train_log(out / "train_log.jsonl")
    clips = sum(r["clips"] for r in records if r["type"] == "step" and r["epoch"] == 2)
    return clips / next(r["time_s"] for r in records if r["type"] == "epoch" and r["epoch"] == 2)


def learn(folder: Path, extra: list[str], device: str = "cpu") -> None:
    commands = [
        ["synthesize", folder / "train", "--videos-per-class", "20", "--seconds", "2", "--seed", "11"],
        ["synthesize", folder / "val", "--videos-per-class", "6", "--seconds", "2", "--seed", "12"],
        ["train", "--data", folder / "train" / "videos", "--val", folder / "val" / "videos", "--model", "x3d_xs",
         "--epochs", "15", "--out", folder / "run", "--no-progress", *(["--device", device] if device != "cpu" else []),
         *extra],
    ]
    for command in commands:
        print("$ x3dnet " + " ".join(map(str, command)), flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "x3dnet", *map(str, command)], stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"failed: {done.stderr.strip()}")
    epochs = [r for r in read_train_log(folder / "run" / "train_log.jsonl") if r["type"] == "epoch"]
    for r in epochs:
        print(f"  epoch {r['epoch']:>2}: train loss {r['train_loss']:.3f}, val top-1 {r['val_top1']:.1f}%")
    best = max(r["val_top1"] for r in epochs)
    print(f"best validation top-1 {best:.1f}% (target >= 90%); train took {seconds / 60:.1f} min (target <= 20)")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")


def _measure(kind: str, name: str, args: argparse.Namespace, videos: Path | None = None, out: Path | None = None) -> float:
    """One measurement in a fresh process: every row starts from the same state (measured in one process
    after DataLoader forks, channels-last training hung or crashed in torch's backward twice in three runs)."""
    command = [sys.executable, __file__, "--one", kind, name, "--batch-size", str(args.batch_size), "--steps",
               str(args.steps), "--workers", str(args.workers), "--device", args.device]
    if videos is not None:
        command += ["--videos-dir", str(videos), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{kind} {name}: failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["x3d_xs", "x3d_s"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, help="timed model-only steps (default 8; on CUDA 40)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: model-only and the pipeline there")
    parser.add_argument("--videos", type=int, default=48, help="videos the pipeline trains on (default 48)")
    parser.add_argument("--kinds", nargs="*", metavar="KIND",
                        help="the ratio columns to measure (default all of KINDS, or CUDA_KINDS on CUDA; none: only "
                             "model-only and the pipeline)")
    parser.add_argument("--learn", action="store_true", help="run the learning check instead")
    parser.add_argument("--folder", help="where --learn writes (default: a temporary folder)")
    parser.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[],
                        help="with --learn: flags added to the fixed train command (e.g. --lr 0.1 --epochs 25; "
                             "a later --epochs wins); must come last")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--videos-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (40 if cuda else 8)
    kinds = CUDA_KINDS if cuda else KINDS
    if args.kinds is not None and not args.one:
        unknown = sorted(set(args.kinds) - set(kinds))
        if unknown:
            parser.error(f"--kinds: unknown {', '.join(unknown)} (known on {args.device}: {', '.join(kinds)})")
    if args.one:
        kind, name = args.one
        if kind == "pipeline":
            rate = pipeline(name, Path(args.videos_dir), Path(args.out), batch=args.batch_size, workers=args.workers,
                            device=args.device)
        else:
            rate = model_only(name, batch=args.batch_size, steps=args.steps, device=args.device, **kinds[kind])
        print(rate)
        return
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"bf16 training: {cpu_bf16_refused() or 'allowed'}", flush=True)  # torch's probes, as train's
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(args.device)}", flush=True)
    if args.learn:
        if args.folder:
            learn(Path(args.folder), args.train_flags, args.device)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                learn(Path(tmp), args.train_flags, args.device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "data", videos_per_class=max(1, args.videos // 10), seconds=2, seed=5)
        for name in args.models:
            before = _measure("fp32", name, args)
            full = _measure("pipeline", name, args, data.videos, tmp / f"run-{name}")
            after = _measure("fp32", name, args)
            alone = (before + after) / 2  # timed on both sides of the pipeline run: the machine drifts
            row = {"model": name, "model_only": round(alone, 2), "pipeline": round(full, 2),
                   "pipeline/model_only": round(full / alone, 3)}
            for kind in kinds:
                if kind == "fp32" or (args.kinds is not None and kind not in args.kinds) or (kind == "bf16" and not cuda and cpu_bf16_refused()):
                    continue
                row[f"{kind}/model_only"] = round(_measure(kind, name, args) / alone, 3)
            print(json.dumps(row), flush=True)
        if cuda:
            print(f"training clips/s on {args.device}, batch {args.batch_size}, {args.workers} workers; model_only as "
                  "x3dnet train runs on CUDA (contiguous, fp32 with TF32 off, cuDNN autotuned); the ratios change "
                  "one of those each: no_autotuning: cuDNN's heuristics; tf32: TF32 convolutions and matmuls; "
                  "channels_last: the channels-last 3-D layout; bf16 and fp16: autocast (fp16 with a grad scaler)")
            return
        print(f"training clips/s, batch {args.batch_size}, {args.workers} workers; pipeline target >= 0.75 of model-only; "
              "model_only as x3dnet train runs on the CPU (channels-last 3-D, its channel-wise backward, freed memory "
              "kept); the ratios undo one of those each: default_malloc: glibc's default malloc; contiguous: the "
              "contiguous layout; sync_bn: with --sync-bn (on one process); bf16: --precision bf16 (where this CPU may train in it); torch_backward: all three, torch's own "
              "backward for the channel-wise convs too (x3dnet train before any of them)")


if __name__ == "__main__":
    main()
