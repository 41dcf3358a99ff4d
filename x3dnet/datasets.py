"""Labelled video lists: the original's ``path label`` lines, the official Kinetics CSVs, folder-per-class trees.

Labels always map through a class list in checkpoint index order (Kinetics-400's by default), never through
the classes a list happens to contain: deriving indices from the classes present shifts every index after
a missing class. Names match loosely (case, ``_`` for spaces, quotes and brackets ignored), as folder names
and the class-name files people pass around spell them differently.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import X3DNetError

FORMATS = ("slowfast", "kinetics-csv", "folders")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ogv", ".3gp")


class DatasetError(X3DNetError, ValueError):
    """A list that cannot be read: a malformed line, an unknown label, a missing column."""


@dataclass(frozen=True)
class Sample:
    video: str  # as the list names it: its path, or for a Kinetics CSV the clip's path under the root
    path: Path  # the file to decode (it may not exist: that is reported when it is read)
    label: int
    where: str  # "list.txt:12", for messages


@dataclass(frozen=True)
class Dataset:
    source: Path
    format: str
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]
    sha256: str  # of the list file (of the sorted relative paths for a folder tree)
    root: Path  # where the list's paths lead from: --root, the list's folder, or the folder tree itself

    def __len__(self) -> int:
        return len(self.samples)


def class_key(name: str) -> str:
    """What two spellings of one class name have in common: ``Air_Drumming`` ~ ``air drumming``,
    ``passing_American_football_(in_game)`` ~ ``passing American football (in game)``."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", name.replace("'", "").lower()).split())


class ClassIndex:
    """Class name (any spelling) or integer string -> index in ``classes``."""

    def __init__(self, classes: Sequence[str]):
        self.classes = tuple(classes)
        self._index: dict[str, int] = {}
        for i, name in enumerate(self.classes):
            key = class_key(name)
            if key in self._index:
                raise DatasetError(f"class list: {self.classes[self._index[key]]!r} and {name!r} cannot be told apart")
            self._index[key] = i

    def __call__(self, label: str, where: str, *, numeric: bool = True) -> int:
        if numeric and re.fullmatch(r"[+-]?\d+", label):
            index = int(label)
            if not 0 <= index < len(self.classes):
                raise DatasetError(f"{where}: label {index} is outside 0..{len(self.classes) - 1} "
                                   f"({len(self.classes)} classes)")
            return index
        index = self._index.get(class_key(label))
        if index is None:
            raise DatasetError(f"{where}: unknown label {label!r} (not among the {len(self.classes)} classes)")
        return index


def read_dataset(
    data: str | os.PathLike[str], *, classes: Sequence[str], root: str | os.PathLike[str] | None = None
) -> Dataset:
    """The labelled videos ``data`` lists, in list order.

    ``data`` is a ``path label`` list (the original's: one video per line, the label last, an integer index
    or a class name), an official Kinetics CSV (``label,youtube_id,time_start,time_end,split``; clips named
    ``<youtube_id>_<start:06d>_<end:06d>.<ext>``, found anywhere under ``root``), or a folder holding one
    folder per class. Relative paths resolve against ``root`` (default: the list's folder).
    """
    if os.fspath(data) == "":
        raise DatasetError("an empty string was given as the list")
    source = Path(data)
    index = ClassIndex(classes)
    if source.is_dir():
        return _read_folders(source, index)
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    try:
        text = source.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{source}: cannot read the list ({getattr(e, 'strerror', None) or e})") from None
    base = Path(root) if root is not None else source.parent
    first = next((line for line in text.splitlines() if line.strip()), "")
    header = [h.strip().lower() for h in next(csv.reader([first]), [])]
    if "youtube_id" in header:
        samples, fmt = _read_kinetics_csv(source, text, base, index), "kinetics-csv"
    else:
        samples, fmt = _read_path_label(source, text, base, index), "slowfast"
    if not samples:
        raise DatasetError(f"{source}: lists no videos")
    _no_duplicates(samples)
    return Dataset(source, fmt, index.classes, tuple(samples), hashlib.sha256(text.encode()).hexdigest(), base)


def training_classes(data: str | os.PathLike[str]) -> list[str]:
    """The classes a list trains, where no class file names them: a folder tree's class folders, a Kinetics
    CSV's labels, or a ``path label`` list's labels (names sorted; integer labels 0..max as names "0"...)."""
    source = Path(data)
    if os.fspath(data) == "":
        raise DatasetError("an empty string was given as the list")
    if source.is_dir():
        names = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DatasetError(f"{source}: no class folders in it")
        return names
    if not source.exists():
        raise DatasetError(f"{source}: no such file or folder")
    try:
        text = source.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{source}: cannot read the list ({getattr(e, 'strerror', None) or e})") from None
    first = next((line for line in text.splitlines() if line.strip()), "")
    if "youtube_id" in [h.strip().lower() for h in next(csv.reader([first]), [])]:
        reader = csv.DictReader(text.splitlines())
        reader.fieldnames = [f.strip().lower() for f in reader.fieldnames or []]
        if "label" not in reader.fieldnames:
            raise DatasetError(f"{source}:1: no label column: cannot train")
        labels = {(row.get("label") or "").strip() for row in reader} - {""}
    else:
        labels = {fields[1] for line in text.splitlines() if len(fields := line.strip().rsplit(None, 1)) == 2}
    if labels and all(re.fullmatch(r"\d+", label) for label in labels):
        return [str(i) for i in range(max(map(int, labels)) + 1)]
    return sorted(labels, key=class_key)


def _read_path_label(source: Path, text: str, base: Path, index: ClassIndex) -> list[Sample]:
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        fields = line.strip().rsplit(None, 1)  # the label is the last field; a path may hold spaces
        if len(fields) != 2:
            raise DatasetError(f"{where}: expected 'path label', got {line.strip()!r}")
        video, label = fields
        samples.append(Sample(video, base / video, index(label, where), where))
    return samples


def _read_kinetics_csv(source: Path, text: str, base: Path, index: ClassIndex) -> list[Sample]:
    reader = csv.DictReader(text.splitlines())
    reader.fieldnames = [f.strip().lower() for f in reader.fieldnames or []]
    missing = [c for c in ("youtube_id", "time_start", "time_end") if c not in reader.fieldnames]
    if missing:
        raise DatasetError(f"{source}:1: the header lacks {', '.join(missing)}")
    if "label" not in reader.fieldnames:
        raise DatasetError(f"{source}:1: no label column (the Kinetics test split's CSV has none): cannot evaluate")
    files = _index_clips(base)
    samples = []
    for row in reader:
        where = f"{source}:{reader.line_num}"
        if None in row or any(row[c] is None for c in reader.fieldnames):
            raise DatasetError(f"{where}: expected {len(reader.fieldnames)} fields as the header says")
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
        except ValueError:
            raise DatasetError(f"{where}: time_start and time_end must be numbers, not "
                               f"{row['time_start']!r} and {row['time_end']!r}") from None
        label = index(row["label"].strip(), where, numeric=False)
        stem = f"{row['youtube_id'].strip()}_{start:06d}_{end:06d}"
        found = files.get(stem, [])
        # Several files of one clip (another extension, another split's folder): prefer its class folder.
        found.sort(key=lambda p: (len(p.parts) < 2 or class_key(p.parts[-2]) != class_key(index.classes[label]), p))
        relative = found[0] if found else Path(index.classes[label]) / f"{stem}.mp4"
        samples.append(Sample(relative.as_posix(), base / relative, label, where))
    return samples


def _index_clips(base: Path) -> dict[str, list[Path]]:
    """Video files under ``base`` by name without extension, as paths relative to ``base``."""
    files: dict[str, list[Path]] = {}
    for folder, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTENSIONS:
                files.setdefault(stem, []).append(Path(folder, name).relative_to(base))
    return files


def _read_folders(source: Path, index: ClassIndex) -> Dataset:
    samples, listing = [], []
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    labelled = sorted(((index(f.name, str(f), numeric=False), f) for f in folders), key=lambda t: t[0])
    for label, folder in labelled:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith("."):
                video = path.relative_to(source).as_posix()
                samples.append(Sample(video, path, label, str(path)))
                listing.append(f"{video} {label}")
    if not samples:
        raise DatasetError(f"{source}: no videos in class folders ({', '.join(VIDEO_EXTENSIONS)})")
    digest = hashlib.sha256("\n".join(listing).encode()).hexdigest()
    return Dataset(source, "folders", index.classes, tuple(samples), digest, source)


def _no_duplicates(samples: list[Sample]) -> None:
    # One file under two spellings (a/../a/x.mp4, ./a/x.mp4, a//x.mp4) is still listed twice.
    first: dict[str, Sample] = {}
    for s in samples:
        key = os.path.normpath(s.path)
        if key in first:
            again = "" if first[key].video == s.video else f" (as {first[key].video})"
            raise DatasetError(f"{s.where}: {s.video} is listed twice{again} (first at {first[key].where})")
        first[key] = s
