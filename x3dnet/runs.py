"""The folder of an evaluation run: what it evaluates, its logs, resuming it, and its final files.

``run.json`` holds what is being evaluated (a resumed run must match it). While the run goes, every
finished video is one JSON line appended to ``predictions.jsonl`` (``predictions.rankN.jsonl`` per process
under torchrun), with its mean probabilities in base64 when scores are saved; a crash can cut only the last
line short. When the run ends, ``predictions.jsonl`` is rewritten in list order (``{"video", "label",
"top5", "scores", "index"}``), the rank logs are merged into it and removed, ``metrics.json`` is written,
and with saved scores ``scores.npy`` (videos x classes, list order, NaN rows for videos that failed).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .datasets import Dataset
from .errors import ConfigError
from .paths import FolderLock, atomic_path, os_error_line, write_atomic

LOG = "predictions.jsonl"
# What a resumed run must share with the one it continues; batch size, workers, processes and engine may differ.
IDENTITY = ("data_sha256", "data_format", "root", "model", "weights_sha256", "classes_sha256", "recipe", "precision",
            "save_scores")


def log_path(out: Path, rank: int, world: int) -> Path:
    return out / (LOG if world == 1 else f"predictions.rank{rank}.jsonl")


def log_line(record: dict, *, save_scores: bool) -> str:
    line = {k: v for k, v in record.items() if k != "probs"}
    if save_scores and "probs" in record:
        line["probs"] = base64.b64encode(record["probs"].numpy().astype("<f4").tobytes()).decode()
    return json.dumps(line) + "\n"


def start_run(out: Path, identity: dict) -> None:
    """Write ``run.json`` for a new run (once its engine has started, so a refused engine leaves none)."""
    if not (out / "run.json").exists():
        write_atomic(out / "run.json", json.dumps(identity, indent=2) + "\n")


def open_run(out: Path, identity: dict, *, resume: bool, dataset: Dataset) -> tuple[FolderLock, dict[int, dict]]:
    """Lock ``out`` for this process and make it ready for a new run or, with ``resume``, read the videos
    an earlier one finished there. The lock is held until it is released or the process ends: a second
    process on the same folder is refused."""
    lock = lock_folder(out)
    try:
        return lock, _read_run(out, identity, resume=resume, dataset=dataset)
    except BaseException:
        lock.release()
        raise


def lock_folder(out: Path) -> FolderLock:
    """Create the run folder ``out`` if needed and lock it for this process (see ``FolderLock``)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    try:  # as an X3DNetError, which every rank of a torchrun hears about, not an OSError on rank 0 alone
        out.mkdir(parents=True, exist_ok=True)
        return FolderLock(out)
    except OSError as e:
        raise ConfigError(f"{out}: cannot be used as the run folder: {os_error_line(e)}") from None


def _read_run(out: Path, identity: dict, *, resume: bool, dataset: Dataset) -> dict[int, dict]:
    run_file = out / "run.json"
    logs = sorted(out.glob("predictions*.jsonl"))
    if not run_file.exists():
        if logs:
            raise ConfigError(f"{out}: holds predictions but no run.json; choose another --out")
        return {}
    if not resume:
        raise ConfigError(f"{out}: holds an evaluation already; add --resume to continue it, or choose another --out")
    try:
        earlier = json.loads(run_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run_file}: unreadable ({e})") from None
    if not isinstance(earlier, dict):
        raise ConfigError(f"{run_file}: corrupt: not the object a run writes; choose another --out")
    changed = [k for k in IDENTITY if earlier.get(k) != identity[k]]
    if changed:
        raise ConfigError(f"{out}: the run there differs in {', '.join(changed)}; resume it with the same "
                          f"list, weights and views, or choose another --out")
    # A finished run's predictions.jsonl has no probabilities: those are in its scores.npy.
    scores = out / "scores.npy"
    saved = np.load(scores, mmap_mode="r") if identity["save_scores"] and scores.exists() else None
    done: dict[int, dict] = {}
    for log in logs:
        for record in read_log(log):
            sample = dataset.samples[record["index"]] if 0 <= record["index"] < len(dataset) else None
            if sample is None or sample.video != record["video"]:
                raise ConfigError(f"{log}: a record that is not in {dataset.source}: {record.get('video')!r}")
            if "error" in record:  # videos that failed are tried again
                continue
            if identity["save_scores"] and "probs" not in record:
                if saved is None or saved.shape != (len(dataset), len(dataset.classes)):
                    continue  # its probabilities are lost: evaluate it again
                record["probs"] = torch.from_numpy(np.array(saved[record["index"]]))
            done.setdefault(record["index"], record)
    return done


def read_log(path: Path) -> list[dict]:
    """The records of one log; a last line cut short by a crash is dropped from the file. A line that
    is not a record this code writes (valid JSON of another shape included) is reported as corrupt."""
    raw = path.read_bytes()
    records, offset = [], 0
    for number, line in enumerate(raw.splitlines(keepends=True), 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("cut short")
            records.append(_record(json.loads(line)))
        except ValueError:
            if offset + len(line) < len(raw):
                raise ConfigError(f"{path}:{number}: corrupt record; remove that line to resume") from None
            with open(path, "r+b") as f:
                f.truncate(offset)
            break
        offset += len(line)
    return records


def _record(obj: object) -> dict:
    """``obj`` if it has the shape of a log record (see ``log_line``), else ``ValueError``."""
    def ints(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)

    ok = (isinstance(obj, dict) and isinstance(obj.get("index"), int) and not isinstance(obj["index"], bool)
          and isinstance(obj.get("video"), str) and isinstance(obj.get("label"), int))
    if ok and "error" in obj:
        ok = isinstance(obj["error"], str)
    elif ok:
        ok = (ints(obj.get("top5")) and isinstance(obj.get("scores"), list)
              and all(isinstance(v, (int, float)) for v in obj["scores"])
              and isinstance(obj.get("probs", ""), str) and isinstance(obj.get("corrupt_frames", 0), int))
    if not ok:
        raise ValueError("not a record")
    return obj


def write_results(out: Path, dataset: Dataset, done: Sequence[dict], metrics: dict, *, save_scores: bool) -> None:
    """The final files, each written whole under a temporary name and then renamed."""
    lines = [{k: r[k] for k in ("video", "label", "top5", "scores", "index", "corrupt_frames") if k in r} for r in done]
    write_atomic(out / LOG, "".join(json.dumps(line) + "\n" for line in lines))
    if save_scores:
        matrix = np.full((len(dataset), len(dataset.classes)), np.nan, np.float32)
        for r in done:
            matrix[r["index"]] = _probs(r)
        with atomic_path(out / "scores.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, matrix)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    for part in out.glob("predictions.rank*.jsonl"):  # merged into predictions.jsonl above
        part.unlink()


def _probs(record: dict) -> np.ndarray:
    probs = record["probs"]
    if isinstance(probs, str):  # as a resumed run reads it back from the log
        return np.frombuffer(base64.b64decode(probs), "<f4")
    return probs.numpy()
