"""Multi-view evaluation of a labelled video list: top-1, top-5 and per-class accuracy, as the original tests.

Decoding and view building run in DataLoader worker processes; views of several videos share each batch
through the model; a video's score is the mean of its views' probabilities. Every finished video is
appended to the run's log as one JSON line and flushed at once, so a crash or Ctrl-C loses at most the
videos in flight and ``resume=True`` goes on from there with the same final result. Under ``torchrun``
the videos are dealt out to the processes (gloo on CPU, nccl on CUDA) and gathered on rank 0.
The files a run keeps in ``out`` are ``x3dnet.runs``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from . import __version__
from .backends import check_device, create_engine
from .datasets import Dataset, Sample, read_dataset
from .errors import ConfigError, X3DNetError
from .factory import DEFAULT_MODEL, load_model
from .predict import kinetics400_classes, read_labels
from .runs import LOG, log_line, log_path, open_run, start_run, write_results
from .streaming import ClipScorer, StreamingX3D, warmup_frames
from .video import check_interrupt
from .views import ViewRecipe, Views, make_views, view_recipe
from .weights import get_weights, resolve_weights

TOP = 5
WORKER_NICE = 5


class _VideoViews(TorchDataset):
    """Item ``i``: (list index, the video's views or None, the error that stopped it or None)."""

    def __init__(self, samples: Sequence[Sample], indices: Sequence[int], recipe: ViewRecipe):
        self.samples, self.indices, self.recipe = samples, indices, recipe

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Views | None, str | None]:
        index = self.indices[i]
        try:
            # One decoder thread in a worker: the workers and the engine already share every core.
            threads = 1 if get_worker_info() is not None else 0
            return index, make_views(self.samples[index].path, self.recipe, threads=threads), None
        except X3DNetError as e:
            return index, None, str(e)
        except Exception as e:  # noqa: BLE001 - one video must never end a run of thousands
            return index, None, f"{self.samples[index].path}: unexpected {type(e).__name__}: {e}"


def _as_is(item: object) -> object:
    return item


def _worker_init(_: int) -> None:
    # Decoding yields to the engine: a worker preempting one of its threads stalls every thread of the
    # layer being computed. Workers still get the cores whenever the engine leaves them idle; measured
    # with benchmarks/bench_evaluate.py, the rate is steadier (0.84-0.90 of model-only, not 0.79-0.99).
    os.nice(WORKER_NICE)


def evaluate(
    data: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    classes: str | os.PathLike[str] | Sequence[str] | None = None,
    views: int = 30,
    placement: str = "slowfast",
    resize: str | None = None,
    batch_size: int = 8,
    workers: int = 2,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    save_scores: bool = False,
    device: str = "cpu",
    backend: str = "auto",
    precision: str = "fp32",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stream: dict | None = None,
) -> dict:
    """Evaluate the videos ``data`` lists (see ``x3dnet.datasets.read_dataset``) and return the metrics.

    The model and its recipe come from ``load_model``; the views are the recipe's 1-, 10- or 30-view preset
    for ``placement``. ``classes`` (a file, a list, or by default Kinetics-400 for a 400-class model) maps
    label names to indices. With ``out`` every result is saved as it is made; ``resume`` continues a run
    saved there. Run under ``torchrun`` to shard the videos over processes; every rank returns the metrics.

    ``stream``: score each video as co3d scores its continual networks instead (``x3dnet.streaming``): a
    dict of ``StreamingX3D``'s options (``pool_frames``, ``se``, ``fill``); one clip from the video's start
    at the recipe's stride, as long as co3d's warm-up plus one frame (the last frame repeated where the
    video is shorter), short side and centre crop at the training crop, through a clean stream, scored at
    its last step.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    check_device(device)
    rank, world, local_rank, local_world, owned = _distributed(device)
    try:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}" if world > 1 else device
        return _evaluate(
            data, model=model, weights=weights, root=root, classes=classes, views=views, placement=placement,
            resize=resize, batch_size=batch_size, workers=workers, out=Path(out) if out is not None else None,
            resume=resume, save_scores=save_scores, device=device, backend=backend, precision=precision,
            progress=progress and rank == 0, log=log if rank == 0 else (lambda line: None),
            rank=rank, world=world, local_world=local_world, stream=stream,
        )
    finally:
        if owned:
            dist.destroy_process_group()


def process_group_backend(cuda: bool) -> str:
    """torch.distributed's backend: gloo on CPUs; on CUDA nccl for CUDA tensors (DDP's gradients, synchronised
    BN) and gloo for the CPU tensors that train's bookkeeping sums (losses, counts), which nccl alone refuses."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def _distributed(device: str) -> tuple[int, int, int, int, bool]:
    """(rank, world size, local rank, local world size, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0, 1, False
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    owned = not dist.is_initialized()
    if owned:
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        # Ranks wait for each other at the start (rank 0 may be downloading weights) and at the end (the
        # last shard may take longer): far beyond the default half hour on a large list.
        dist.init_process_group(process_group_backend(cuda), timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size(), local_rank, local_world, owned


def _evaluate(data, *, model, weights, root, classes, views, placement, resize, batch_size, workers, out, resume,
              save_scores, device, backend, precision, progress, log, rank, world, local_world, stream) -> dict:
    source = weights if weights is not None else get_weights(model or DEFAULT_MODEL).name
    # Rank 0 first: one download into the shared cache, not one per process.
    net, recipe = _rank0_first(lambda: load_model(model, weights=source), rank, world)
    weights_path = resolve_weights(source)
    names = _class_names(classes if classes is not None else net.class_names, net.config.num_classes)
    dataset = read_dataset(data, classes=names, root=root)
    streaming = None
    if stream is not None:
        streaming, view_set = _streaming(net, recipe, stream, backend=backend, precision=precision, device=device)
    else:
        try:
            view_set = view_recipe(recipe, views, placement=placement, resize=resize)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    identity = {
        "data": str(dataset.source), "data_format": dataset.format, "data_sha256": dataset.sha256,
        # Where the list's paths lead, resolved: another --root is another set of files.
        "root": str(dataset.root.resolve()), "model": net.config.name, "weights": str(weights_path),
        "weights_sha256": _sha256(weights_path),
        "classes_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "recipe": json.loads(json.dumps(dataclasses.asdict(view_set))), "views": view_set.views, "precision": precision,
        "save_scores": save_scores,
    }
    if streaming is not None:
        identity["stream"] = {"pool_frames": streaming.pool_frames, "se": streaming.se, "fill": streaming.fill}

    # Rank 0 reads what earlier runs finished and tells the others, or tells them why it cannot start.
    error, done, lock = None, {}, None
    if rank == 0:
        try:
            lock, done = open_run(out, identity, resume=resume, dataset=dataset) if out else (None, {})
        except X3DNetError as e:
            error = str(e)
    try:
        return _evaluate_locked(
            net, dataset, view_set, identity, weights_path, done, error, out=out, batch_size=batch_size,
            workers=workers, save_scores=save_scores, device=device, backend=backend, precision=precision,
            progress=progress, log=log, rank=rank, world=world, local_world=local_world, streaming=streaming)
    finally:
        if lock is not None:
            lock.release()


def _evaluate_locked(net, dataset, view_set, identity, weights_path, done, error, *, out, batch_size, workers,
                     save_scores, device, backend, precision, progress, log, rank, world, local_world,
                     streaming=None) -> dict:
    """The run itself, while rank 0 holds the run folder's lock (``error``: why rank 0 could not open it)."""
    error, finished = _broadcast((error, sorted(done)), world)
    if error:
        raise X3DNetError(error)
    skip = set(finished)
    todo = [i for i in range(len(dataset)) if i not in skip]
    shard = todo[rank::world]
    if rank == 0:
        log(f"{net.config.name} ({weights_path.name}), {view_set.describe()}")
        log(f"{dataset.source}: {len(dataset)} videos ({dataset.format})"
            + (f", {len(finished)} done earlier, {len(todo)} to go" if finished else "")
            + (f", {world} processes" if world > 1 else "") + (f"; saving to {out}" if out else ""))

    # Workers fork before the engine starts its thread pools.
    loader = DataLoader(_VideoViews(dataset.samples, shard, view_set), batch_size=None, collate_fn=_as_is,
                        num_workers=workers, prefetch_factor=2 if workers else None, worker_init_fn=_worker_init)
    items = iter(loader)
    threads = max(1, (os.cpu_count() or 1) // local_world) if local_world > 1 and device == "cpu" else None
    if streaming is not None:
        if threads:
            torch.set_num_threads(threads)
        engine = ClipScorer(streaming)
    else:
        engine = create_engine(net, backend=backend, device=device, precision=precision,
                               input_shape=(view_set.frames, view_set.crop, view_set.crop), threads=threads)
    if rank == 0:
        parity = getattr(engine, "parity", None)
        log(f"engine: {engine.describe()}" + (f", max |dp| vs eager {parity:.1e}" if parity else ""))

    if rank == 0 and out:
        start_run(out, identity)
    path = log_path(out, rank, world) if out else None
    start = time.perf_counter()
    bar = tqdm(total=len(shard), unit="video", disable=not progress, dynamic_ncols=True,
               desc=f"rank 0 of {world}" if world > 1 else "evaluate", file=sys.stderr)
    records: list[dict] = []
    try:
        _run(engine, items, dataset, records, batch_size=batch_size, log_path=path, save_scores=save_scores, bar=bar)
    except KeyboardInterrupt:
        if out is not None:
            saved = len(finished) + sum("top5" in r for r in records)  # failed ones are tried again
            log(f"{out}: {saved} videos saved{' by rank 0 and before' if world > 1 else ''}; "
                f"the same command with --resume goes on from there")
        raise
    wall = time.perf_counter() - start
    gathered = _gather(records, world)
    metrics = None
    if rank == 0:
        new = [r for part in gathered for r in part]
        metrics = _finish(out, identity, dataset, {**done, **{r["index"]: r for r in new}}, new_records=new,
                          wall=wall, engine=engine.describe(), world=world, batch_size=batch_size, workers=workers,
                          save_scores=save_scores, log=log)
    metrics = _broadcast(metrics, world)
    if metrics["videos"] == 0:
        raise X3DNetError(f"no video could be evaluated: all {metrics['failed']} failed"
                          + (f" (their reasons are in {out / 'metrics.json'})" if out is not None else ""))
    return metrics


def _streaming(net, recipe, options: dict, *, backend: str, precision: str, device: str):
    """The stream ``evaluate --stream`` scores with, and the one clip per video it is fed."""
    if backend not in ("auto", "torch") or precision != "fp32":
        raise ConfigError("evaluate --stream runs eager PyTorch in fp32, batched over time and videos "
                          f"(not {backend} {precision})")
    stream = StreamingX3D(net, device=device, **options)
    crop = recipe.train_crop
    view_set = ViewRecipe(frames=warmup_frames(stream) + 1, stride=recipe.stride, short_side=crop, crop=crop,
                          clips=1, crops=1, placement="slowfast", resize="bilinear", target_fps=recipe.target_fps,
                          mean=recipe.mean, std=recipe.std)
    return stream, view_set


def validate(model, dataset: Dataset, view_set: ViewRecipe, *, batch_size: int = 8, workers: int = 0,
             progress: bool = False) -> dict:
    """Accuracy of ``model`` (an eval-mode X3D or an engine) on ``dataset`` with ``view_set``'s views, as
    ``evaluate`` computes it but without a run folder: ``compute_metrics``'s fields and ``failed``."""
    loader = DataLoader(_VideoViews(dataset.samples, range(len(dataset)), view_set), batch_size=None,
                        collate_fn=_as_is, num_workers=workers, prefetch_factor=2 if workers else None,
                        worker_init_fn=_worker_init)
    bar = tqdm(total=len(dataset), unit="video", disable=not progress, dynamic_ncols=True, desc="validate",
               leave=False, file=sys.stderr)
    records: list[dict] = []
    _run(model, iter(loader), dataset, records, batch_size=batch_size, log_path=None, save_scores=False, bar=bar)
    done = [r for r in records if "error" not in r]
    return {**compute_metrics(done, len(dataset.classes)), "failed": len(records) - len(done),
            "failed_videos": [{"video": r["video"], "error": r["error"]} for r in records if "error" in r]}


def _rank0_first(fn: Callable[[], object], rank: int, world: int) -> object:
    """``fn()`` on rank 0, then on the others; an error on rank 0 is raised on every rank."""
    error = None
    if rank == 0:
        try:
            result = fn()
        except X3DNetError as e:
            error = str(e)
    error = _broadcast(error, world)
    if error:
        raise X3DNetError(error)
    return result if rank == 0 else fn()


def _class_names(classes: str | os.PathLike[str] | Sequence[str] | None, num_classes: int) -> list[str]:
    if classes is None:
        if num_classes != 400:
            raise ConfigError(f"the model has {num_classes} classes, not Kinetics-400's 400: "
                              f"name them with --classes FILE (one per line, in index order)")
        return kinetics400_classes()
    names = read_labels(classes) if isinstance(classes, (str, os.PathLike)) else list(classes)
    if len(names) != num_classes:
        raise ConfigError(f"{classes if isinstance(classes, (str, os.PathLike)) else 'classes'}: "
                          f"{len(names)} class names for a model with {num_classes} classes")
    return names


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.inference_mode()
def _run(engine, items, dataset: Dataset, records: list[dict], *, batch_size: int, log_path: Path | None,
         save_scores: bool, bar: tqdm) -> None:
    """Views of consecutive videos fill each batch; a video is recorded (appended to ``records`` and to the
    log) when its last view is through."""
    pending: deque[tuple[dict, int]] = deque()  # (video in flight, view index)
    correct = evaluated = 0
    sink = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 - closed below

    def record(r: dict) -> None:
        nonlocal correct, evaluated
        records.append(r)
        if sink:
            sink.write(log_line(r, save_scores=save_scores))
            sink.flush()
        bar.update(1)
        if "top5" in r:
            evaluated += 1
            correct += r["top5"][0] == r["label"]
            bar.set_postfix_str(f"top-1 {100 * correct / evaluated:.1f}%", refresh=False)

    def run_batch() -> None:
        batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
        r = batch[0][0]["views"].recipe
        clips = torch.empty(len(batch), 3, r.frames, r.crop, r.crop)
        first = 0
        for last in range(1, len(batch) + 1):  # each video's run of views is cut straight into the batch
            if last == len(batch) or batch[last][0] is not batch[first][0]:
                batch[first][0]["views"].stack([v for _, v in batch[first:last]], out=clips[first:last])
                first = last
        probs = engine(clips).float().softmax(1).cpu()
        for (video, v), p in zip(batch, probs, strict=True):
            video["probs"][v] = p
            video["left"] -= 1
            if video["left"] == 0:
                record(_result(video, dataset))

    try:
        for index, views, error in items:
            check_interrupt()  # a Ctrl-C that FFmpeg swallowed while this video was decoded
            sample = dataset.samples[index]
            if error is not None:
                record({"index": index, "video": sample.video, "label": sample.label, "error": error})
                continue
            video = {"index": index, "views": views, "left": len(views), "corrupt": len(views.corrupt),
                     "probs": torch.empty(len(views), engine.config.num_classes)}
            pending.extend((video, v) for v in range(len(views)))
            while len(pending) >= batch_size:
                run_batch()
        while pending:
            run_batch()
    finally:
        bar.close()
        if sink:
            sink.close()


def _result(video: dict, dataset: Dataset) -> dict:
    sample = dataset.samples[video["index"]]
    mean = video["probs"].mean(0)  # the video's score: the mean of its views' probabilities
    scores, top = mean.topk(min(TOP, mean.numel()))
    return {"index": video["index"], "video": sample.video, "label": sample.label, "top5": top.tolist(),
            "scores": scores.tolist(), "corrupt_frames": video["corrupt"], "probs": mean}


def compute_metrics(records: Sequence[dict], num_classes: int) -> dict:
    """Top-1, top-5 and mean per-class accuracy (percent) of video records with ``label`` and ``top5``."""
    videos = np.zeros(num_classes, np.int64)
    right = np.zeros(num_classes, np.int64)
    top5 = 0
    for r in records:
        videos[r["label"]] += 1
        right[r["label"]] += r["top5"][0] == r["label"]
        top5 += r["label"] in r["top5"][:TOP]
    present = videos > 0
    n = int(videos.sum())
    return {  # None, not 0%, where no video was evaluated
        "top1": 100 * float(right.sum()) / n if n else None,
        "top5": 100 * top5 / n if n else None,
        "mean_class_accuracy": float(np.mean(100 * right[present] / videos[present])) if n else None,
        "videos": n,
        "per_class": [{"index": int(c), "videos": int(videos[c]), "top1": 100 * float(right[c] / videos[c])}
                      for c in np.flatnonzero(present)],
    }


def _finish(out: Path | None, identity: dict, dataset: Dataset, results: dict[int, dict], *, new_records: list[dict],
            wall: float, engine: str, world: int, batch_size: int, workers: int, save_scores: bool,
            log: Callable[[str], None]) -> dict:
    ordered = [results[i] for i in sorted(results)]
    done = [r for r in ordered if "error" not in r]
    failed = [r for r in ordered if "error" in r]
    corrupt = [r for r in done if r.get("corrupt_frames")]
    evaluated_now = sum("error" not in r for r in new_records)
    accuracy = compute_metrics(done, len(dataset.classes))
    for row in accuracy["per_class"]:
        row["name"] = dataset.classes[row["index"]]
    per_class = accuracy.pop("per_class")
    metrics = {
        **accuracy, "failed": len(failed), "listed": len(dataset),
        "model": identity["model"], "weights": identity["weights"], "weights_sha256": identity["weights_sha256"],
        "views": identity["views"], "recipe": identity["recipe"],
        "data": identity["data"], "data_format": identity["data_format"], "data_sha256": identity["data_sha256"],
        "engine": engine, "processes": world, "batch_size": batch_size, "workers": workers,
        # Rates count the videos evaluated in this run: a failed video costs little and says nothing.
        "evaluated_now": evaluated_now, "failed_now": len(new_records) - evaluated_now, "wall_time_s": round(wall, 3),
        "videos_per_s": round(evaluated_now / wall, 4) if wall > 0 else None, "x3dnet": __version__,
        "videos_with_corrupt_frames": len(corrupt),
        "per_class": per_class,
        "failed_videos": [{"video": r["video"], "label": r["label"], "error": r["error"]} for r in failed],
        "corrupt_videos": [{"video": r["video"], "corrupt_frames": r["corrupt_frames"]} for r in corrupt],
    }
    if out is not None:
        write_results(out, dataset, done, metrics, save_scores=save_scores)
    _summary(metrics, out, log)
    return metrics


def _summary(m: dict, out: Path | None, log: Callable[[str], None]) -> None:
    log(f"videos: {m['videos']} evaluated, {m['failed']} failed of {m['listed']} listed")
    for f in m["failed_videos"][:10]:
        log(f"  failed: {f['error']}")
    if m["failed"] > 10:
        log(f"  ... and {m['failed'] - 10} more (all in metrics.json)")
    if m["videos_with_corrupt_frames"]:
        log(f"  {m['videos_with_corrupt_frames']} of the evaluated videos had corrupt frames (listed in metrics.json)")
    if m["videos"]:
        log(f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  mean class accuracy {m['mean_class_accuracy']:.2f}%")
    if m["evaluated_now"]:
        log(f"{m['evaluated_now']} videos in {m['wall_time_s']:.1f} s: {m['videos_per_s']:.2f} videos/s")
    if out is not None:
        log(f"wrote {out / 'metrics.json'} and {out / LOG}")


def _broadcast(obj: object, world: int) -> object:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(records: list[dict], world: int) -> list[list[dict]]:
    if world == 1:
        return [records]
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(records, parts, dst=0)
    return parts
