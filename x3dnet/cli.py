"""``x3dnet`` command line: each verb parses its flags and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .backends import BACKENDS, PRECISIONS, installed
from .backends import export_model as export
from .checkpoint import convert_checkpoint, load_checkpoint
from .errors import X3DNetError
from .evaluate import evaluate
from .factory import create_model, load_model
from .layouts import LAYOUTS
from .paths import os_error_line
from .predict import kinetics400_classes, predict, read_labels
from .profile import cpu_name, plot, plot_path, profile, size_table
from .streaming import STREAM_BACKENDS, StreamingX3D, stream_video
from .synthetic import PATTERNS, make_dataset
from .video import RESIZE_MODES, VideoError, on_sigint
from .views import PLACEMENTS, VIEW_PRESETS
from .weights import WEIGHTS, cached_path, download_weights


def _table(rows: list[dict[str, object]]) -> str:
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in rows[0]}
    lines = ["  ".join(k.ljust(w) for k, w in widths.items())]
    lines += ["  ".join(str(r[k]).ljust(w) for k, w in widths.items()) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def models(args: argparse.Namespace) -> None:
    _emit(size_table(), args.json)
    if not args.json:
        print("GMACs: multiply-adds of conv and linear layers per clip (the paper's and MODEL_ZOO's 'FLOPs').")


def weights_list(args: argparse.Namespace) -> None:
    rows = []
    for record in WEIGHTS.values():
        r = record.recipe
        if args.json:
            rows.append({**dataclasses.asdict(record), "cached": cached_path(record).exists()})
            continue
        rows.append({
            "name": record.name,
            "layout": record.layout,
            "clip": r.clip,
            "crop: train / 1-crop / 3-crop": f"{r.train_crop} / {r.test_short_side}->{r.train_crop} / {r.test_crop}",
            "mean/std": f"{r.mean[0]}/{r.std[0]}",
            "reported top-1 (views)": ", ".join(
                f"{a.top1}" + (f"/{a.top5}" if a.top5 else "") + f" ({a.views}"
                + (", global pool" if a.head_pooling == "global" else "") + ")"
                for a in record.reported
            ),
            "cached": "yes" if cached_path(record).exists() else "",
        })
    _emit(rows, args.json)


def weights_download(args: argparse.Namespace) -> None:
    for name in args.names:
        print(download_weights(name, force=args.force))


def inspect(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.checkpoint)
    info = {
        "file": str(ckpt.path),
        "layout": ckpt.layout,
        "model": ckpt.describe(),
        "classes": ckpt.num_classes,
        "tensors": len(ckpt.state_dict),
        "class names": list(ckpt.classes) if ckpt.classes else None,
        "config": dataclasses.asdict(ckpt.config) if ckpt.config else None,
        "recipe": ckpt.recipe.to_dict() if ckpt.recipe else None,
    }
    if args.json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value[:10]) + (f", ... ({len(value)} in all)" if len(value) > 10 else "")
        if isinstance(value, dict):
            value = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in value.items())
        print(f"{key}: {value}")


def convert(args: argparse.Namespace) -> None:
    done = convert_checkpoint(args.src, args.dst, to=args.to, model=args.model, force=args.force)
    print(
        f"wrote {done.path}: {done.layout} layout, {done.tensors} tensors, from {done.source.layout} "
        f"({done.source.describe()}); max |dp| vs source {done.max_abs_diff:.1e}"
    )


def predict_videos(args: argparse.Namespace) -> int:
    labels = read_labels(args.labels) if args.labels else None
    failed = 0
    for result in predict(args.videos, model=args.model, weights=args.weights, views=args.views,
                          placement=args.placement, resize=args.resize, batch_size=args.batch_size,
                          device=args.device, backend=args.backend, precision=args.precision, stills=args.stills):
        if isinstance(result, X3DNetError):
            print(f"x3dnet: error: {result}", file=sys.stderr, flush=True)
            failed += 1
            continue
        classes = result.scores.numel()
        if labels is None and result.classes is not None:
            labels = list(result.classes)  # the names a trained model's file records
        if labels is None and classes == 400:
            labels = kinetics400_classes()
        if labels is not None and len(labels) != classes:
            raise X3DNetError(f"{args.labels or 'Kinetics-400 labels'}: {len(labels)} labels for a model "
                              f"with {classes} classes")
        top = result.top(args.top, labels)
        if result.corrupt:
            n = len(result.corrupt)
            print(f"x3dnet: warning: {result.video}: {n} corrupt frame{'s' * (n > 1)} decoded (first at "
                  f"{result.corrupt[0]:.2f} s): the decoder concealed damaged data, so the prediction may be "
                  "off", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps({"video": result.video, "model": result.model, "views": result.views,
                              "corrupt_frames": len(result.corrupt), "predictions": top}), flush=True)
            continue
        print(f"{result.video}  ({result.model}, {result.views} view{'' if result.views == 1 else 's'})")
        for rank, p in enumerate(top, 1):
            print(f"  {rank:>2}. {p['score']:7.2%}  {p['label']}" + ("" if labels is None else f"  [{p['index']}]"))
        print(flush=True)
    return 1 if failed else 0


def evaluate_list(args: argparse.Namespace) -> None:
    out = args.out
    if out == "":
        raise X3DNetError("an empty string was given as --out")
    if out is None:
        model = args.model or (Path(args.weights).stem if args.weights else "x3d_m")
        out = Path("x3dnet-runs") / f"{Path(args.data.rstrip('/')).stem}-{model}-{args.placement}-{args.views}v"
    evaluate(args.data, model=args.model, weights=args.weights, root=args.root, classes=args.classes,
             views=args.views, placement=args.placement, resize=args.resize, batch_size=args.batch_size,
             workers=args.workers, out=out, resume=args.resume, save_scores=args.save_scores, device=args.device,
             backend=args.backend, precision=args.precision, progress=not args.no_progress,
             stream=_stream_options(args) if args.stream else None)


def _stream_options(args: argparse.Namespace) -> dict:
    return {"pool_frames": args.pool_frames, "se": args.se, "fill": args.fill}


def stream_source(args: argparse.Namespace) -> int:
    from .overlay import AnnotatedVideo  # Pillow, only for --out

    net, recipe = load_model(args.model, weights=args.weights)
    labels = read_labels(args.labels) if args.labels else list(net.class_names) if net.class_names else None
    classes = net.config.num_classes
    if labels is None and classes == 400:
        labels = kinetics400_classes()
    if labels is not None and len(labels) != classes:
        source = args.labels or "the weights' class names"
        raise X3DNetError(f"{source}: {len(labels)} labels for a model with {classes} classes")
    names = labels or [str(i) for i in range(classes)]
    backend = args.backend
    if backend == "auto":
        backend = "openvino" if args.device == "cpu" and installed("openvino") else "torch"
    stages = args.stages or (2 if backend == "openvino" and (os.cpu_count() or 1) >= 2 else 1)
    stream = StreamingX3D(net, device=args.device, backend=backend, stages=stages, **_stream_options(args))
    writer = AnnotatedVideo(args.out) if args.out else None  # refuses a bad path before decoding
    steps = 0
    top: list[tuple[str, float]] = []
    try:
        for s in stream_video(stream, args.source, recipe, timeout=args.timeout):
            if s.frame == 0:  # the source opened: say what runs on it
                print(f"{args.source}: {net.config.name}, {stream.describe()}; one step every {recipe.stride} "
                      f"frames at {recipe.target_fps:g} fps", file=sys.stderr, flush=True)
            for step in s.steps:
                steps = step + 1
                if s.probs is None:
                    continue
                scores, indices = s.probs.topk(min(max(args.top, 5), classes))
                best = [{"label": names[i], "index": i, "score": round(p, 6)}
                        for p, i in zip(scores.tolist(), indices.tolist(), strict=True)]
                top = [(b["label"], b["score"]) for b in best[:3]]
                if args.json:
                    print(json.dumps({"time": round(s.time, 3), "frame": s.frame, "step": step, "top5": best[:5],
                                      "scores": [round(p, 6) for p in s.probs.tolist()]}), flush=True)
                elif (step - stream.delay) % args.every == 0:
                    shown = ", ".join(f"{b['score']:.1%} {b['label']}" for b in best[:args.top])
                    print(f"{s.time:8.2f} s  step {step:>5}  {shown}", flush=True)
            if writer is not None:
                caption = f"{s.time:.2f} s  step {steps}" + ("" if top else f"  (predicting from step {stream.delay})")
                writer.write(s.image, top, caption, fps=s.fps)
    except VideoError as e:
        if steps == 0:
            raise
        print(f"x3dnet: error: the stream stopped after {steps} steps: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        written = writer.close() if writer is not None else None
        if written is not None:
            print(f"wrote {written}", file=sys.stderr, flush=True)
    if steps <= stream.delay:
        print(f"x3dnet: error: {args.source} ended after {steps} steps, before the first prediction (at step "
              f"{stream.delay})", file=sys.stderr, flush=True)
        return 1
    return 0


def train_videos(args: argparse.Namespace) -> None:
    from .train import train

    if args.out == "":
        raise X3DNetError("an empty string was given as --out")
    out = args.out
    if out is None:
        model = args.model or (Path(args.weights).stem.split(".")[0] if args.weights else "x3d")
        data = Path(args.data.rstrip("/"))
        name = data.name if data.is_dir() else data.stem
        out = Path("x3dnet-runs") / f"train-{name}-{model}"
    plot = None
    if args.plot:  # checked before hours of training; the run folder itself is made by the run
        inside = Path(args.plot).parent.resolve() == Path(out).resolve()
        plot = Path(args.plot) if inside and Path(args.plot).suffix else plot_path(args.plot)
    train(args.data, val=args.val, val_split=args.val_split, model=args.model, weights=args.weights,
          classes=args.classes, root=args.root, recipe=args.recipe, epochs=args.epochs, batch_size=args.batch_size,
          lr=args.lr, dropout=args.dropout, freeze=args.freeze, workers=args.workers, seed=args.seed,
          precision=args.precision, device=args.device, out=out, resume=args.resume, sync_bn=args.sync_bn,
          precise_bn_batches=args.precise_bn_batches, checkpoint_minutes=args.checkpoint_minutes,
          val_views=args.val_views, flip=not args.no_flip, channels_last=args.channels_last,
          progress=not args.no_progress, plot=plot)


def synthesize(args: argparse.Namespace) -> None:
    made = make_dataset(args.out, videos_per_class=args.videos_per_class, seconds=args.seconds,
                        size=tuple(args.size), fps=args.fps, seed=args.seed, force=args.force)
    print(f"wrote {len(made.labels)} videos of {len(PATTERNS)} classes under {made.videos}\n"
          f"  path-label list: {made.slowfast}\n  Kinetics CSV:    {made.kinetics_csv} (--root {made.videos})\n"
          f"  class folders:   {made.videos}\n  class names:     {made.classes}")


def profile_models(args: argparse.Namespace) -> None:
    target = plot_path(args.plot) if args.plot else None  # checked before minutes of measuring
    rows = profile(args.model, backends=args.backend, precisions=args.precision, batch_sizes=args.batch_size,
                   device=args.device, runs=args.runs, warmup=args.warmup, crop=args.crop,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        _emit(rows, True)
    else:
        _emit([{
            "model": r["model"], "backend": r["backend"], "precision": r["precision"], "batch": r["batch_size"],
            "input (TxSxS)": r["input"], "GMACs": r["gmacs"],
            "params M (w/o BN)": f"{r['params_m']} ({r['params_m_no_bn']})",
            "clips/s": f"{r['clips_per_s']:.2f} ± {r['clips_per_s_std']:.2f}", "ms/clip": r["latency_ms"],
            "GFLOP/s": r["gflops_per_s"], "peak MB": r["peak_mem_mb"],
        } for r in rows], False)
        memory = "max allocated" if args.device != "cpu" else "process RSS"
        print(f"{args.runs} timed rounds after {args.warmup} warm-up calls, rows interleaved; GMACs: multiply-adds "
              f"of conv and linear layers per clip; peak MB: {memory}.\nCPU: {cpu_name()}, "
              f"{torch.get_num_threads()} threads")
    if target:
        print(f"wrote {plot(rows, target)}", file=sys.stderr)


def export_model(args: argparse.Namespace) -> None:
    if args.weights is None and args.model is None:
        raise X3DNetError("export needs --model, --weights or both")
    model = load_model(args.model, weights=args.weights)[0] if args.weights else create_model(args.model).eval()
    c = model.config
    shape = (c.frames, args.crop or c.train_crop, args.crop or c.train_crop)
    path, diff = export(model, args.out, format=args.format, input_shape=shape, banded=args.banded)
    source = args.weights or "random weights"
    print(f"wrote {path}: {c.name} ({source}), input (batch, 3, {', '.join(map(str, shape))}), "
          f"max |dp| vs PyTorch {diff:.1e}")


def _engine_flags(p: argparse.ArgumentParser, *, default_backend: str) -> None:
    p.add_argument("--backend", choices=("auto", *BACKENDS), default=default_backend,
                   help=f"inference engine (default {default_backend}; auto: the fastest installed)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 (default), bf16 or fp16")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, not {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, not {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 or a positive number, not {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, not {text!r}")
    return value


def _stream_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool-frames", type=_positive, metavar="P",
                   help="the head averages the last P frames (default: the training clip's T; co3d's X64: 64)")
    p.add_argument("--se", choices=("frame", "clip"), default="frame",
                   help="squeeze-excitation over the current frame (default, co3d's) or the last P frames")
    p.add_argument("--fill", choices=("zeros", "replicate"), default="replicate",
                   help="what the temporal state holds before the first frame (default replicate, co3d's test)")


def _emit(rows: list[dict[str, object]], as_json: bool) -> None:
    print("\n".join(json.dumps(r) for r in rows) if as_json else _table(rows))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="x3dnet", description="X3D video recognition networks.")
    parser.add_argument("--version", action="version", version=f"x3dnet {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("models", help="the variants with their parameters and multiply-adds")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=models)

    p = verbs.add_parser("weights", help="the published checkpoints")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("list", help="the weights table, with each file's recipe and reported accuracy")
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(run=weights_list)
    q = actions.add_parser("download", help="download into the cache ($X3DNET_HOME, default ~/.cache/x3dnet)")
    q.add_argument("names", nargs="+", metavar="NAME", help="a record (x3d_m.pytorchvideo) or a model (x3d_m)")
    q.add_argument("--force", action="store_true", help="download again even if cached")
    q.set_defaults(run=weights_download)

    p = verbs.add_parser("inspect", help="what a checkpoint file holds: layout, model, recipe")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=inspect)

    p = verbs.add_parser("convert", help="convert a checkpoint between layouts (checked by running both)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=LAYOUTS, default="native", help="target layout (default: native, safetensors)")
    p.add_argument("--model", help="the variant, where the file cannot tell (XS, S and M share shapes)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=convert)

    p = verbs.add_parser("predict", help="the top classes of each video (mean of the per-view probabilities)")
    p.add_argument("videos", nargs="+", metavar="VIDEO")
    p.add_argument("--model", help="variant (default: the weights' own, else x3d_m)")
    p.add_argument("--weights", help="a checkpoint file or a published name (default: the model's SlowFast weights)")
    p.add_argument("--views", type=int, choices=VIEW_PRESETS, default=30,
                   help="1 clip, 10 clips x 1 crop, or 10 clips x 3 crops (default 30)")
    p.add_argument("--placement", choices=PLACEMENTS, default="slowfast",
                   help="the original's test protocol (slowfast) or the co3d port's")
    p.add_argument("--resize", choices=RESIZE_MODES,
                   help="short-side resize: area (the original's default decoder) or bilinear (its PyAV path, "
                        "and co3d's); default: the placement's own")
    p.add_argument("--top", type=_positive, default=5, help="classes to show (default 5)")
    p.add_argument("--labels", help="class names, one per line (default: those the weights' file records, else "
                                    "Kinetics-400 for 400-class models)")
    p.add_argument("--batch-size", type=_positive, default=8, help="views per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _engine_flags(p, default_backend="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per video")
    p.add_argument("--stills", action="store_true",
                   help="accept still images (and one-frame videos) as clips of one repeated frame")
    p.set_defaults(run=predict_videos)

    p = verbs.add_parser("evaluate", help="top-1/top-5 of a labelled video list (resumable; torchrun shards it)")
    p.add_argument("--data", required=True, help="a 'path label' list, a Kinetics CSV, or a folder of class folders")
    p.add_argument("--root", help="where the list's relative paths start (default: the list's folder)")
    p.add_argument("--classes", help="class names in index order, one per line (default: those the weights' file "
                                     "records, else Kinetics-400)")
    p.add_argument("--model", help="variant (default: the weights' own, else x3d_m)")
    p.add_argument("--weights", help="a checkpoint file or a published name (default: the model's SlowFast weights)")
    p.add_argument("--views", type=int, choices=VIEW_PRESETS, default=30,
                   help="1 clip, 10 clips x 1 crop, or 10 clips x 3 crops (default 30)")
    p.add_argument("--placement", choices=PLACEMENTS, default="slowfast",
                   help="the protocol to reproduce: the original's (slowfast) or the co3d port's")
    p.add_argument("--resize", choices=RESIZE_MODES, help="short-side resize (default: the placement's own)")
    p.add_argument("--batch-size", type=_positive, default=8, help="views per forward pass, across videos (default 8)")
    p.add_argument("--workers", type=_non_negative, default=2, help="decoding processes (default 2; 0: decode inline)")
    p.add_argument("--out", help="results folder (default x3dnet-runs/<list>-<model>-<placement>-<views>v)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--save-scores", action="store_true", help="also write scores.npy: every class's mean probability")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _engine_flags(p, default_backend="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stream", action="store_true",
                   help="score each video as co3d scores a continual X3D: its frames from the start through a "
                        "stream (see x3dnet stream), the prediction after co3d's warm-up")
    _stream_flags(p)
    p.set_defaults(run=evaluate_list)

    p = verbs.add_parser("stream", help="a prediction for every frame of a video or a live source (continual X3D)")
    p.add_argument("source", help="a video file, or a live source FFmpeg opens (rtsp://, http://, ...)")
    p.add_argument("--model", help="variant (default: the weights' own, else x3d_m)")
    p.add_argument("--weights", help="a checkpoint file or a published name (default: the model's SlowFast weights)")
    _stream_flags(p)
    p.add_argument("--every", type=_positive, default=8, help="print the top classes every N steps (default 8)")
    p.add_argument("--top", type=_positive, default=5, help="classes to show (default 5)")
    p.add_argument("--labels", help="class names, one per line (default: the weights' own, else Kinetics-400)")
    p.add_argument("--json", action="store_true", help="one JSON object per step: time, frame, step, top5, scores")
    p.add_argument("--out", metavar="FILE.mp4", help="also write the video with the top-3 classes drawn on each frame")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", choices=("auto", *STREAM_BACKENDS), default="auto",
                   help="torch (eager) or openvino (the steady-state step compiled; CPU); default auto: openvino "
                        "where installed")
    p.add_argument("--stages", type=_positive, metavar="N",
                   help="openvino: run the network as N parts overlapped on consecutive steps, each on its share "
                        "of the cores (default 2 where there are 2 or more cores, else 1)")
    p.add_argument("--timeout", type=_positive_float, default=10.0,
                   help="seconds a live source may stay silent before it counts as broken (default 10)")
    p.set_defaults(run=stream_source)

    p = verbs.add_parser("train", help="fine-tune (or train from scratch) on labelled videos: the original's recipe, "
                                       "resumable; torchrun runs it data-parallel")
    p.add_argument("--data", required=True, help="training videos: a 'path label' list, a Kinetics CSV, or a folder "
                                                 "of class folders")
    p.add_argument("--val", help="validation videos, in any of those formats (same classes)")
    p.add_argument("--val-split", type=_fraction, metavar="FRACTION",
                   help="hold out this fraction of each class of --data for validation instead")
    p.add_argument("--root", help="where --data's relative paths start (default: the list's folder)")
    p.add_argument("--classes", help="class names in index order, one per line (default: the class folders, or "
                                     "the list's labels sorted)")
    p.add_argument("--weights", help="weights to fine-tune: a checkpoint file in any layout or a published name")
    p.add_argument("--model", help="variant (default: the weights' own); without --weights, trained from scratch")
    p.add_argument("--recipe", choices=("finetune", "original"),
                   help="finetune (default with --weights: 1 warm-up epoch) or original (default without: the "
                        "X3D configs' from-scratch schedule, 35/300 of the run warming up)")
    p.add_argument("--epochs", type=_positive, help="default 30 (finetune) or 300 (original)")
    p.add_argument("--batch-size", type=_positive, default=8, help="global batch, over all processes (default 8)")
    p.add_argument("--lr", type=_positive_float, help="base learning rate (default 0.1 per 128 clips of the batch)")
    p.add_argument("--dropout", type=_non_negative_float, default=0.5, help="before the classifier (default 0.5)")
    p.add_argument("--freeze", choices=("none", "bn", "backbone"), default="none",
                   help="bn: fix every BN (small batches); backbone: train the classifier only (linear probe)")
    p.add_argument("--workers", type=_non_negative, default=2, help="decoding processes (default 2; 0: inline)")
    p.add_argument("--seed", type=_non_negative, default=0,
                   help="decides the initial weights, the data order and every augmentation")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default); bf16 (autocast: CUDA, or a CPU with bf16 units and no AMX) or fp16 (CUDA, scaled)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--out", help="run folder (default x3dnet-runs/train-<data>-<model>)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out from its last checkpoint")
    p.add_argument("--sync-bn", action="store_true", help="BN statistics over the global batch under torchrun")
    p.add_argument("--precise-bn-batches", type=_non_negative, default=200,
                   help="training batches precise BN averages over before each validation (default 200; 0: off)")
    p.add_argument("--checkpoint-minutes", type=_non_negative_float, default=10.0,
                   help="also checkpoint within an epoch this often (default 10; 0: at epoch ends only)")
    p.add_argument("--val-views", type=int, choices=VIEW_PRESETS, default=1,
                   help="views per validation video (default 1)")
    p.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flips (for classes a mirror image turns into each other: left/right)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last 3-D weights and clips (default: on the CPU, where it is faster; not on CUDA)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plot", metavar="FILE.png", help="draw loss and accuracy curves after every epoch (matplotlib)")
    p.set_defaults(run=train_videos)

    p = verbs.add_parser("synthesize", help="write a small labelled video dataset to try evaluate on")
    p.add_argument("out", help="folder to write into")
    p.add_argument("--videos-per-class", type=_positive, default=2)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--fps", type=_positive, default=30)
    p.add_argument("--size", type=_positive, nargs=2, default=[128, 96], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty, replacing its videos")
    p.set_defaults(run=synthesize)

    p = verbs.add_parser("profile", help="GMACs, parameters and clips per second of models and engines, measured here")
    p.add_argument("--model", nargs="+", default=["x3d_xs", "x3d_s", "x3d_m", "x3d_l"], metavar="MODEL")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", nargs="+", default=["auto"], choices=("auto", *BACKENDS),
                   help="engines to compare (default: auto, the fastest installed)")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    p.add_argument("--batch-size", nargs="+", type=_positive, default=[1])
    p.add_argument("--runs", type=_positive, default=10, help="timed rounds after warm-up (default 10)")
    p.add_argument("--warmup", type=_positive, default=2, help="untimed calls per row first (default 2)")
    p.add_argument("--crop", choices=("train", "test"), default="train",
                   help="input size: the training clip (the published tables) or the 3-crop test size")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument("--plot", metavar="FILE.png", help="draw throughput against GMACs (needs matplotlib)")
    p.set_defaults(run=profile_models)

    p = verbs.add_parser("export", help="write the model as ONNX or OpenVINO IR (dynamic batch), checked")
    p.add_argument("--model", help="variant (default: the weights' own)")
    p.add_argument("--weights", help="a checkpoint file or a published name (default: random weights of --model)")
    p.add_argument("--format", choices=("onnx", "openvino"), required=True)
    p.add_argument("--out", required=True, help="output path (.onnx, or .xml with its .bin beside it)")
    p.add_argument("--crop", type=_positive, help="clip size the graph is traced at (default: the training crop)")
    p.add_argument("--banded", action="store_true",
                   help="BN folded and the wide blocks computed in bands of rows, as x3dnet runs OpenVINO "
                        "(X3D-M fp32 10-16%% faster on a 2-core CPU)")
    p.set_defaults(run=export_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)  # Ctrl-C during decoding must stop the run, not fail a video
    try:
        status = args.run(args)
    except X3DNetError as e:
        print(f"x3dnet: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the filesystem said no: read-only, full, a file where a folder should be, ...
        print(f"x3dnet: error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("x3dnet: interrupted", file=sys.stderr)
        return 130
    return status or 0
