"""Fine-tuning (or training from scratch) on labelled videos, with the original's recipe, resumable to the bit.

The initial weights are drawn from the seed (``initial_network``). One epoch: the videos in an order
drawn from (seed, epoch), one random clip each (``views.train_clip``, its randomness drawn from (seed,
epoch, video)), SGD steps on the global batch with the lr set every step (``solver.lr_at``), dropout
seeded from (seed, epoch, step). Nothing depends on the process's history, so the same command gives the
same run, and a run resumed from any checkpoint ends with the weights of an uninterrupted one. Then
precise BN, a validation pass and the checkpoints. Under ``torchrun`` each process takes its slice of
every global batch (DDP: gloo on CPU, nccl on CUDA); only rank 0 writes.

The run folder ``out`` holds ``run.json`` (what is trained: a resumed run must match it),
``train_log.jsonl`` (a line per step and per epoch), ``last.safetensors`` and ``best.safetensors`` (the
model with its config, recipe and class names), and ``state.safetensors`` (weights, momentum buffers and
where the run stands), each written whole under a temporary name and then renamed.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import hashlib
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from . import __version__
from .backends import check_device, cuda_fp32
from .checkpoint import save_checkpoint
from .datasets import Dataset, read_dataset, training_classes
from .errors import CheckpointError, ConfigError, X3DNetError
from .evaluate import _broadcast, _distributed, _worker_init, validate
from .factory import loaded, resolve_checkpoint
from .model import X3D, fast_channelwise_backward, get_config
from .paths import write_atomic, write_atomic_with
from .predict import read_labels
from .recipe import RECIPES, Recipe
from .runs import lock_folder
from .solver import (
    REFERENCE_BATCH,
    SolverConfig,
    build_optimizer,
    convert_sync_bn,
    freeze_bn,
    is_bn,
    lr_at,
    precise_bn,
    set_lr,
)
from .views import TrainClip, train_clip, view_recipe

__all__ = ["SolverConfig", "build_optimizer", "lr_at", "solver_for", "train"]

LOG = "train_log.jsonl"
STATE = "state.safetensors"
RECIPE_NAMES = ("finetune", "original")
FREEZE = ("none", "bn", "backbone")
# TRAIN_JITTER_SCALES of the original's configs; other sizes scale XS/S's range with their crop.
JITTER = {"x3d_xs": (182, 228), "x3d_s": (182, 228), "x3d_m": (256, 320), "x3d_l": (356, 446), "x3d_xl": (356, 446)}
# What a resumed run must share with the one it continues (workers, progress and checkpoint timing may differ).
IDENTITY = ("data_sha256", "val", "model", "weights_sha256", "classes", "recipe", "solver", "clip", "epochs",
            "batch_size", "seed", "dropout", "freeze", "precision", "processes", "sync_bn", "precise_bn_batches",
            "val_views", "channels_last")
_IDENTITY_DEFAULTS = {"channels_last": False}  # what a run.json written before the key existed meant
FAIL_STOP = 0.5  # a list where more than this share of the videos tried has failed stops


def solver_for(recipe: str, *, epochs: int, batch_size: int, lr: float | None = None) -> SolverConfig:
    """The solver of a named recipe for a run of ``epochs`` on a global batch of ``batch_size`` clips.

    ``original``: the X3D configs' from-scratch recipe (0.1 per 128 clips; a linear warm-up from 0.01 per
    128 over the first 35/300 of the run; a cosine to 0), stretched to ``epochs``. ``finetune``: the same
    lr and cosine with a warm-up of one epoch (at most a tenth of the run) from a tenth of the lr; a
    pretrained backbone needs no long warm-up, and a short run cannot spend 12% of itself on one.
    ``lr`` replaces the scaled base lr (and scales the warm-up start with it).
    """
    if recipe not in RECIPE_NAMES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPE_NAMES)}")
    scale = batch_size / REFERENCE_BATCH
    base, start = (0.1 * scale, 0.01 * scale) if lr is None else (lr, lr / 10)
    warmup = 35.0 * epochs / 300.0 if recipe == "original" else min(1.0, epochs / 10)
    return SolverConfig(base_lr=base, max_epoch=epochs, warmup_epochs=warmup, warmup_start_lr=start, cosine_end_lr=0.0)


def clip_recipe(name: str, recipe: Recipe) -> TrainClip:
    """The training clips of ``recipe``'s model: its frames, stride and crop, the original's jitter."""
    crop = recipe.train_crop
    jitter = JITTER.get(name) or (round(crop * 182 / 160), round(crop * 228 / 160))
    return TrainClip(frames=recipe.frames, stride=recipe.stride, crop=crop, jitter=jitter,
                     target_fps=recipe.target_fps, mean=recipe.mean, std=recipe.std)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


# Stream keys under the seed: every random choice of a run is drawn from one of these.
_ORDER, _CLIP, _PRECISE_ORDER, _PRECISE_CLIP, _DROPOUT, _SPLIT, _INIT = range(7)


class _Clips(TorchDataset):
    """Item ``(epoch, stream, i)``: (i, its clip or None, the error that stopped it or None, corrupt frames);
    the clip's randomness is drawn from (seed, epoch, stream, i)."""

    def __init__(self, dataset: Dataset, recipe: TrainClip, seed: int):
        self.dataset, self.recipe, self.seed = dataset, recipe, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[int, torch.Tensor | None, str | None, int]:
        epoch, stream, i = key
        sample = self.dataset.samples[i]
        try:
            threads = 1 if get_worker_info() is not None else 0
            clip, corrupt = train_clip(sample.path, self.recipe, _rng(self.seed, epoch, stream, i), threads=threads)
            return i, clip, None, len(corrupt)
        except X3DNetError as e:
            return i, None, str(e), 0
        except Exception as e:  # noqa: BLE001 - one video must never end a run
            return i, None, f"{sample.path}: unexpected {type(e).__name__}: {e}", 0


def _collate(items: list[tuple]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, clip) for i, clip, error, _ in items if error is None]
    failed = [(i, error) for i, _, error, _ in items if error is not None]
    clips = torch.stack([c for _, c in good]) if good else None
    return [i for i, _ in good], clips, failed


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """Every batch this process loads, in the order the run uses them, from (epoch, step) to the end: each
    epoch's training batches, then its precise-BN batches (``precise`` of them). Lazy, so that one set of
    DataLoader workers serves the whole run and loads the next epoch's first batches while this one ends."""

    n: int
    batch_size: int
    seed: int
    epoch: int
    step: int
    epochs: int
    precise: int
    rank: int
    world: int

    def __iter__(self):
        per_rank = self.batch_size // self.world
        first = self.step
        for epoch in range(self.epoch, self.epochs):
            parts = [(_CLIP, epoch_batches(self.n, self.batch_size, seed=self.seed, epoch=epoch)[first:])]
            if self.precise:
                precise = epoch_batches(self.n, self.batch_size, seed=self.seed, epoch=epoch, stream=_PRECISE_ORDER)
                parts.append((_PRECISE_CLIP, precise[:self.precise]))
            for stream, batches in parts:
                for b in batches:
                    yield [(epoch, stream, i) for i in b[self.rank * per_rank:(self.rank + 1) * per_rank]]
            first = 0


def _loader(dataset: Dataset, recipe: TrainClip, schedule: _Schedule, *, workers: int, pin: bool = False) -> DataLoader:
    """The batches of ``schedule`` as (list indices, clips or None, [(index, why it failed)]); ``pin``: clips
    in page-locked memory (for CUDA: the copy to the GPU then runs beside the step)."""
    if workers:
        release_freed_memory()  # the workers fork when the loader is iterated
    return DataLoader(_Clips(dataset, recipe, schedule.seed), batch_sampler=schedule, collate_fn=_collate,
                      num_workers=workers, prefetch_factor=2 if workers else None, worker_init_fn=_worker_init,
                      pin_memory=pin)


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, stream: int = _ORDER) -> list[list[int]]:
    """The global batches of one epoch: a permutation drawn from (seed, epoch), cut into full batches (the
    original drops the last, short one)."""
    order = _rng(seed, epoch, stream).permutation(n).tolist()
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(n // batch_size)]


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory(libc=None) -> bool:
    """Have glibc's malloc keep the memory a training step frees for the next step, rather than hand it back
    to the kernel: no block is mmapped on its own (each such block comes back as fresh pages, every one a
    page fault on first write) and the heap is not trimmed. A step allocates and frees the same large
    activations and gradients every time, so they are then reused: X3D-XS trained 1.17x and X3D-S 1.52x
    as fast on the AMD EPYC (bench_train.py), peak memory about 10% higher. Process-wide, and only where the C library
    is glibc; returns whether it applied. ``libc``: stands in for the C library (tests).

    Forking DataLoader workers then shares that kept memory with them, and each page the trainer writes
    again is first copied (3.2 s of X3D-XS's next step): ``release_freed_memory`` before every fork."""
    libc = libc or _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory(libc=None) -> None:
    """Hand the memory malloc keeps free back to the kernel (glibc's ``malloc_trim``), so that a fork shares
    none of it: what the trainer then writes there comes back as fresh pages, not copies."""
    libc = libc or _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def train(
    data: str | os.PathLike[str],
    *,
    val: str | os.PathLike[str] | None = None,
    val_split: float | None = None,
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    classes: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    recipe: str | None = None,
    epochs: int | None = None,
    batch_size: int = 8,
    lr: float | None = None,
    dropout: float = 0.5,
    freeze: str = "none",
    workers: int = 2,
    seed: int = 0,
    precision: str = "fp32",
    device: str = "cpu",
    out: str | os.PathLike[str] = "x3dnet-runs/train",
    resume: bool = False,
    sync_bn: bool = False,
    precise_bn_batches: int = 200,
    checkpoint_minutes: float = 10.0,
    val_views: int = 1,
    flip: bool = True,
    channels_last: bool | None = None,
    progress: bool = True,
    plot: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train on the videos ``data`` lists and return the last epoch's summary; see the module docstring.

    ``weights`` (any layout, or a published name) are fine-tuned, the classifier replaced when the class
    count differs; without them ``model`` starts from the original's initialisation. ``recipe``:
    ``finetune`` (the default with weights) or ``original`` (the default without); see ``solver_for``.
    ``freeze``: ``bn`` fixes every BN (statistics and affine), ``backbone`` trains the classifier alone.
    ``channels_last``: weights and clips in the channels-last 3-D memory format; None (the default) means
    on the CPU, where X3D-XS trained 1.23x and X3D-S 1.21x as fast in it (AMD EPYC, bench_train.py), and
    not on CUDA (where channels-last 3-D inference was 2.5x slower). It rounds differently from the
    contiguous layout, so a resumed run keeps the layout it started with. On the CPU it has glibc's malloc
    keep freed memory, for the whole process (``keep_freed_memory``); on CUDA it has cuDNN autotune, with
    TF32 off in fp32, and pins the clips (process-wide flags too). ``precision``: ``fp32``; ``bf16``
    (autocast) on CUDA and on a CPU that ``cpu_bf16_refused`` allows; ``fp16`` (with a grad scaler) on CUDA.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_device(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be fp32, bf16 or fp16, not {precision!r}")
    if precision == "fp16" and not device.startswith("cuda"):
        raise ConfigError("fp16 training runs on CUDA only; on a CPU use bf16 (where it has bf16 units) or fp32")
    if precision == "bf16" and not device.startswith("cuda") and (why := cpu_bf16_refused()):
        raise ConfigError(f"bf16 training on this CPU: {why}; use fp32")
    if freeze not in FREEZE:
        raise ConfigError(f"freeze must be one of {', '.join(FREEZE)}, not {freeze!r}")
    if val is not None and val_split is not None:
        raise ConfigError("give --val or --val-split, not both")
    if val_split is not None and not 0 < val_split < 1:
        raise ConfigError(f"--val-split must be a fraction between 0 and 1, not {val_split}")
    if weights is None and model is None:
        raise ConfigError("train needs --weights (to fine-tune) or --model (to train from scratch)")
    if seed < 0:
        raise ConfigError(f"--seed must be 0 or a positive integer, not {seed}")
    if channels_last is None:
        channels_last = not device.startswith("cuda")
    if not device.startswith("cuda"):
        keep_freed_memory()
    else:
        # cuDNN's autotuning: X3D-S trained 1.81x and X3D-XS 1.11x as fast with it (H200, batch 8, fp32;
        # bench_train.py --device cuda), and SlowFast's three steps kept the same deviations with it.
        torch.backends.cudnn.benchmark = True
        if precision == "fp32":
            cuda_fp32()  # as inference: the step-by-step comparison with SlowFast refuses TF32
    rank, world, local_rank, _, owned = _distributed(device)
    try:
        if device.startswith("cuda") and world > 1:
            device = f"cuda:{local_rank}"
        return _train(
            data, val=val, val_split=val_split, model=model, weights=weights, classes=classes, root=root,
            recipe=recipe, epochs=epochs, batch_size=batch_size, lr=lr, dropout=dropout, freeze=freeze,
            workers=workers, seed=seed, precision=precision, device=device, out=Path(out), resume=resume,
            sync_bn=sync_bn, precise_bn_batches=precise_bn_batches, checkpoint_minutes=checkpoint_minutes,
            val_views=val_views, flip=flip, channels_last=channels_last, progress=progress and rank == 0, plot=plot,
            log=log if rank == 0 else (lambda line: None), rank=rank, world=world)
    finally:
        if owned:
            dist.destroy_process_group()


def initial_network(model: str | None, weights, num_classes: int, dropout: float, *,
                    seed: int) -> tuple[X3D, Recipe | None, str | None, str]:
    """The network to train, its recipe, the weights file's sha256, and where it starts from.

    The initial weights drawn at random (all of them from scratch, a new classifier when fine-tuning) are a
    function of ``seed``, not of the process (torch seeds each process differently): the same command gives
    the same run, and a run killed before its first checkpoint resumes into it. The global generator is
    left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_rng(seed, _INIT).integers(2**62)))
        return _network(model, weights, num_classes, dropout)


def _network(model: str | None, weights, num_classes: int, dropout: float) -> tuple[X3D, Recipe | None, str | None, str]:
    if weights is None:
        config = get_config(model, num_classes=num_classes, dropout=dropout)
        return X3D(config), RECIPES.get(config.name), None, "the original initialisation"
    config, recipe, ckpt = resolve_checkpoint(model, weights)
    # The backbone loads strictly: a missing or mis-shaped key is an error that names it.
    net = loaded(config.replace(dropout=dropout), ckpt, num_classes)
    same = ckpt.num_classes == num_classes
    return net, recipe, _sha256(ckpt.path), "its weights" + ("" if same else f" with a new {num_classes}-class classifier")


def _train(data, *, val, val_split, model, weights, classes, root, recipe, epochs, batch_size, lr, dropout, freeze,
           workers, seed, precision, device, out, resume, sync_bn, precise_bn_batches, checkpoint_minutes, val_views,
           flip, channels_last, progress, plot, log, rank, world) -> dict:
    names = read_labels(classes) if classes is not None else training_classes(data)
    if len(names) < 2:
        raise ConfigError(f"{data}: {len(names)} class; training needs at least 2")
    dataset = read_dataset(data, classes=names, root=root)
    val_set = read_dataset(val, classes=names, root=None) if val is not None else None
    if val_split is not None:
        dataset, val_set = split_dataset(dataset, val_split, seed=seed)
    net, model_recipe, weights_sha, start = initial_network(model, weights, len(names), dropout, seed=seed)
    fast_channelwise_backward(net)  # on CPU the channel-wise convs' backward was most of a step
    if model_recipe is None:
        raise ConfigError(f"no recipe is known for {net.config.name}: train from weights that record one")
    recipe = recipe or ("finetune" if weights is not None else "original")
    epochs = epochs or (30 if recipe == "finetune" else 300)
    if batch_size % world:
        raise ConfigError(f"--batch-size {batch_size} is the global batch: it must split evenly over {world} processes")
    steps = len(dataset) // batch_size
    if steps == 0:
        raise ConfigError(f"{dataset.source}: {len(dataset)} videos, fewer than one batch of {batch_size}; "
                          "lower --batch-size")
    solver = solver_for(recipe, epochs=epochs, batch_size=batch_size, lr=lr)
    clips = dataclasses.replace(clip_recipe(net.config.name, model_recipe), flip=flip)
    view_set = view_recipe(model_recipe, val_views) if val_set is not None else None
    identity = {
        "data": str(dataset.source), "data_sha256": dataset.sha256, "root": str(dataset.root.resolve()),
        "val": None if val_set is None else {"data": str(val_set.source), "sha256": val_set.sha256, "split": val_split},
        "model": net.config.name, "weights": None if weights is None else str(weights), "weights_sha256": weights_sha,
        "classes": list(names), "recipe": recipe, "solver": solver.to_dict(), "clip": dataclasses.asdict(clips),
        "epochs": epochs, "batch_size": batch_size, "seed": seed, "dropout": dropout, "freeze": freeze,
        "precision": precision, "processes": world, "sync_bn": sync_bn, "precise_bn_batches": precise_bn_batches,
        "val_views": val_views, "channels_last": channels_last, "x3dnet": __version__,
    }
    identity = json.loads(json.dumps(identity))  # as run.json holds it (tuples become lists)
    error, lock, state = None, None, None
    if rank == 0:
        try:
            lock = lock_folder(out)
            state = _open(out, identity, resume=resume, net=net)
        except X3DNetError as e:
            error = str(e)
    try:
        error = _broadcast(error, world)
        if error:
            raise X3DNetError(error)
        return _run(net, dataset, val_set, view_set, clips, solver, identity, _broadcast(state, world), start,
                    freeze=freeze, epochs=epochs, batch_size=batch_size, workers=workers, seed=seed,
                    precision=precision, device=device, out=out, sync_bn=sync_bn,
                    precise_bn_batches=precise_bn_batches, checkpoint_minutes=checkpoint_minutes,
                    memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format,
                    progress=progress, plot=plot, log=log, rank=rank, world=world, recipe=model_recipe)
    finally:
        if lock is not None:
            lock.release()


def split_dataset(dataset: Dataset, fraction: float, *, seed: int) -> tuple[Dataset, Dataset]:
    """(train, val): ``fraction`` of each class's videos (at least one where a class has two) held out,
    chosen by ``seed``."""
    held: list[int] = []
    for label in sorted({s.label for s in dataset.samples}):
        members = [i for i, s in enumerate(dataset.samples) if s.label == label]
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        held += _rng(seed, _SPLIT, label).permutation(members)[:k].tolist()
    keep = set(held)
    train_samples = tuple(s for i, s in enumerate(dataset.samples) if i not in keep)
    val_samples = tuple(s for i, s in enumerate(dataset.samples) if i in keep)
    if not val_samples:
        raise ConfigError(f"{dataset.source}: too few videos per class to hold out a validation split")
    return dataclasses.replace(dataset, samples=train_samples), dataclasses.replace(dataset, samples=val_samples)


def _open(out: Path, identity: dict, *, resume: bool, net: X3D) -> dict | None:
    """The state to resume from (None: start afresh), after checking the folder holds this run."""
    run_file = out / "run.json"
    if not run_file.exists():
        if (out / LOG).exists() or (out / STATE).exists():
            raise ConfigError(f"{out}: holds a training log but no run.json; choose another --out")
        return None
    if not resume:
        raise ConfigError(f"{out}: holds a training run already; add --resume to continue it, or choose another --out")
    try:
        earlier = json.loads(run_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run_file}: unreadable ({e})") from None
    changed = [k for k in IDENTITY
               if not isinstance(earlier, dict) or earlier.get(k, _IDENTITY_DEFAULTS.get(k)) != identity[k]]
    if changed:
        raise ConfigError(f"{out}: the run there differs in {', '.join(changed)}; resume it with the same command, "
                          "or choose another --out")
    if not (out / STATE).exists():
        return None  # killed before its first checkpoint
    return _read_state(out / STATE, net)


def _read_state(path: Path, net: X3D) -> dict:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["x3dnet.train_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for each kind of damage
        raise CheckpointError(f"{path}: damaged training state ({type(e).__name__}); choose another --out") from None
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    momentum = {k[len("momentum."):]: v for k, v in tensors.items() if k.startswith("momentum.")}
    expected = net.state_dict()
    if model.keys() != expected.keys() or any(model[k].shape != expected[k].shape for k in model):
        raise CheckpointError(f"{path}: its weights do not fit {net.config.name}; choose another --out")
    fields = {"epoch": int, "step": int, "log_bytes": int, "best": (int, float, type(None)), "failed": dict,
              "totals": list}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in fields.items()):
        raise CheckpointError(f"{path}: damaged training state (its fields); choose another --out")
    return {**meta, "model": model, "momentum": momentum}


def _save_state(out: Path, module: X3D, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    names = {id(p): n for n, p in module.named_parameters()}
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                tensors[f"momentum.{names[id(p)]}"] = buffer.detach().cpu().contiguous()
    metadata = {"x3dnet.train_state": json.dumps(meta)}
    write_atomic_with(out / STATE, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def _run(net, dataset, val_set, view_set, clips, solver, identity, state, start, *, freeze, epochs, batch_size,
         workers, seed, precision, device, out, sync_bn, precise_bn_batches, checkpoint_minutes, memory_format,
         progress, plot, log, rank, world, recipe) -> dict:
    if freeze == "backbone":
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith("fc2."))
    if state is not None:
        net.load_state_dict(state["model"])
    if sync_bn:  # on one process too: channels-last BN then computes what it does on several
        convert_sync_bn(net)
    net.to(device, memory_format=memory_format)
    optimizer = build_optimizer(_train_mode(net, freeze), solver)
    if state is not None:
        params = dict(net.named_parameters())
        for name, buffer in state["momentum"].items():
            if name not in params:
                raise CheckpointError(f"{out / STATE}: momentum for an unknown parameter {name}")
            optimizer.state[params[name]]["momentum_buffer"] = torch.empty_like(params[name]).copy_(buffer)
    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.startswith("cuda") else None)
    steps = len(dataset) // batch_size
    per_rank = batch_size // world
    epoch, first_step = (state["epoch"], state["step"]) if state else (0, 0)
    best = state["best"] if state else None
    failed: dict[str, str] = dict(state["failed"]) if state else {}  # list index (as text) -> reason
    if rank == 0:
        if state is None:
            write_atomic(out / "run.json", json.dumps(identity, indent=2) + "\n")
            (out / LOG).write_bytes(b"")
        else:
            with open(out / LOG, "r+b") as f:  # lines written after the checkpoint are written again
                f.truncate(state["log_bytes"])
        log(f"{net.config.name} from {start}: {len(dataset)} training videos of {len(identity['classes'])} "
            f"classes" + (f", {len(val_set)} for validation ({view_set.describe()})" if val_set else ", no validation"))
        log(f"{epochs} epochs of {steps} steps, global batch {batch_size}" + (f" over {world} processes" if world > 1
            else "") + f"; {identity['recipe']} recipe: lr {solver.base_lr:.4g}, warm-up {solver.warmup_epochs:.3g} "
            f"epochs from {solver.warmup_start_lr:.3g}, cosine to {solver.cosine_end_lr:.3g}; saving to {out}"
            + (f"; resuming at epoch {epoch + 1}, step {first_step}" if state else ""))
    autocast = _autocast(precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    last_save = time.monotonic()
    summary: dict = {}
    # One loader for the whole run: its workers fork once, while the heap is small (a fork after the first
    # steps would share the memory malloc keeps, see keep_freed_memory), and load the next epoch's first
    # batches during precise BN, validation and the checkpoints.
    precise_steps = min(precise_bn_batches, steps) if _tracks_bn(net) else 0
    schedule = _Schedule(len(dataset), batch_size, seed, epoch, first_step, epochs, precise_steps, rank, world)
    batches = iter(_loader(dataset, clips, schedule, workers=workers, pin=device.startswith("cuda"))
                   if epoch < epochs else ())
    try:
        while epoch < epochs:
            bar = tqdm(total=steps, initial=first_step, unit="step", disable=not progress, dynamic_ncols=True,
                       desc=f"epoch {epoch + 1}/{epochs}", file=sys.stderr)
            # loss x clips, right, clips: this process's since the epoch began; rank 0 also holds what every
            # process had done before the checkpoint a resumed run starts from.
            totals = np.array(state["totals"]) if state and first_step and rank == 0 else np.zeros(3)
            started = time.perf_counter()
            try:
                for step, (indices, x, bad) in enumerate(itertools.islice(batches, steps - first_step), first_step):
                    for i, reason in bad:
                        if str(i) not in failed:
                            failed[str(i)] = reason
                            log(f"skipped (not decodable): {reason}")
                    _stop_if_most_fail(failed, dataset, epoch, step, batch_size)
                    lr = lr_at(solver, epoch + step / steps)
                    set_lr(optimizer, lr)
                    tick = time.perf_counter()
                    labels = [dataset.samples[i].label for i in indices]
                    loss, right = _step(ddp, optimizer, x, labels, autocast=autocast, scaler=scaler,
                                        seed=_step_seed(seed, epoch, step, rank), device=device,
                                        memory_format=memory_format, world=world,
                                        shape=(3, clips.frames, clips.crop, clips.crop))
                    n = 0 if x is None else len(indices)
                    totals += (loss * n, right, n)
                    clips_now = n
                    if world > 1:  # the step's loss over the global batch, as one process would log it
                        both = torch.tensor([loss * n, n], dtype=torch.float64)
                        dist.all_reduce(both)
                        loss, clips_now = (both[0] / both[1]).item() if both[1] else 0.0, int(both[1])
                    rate = clips_now / max(time.perf_counter() - tick, 1e-9)
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss:.3f} lr {lr:.3g} {rate:.1f} clips/s", refresh=False)
                    if rank == 0:
                        _append(out, {"type": "step", "epoch": epoch + 1, "step": step + 1, "lr": lr,
                                      "loss": round(loss, 6), "clips": clips_now, "clips_per_s": round(rate, 3)})
                    due = checkpoint_minutes and time.monotonic() - last_save > 60 * checkpoint_minutes
                    if due and step + 1 < steps:
                        _checkpoint(out, net, optimizer, epoch, step + 1, best, failed, rank, world, totals)
                        last_save = time.monotonic()
            finally:
                bar.close()
            first_step = 0
            train_loss, train_top1 = _reduce(totals, world)
            used = 0
            if precise_steps:
                used = _precise_pass(net, batches, precise_steps, autocast=autocast, device=device, world=world)
            metrics = None
            if rank == 0 and val_set is not None:
                net.eval()
                if workers:
                    release_freed_memory()  # validate's workers fork
                metrics = validate(_OnDevice(net, device), val_set, view_set, batch_size=max(per_rank, 1),
                                   workers=workers, progress=progress)
                _train_mode(net, freeze)
            epoch += 1
            top1 = None if metrics is None else metrics["top1"]
            improved = top1 is not None and (best is None or top1 > best)
            best = top1 if improved else best
            summary = {"type": "epoch", "epoch": epoch, "train_loss": train_loss, "train_top1": train_top1,
                       "val_top1": top1, "val_top5": None if metrics is None else metrics["top5"],
                       "val_mean_class_accuracy": None if metrics is None else metrics["mean_class_accuracy"],
                       "val_failed": None if metrics is None else metrics["failed"], "skipped_videos": len(failed),
                       "precise_bn_batches": used, "lr": lr_at(solver, epoch),
                       "time_s": round(time.perf_counter() - started, 2), "best_val_top1": best}
            if rank == 0:
                _append(out, summary)
                log(_epoch_line(summary, epochs))
                save_checkpoint(net, out / "last.safetensors", recipe=recipe, classes=identity["classes"])
                if improved or (val_set is None):
                    save_checkpoint(net, out / "best.safetensors", recipe=recipe, classes=identity["classes"])
                if plot:
                    plot_curves(out / LOG, plot)
            _checkpoint(out, net, optimizer, epoch, 0, best, failed, rank, world, np.zeros(3))
            last_save = time.monotonic()
    except KeyboardInterrupt:  # in a step, precise BN, validation or a checkpoint (written whole or not at all)
        if rank == 0:
            log(f"{out}: interrupted; the same command with --resume goes on from its last checkpoint")
        raise
    finally:
        del batches  # its workers end with it
    if not summary:  # resumed after its last epoch: nothing was left to do
        ends = [r for r in read_train_log(out / LOG) if r.get("type") == "epoch"] if rank == 0 else []
        summary = ends[-1] if ends else {}
        log(f"{out}: the run had finished all {epochs} epochs already")
    return summary


def _precise_pass(net: X3D, batches, n: int, *, autocast, device: str, world: int) -> int:
    """Precise BN over the next ``n`` batches of ``batches``, all of them taken (the next epoch's follow);
    the batches used."""
    part = itertools.islice(batches, n)
    with autocast:  # the model itself, not DDP (which would broadcast rank 0's statistics at each forward)
        used = precise_bn(net, _everywhere(part, device, world), limit=n)
    collections.deque(part, maxlen=0)
    return used


def _tracks_bn(net: X3D) -> bool:
    """Whether precise BN has statistics to recompute: a BN in training mode that tracks them."""
    return any(is_bn(m) and m.track_running_stats and m.training for m in net.modules())


def _everywhere(batches: Iterable, device: str, world: int):
    """The batches (of ``_loader``) that have clips on every process (synchronised BN's forwards are collective:
    every process must run the same ones)."""
    for _, x, _ in batches:
        present = torch.tensor([0 if x is None else 1])
        if world > 1:
            dist.all_reduce(present, op=dist.ReduceOp.MIN)
        if present.item():
            yield x.to(device)


class _OnDevice:
    """The model as an engine for ``validate``: clips moved to its device, scores back to the CPU."""

    def __init__(self, net: X3D, device: str):
        self.net, self.device, self.config = net, device, net.config

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        return self.net(clips.to(self.device)).float().cpu()


def _train_mode(net: X3D, freeze: str) -> X3D:
    net.train()
    if freeze in ("bn", "backbone"):
        freeze_bn(net)
    if freeze == "backbone":
        net.eval()  # dropout included: a linear probe trains on fixed features
        net.fc2.train()
    return net


def cpu_bf16_refused() -> str | None:
    """Why this CPU may not train in bf16, or None where it may: it needs bf16 units (AVX-512 BF16), and
    a CPU with AMX is refused, since with torch 2.13 on an Intel Xeon with AMX X3D-XS's bf16 autocast
    backward crashed or hung in 3 of 3 runs. On an AMD EPYC (Zen 5: AVX-512 BF16, no AMX) it trained
    X3D-S 1.0-1.5x as fast as fp32 (benchmarks/bench_train.py; runs vary). torch's own probes: the tests fake them."""
    if not torch.cpu._is_avx512_bf16_supported():
        return "it has no bf16 units (AVX-512 BF16)"
    if torch.cpu._is_amx_tile_supported():
        return "on a CPU with AMX torch's bf16 backward of X3D crashed or hung"
    return None


def _autocast(precision: str, device: str):
    if precision == "fp32":
        return torch.autocast("cpu", enabled=False)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(kind, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return int(_rng(seed, epoch, _DROPOUT, step, rank).integers(2**62))


def _step(ddp, optimizer, x, labels, *, autocast, scaler, seed, device, memory_format, world,
          shape) -> tuple[float, int]:
    """One SGD step on this process's clips; (mean loss, correct top-1)."""
    optimizer.zero_grad()
    torch.manual_seed(seed)  # dropout: a function of the seed, the epoch and the step
    weight = 1.0
    if x is None:  # every clip of this process's share failed to decode
        if world == 1:
            return 0.0, 0
        # DDP needs every process in every backward: this one adds a zero gradient (one blank clip, weight 0).
        x, labels, weight = torch.zeros(1, *shape), [0], 0.0
    y = torch.tensor(labels, device=device)
    with autocast:
        logits = ddp(x.to(device, non_blocking=True, memory_format=memory_format))
    loss = F.cross_entropy(logits.float(), y) * weight
    if not torch.isfinite(loss):
        raise X3DNetError(f"the loss is {loss.item()}: training diverged; lower --lr")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.item(), int((logits.argmax(1) == y).sum()) if weight else 0


def _stop_if_most_fail(failed: dict, dataset: Dataset, epoch: int, step: int, batch_size: int) -> None:
    tried = len(dataset) if epoch else min(len(dataset), (step + 1) * batch_size)
    if tried >= min(len(dataset), 4 * batch_size) and len(failed) > FAIL_STOP * tried:
        raise X3DNetError(f"{dataset.source}: {len(failed)} of the first {tried} videos could not be decoded; "
                          f"first: {next(iter(failed.values()))}")


def _reduce(totals: np.ndarray, world: int) -> tuple[float | None, float | None]:
    if world > 1:
        t = torch.tensor(totals, dtype=torch.float64)
        dist.all_reduce(t)
        totals = t.numpy()
    loss, right, n = totals
    return (round(loss / n, 6), round(100 * right / n, 3)) if n else (None, None)


def _checkpoint(out, net, optimizer, epoch, step, best, failed, rank, world, totals) -> None:
    """Write the state a resumed run starts from (every process calls this: the totals are summed)."""
    if world > 1:
        t = torch.tensor(totals, dtype=torch.float64)
        dist.all_reduce(t)
        totals = t.numpy()
    if rank == 0:
        meta = {"epoch": epoch, "step": step, "best": best, "failed": failed, "totals": [float(v) for v in totals],
                "log_bytes": (out / LOG).stat().st_size}
        _save_state(out, net, optimizer, meta)
    if world > 1:
        dist.barrier()


def _append(out: Path, line: dict) -> None:
    with open(out / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def _epoch_line(s: dict, epochs: int) -> str:
    def pct(v):
        return "-" if v is None else f"{v:.1f}%"

    loss = "-" if s["train_loss"] is None else f"{s['train_loss']:.3f}"
    return (f"epoch {s['epoch']}/{epochs}: train loss {loss} top-1 {pct(s['train_top1'])}; val top-1 "
            f"{pct(s['val_top1'])} top-5 {pct(s['val_top5'])} (best {pct(s['best_val_top1'])}); "
            f"{s['skipped_videos']} skipped; {s['time_s']:.0f} s")


def read_train_log(path: str | os.PathLike[str]) -> list[dict]:
    """The records of a training log (a last line cut short by a kill is left out)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def plot_curves(log_path: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Training loss (per step) and accuracy (per epoch) of a run's log, as a PNG."""
    from .profile import plot_path

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise X3DNetError("--plot needs matplotlib (pip install 'x3dnet[plot]')") from None
    records = read_train_log(log_path)
    steps = [r for r in records if r.get("type") == "step"]
    ends = [r for r in records if r.get("type") == "epoch"]
    per_epoch = max((r["step"] for r in steps), default=1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["epoch"] - 1 + r["step"] / per_epoch for r in steps], [r["loss"] for r in steps], lw=0.8)
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("train_top1", "train top-1"), ("val_top1", "val top-1"), ("val_top5", "val top-5")):
        points = [(r["epoch"], r[key]) for r in ends if r.get(key) is not None]
        if points:
            right.plot(*zip(*points, strict=True), marker="o", label=label)
    right.set(xlabel="epoch", ylabel="%", title="accuracy", ylim=(0, 100))
    right.legend()
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    target = plot_path(path)
    try:
        fig.savefig(target)
    finally:
        plt.close(fig)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
