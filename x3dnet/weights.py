"""The published X3D checkpoints: one record each, with its recipe and what was reported for it.

Files are cached in ``$X3DNET_HOME`` (default ``$XDG_CACHE_HOME/x3dnet``, i.e. ``~/.cache/x3dnet``),
downloaded to a temporary file that is renamed only after it loads strictly into its model.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .checkpoint import load_checkpoint, load_weights
from .errors import CheckpointError, ConfigError, DownloadError
from .model import X3D, get_config
from .paths import atomic_path, describe_os_error
from .recipe import RECIPES, Recipe


@dataclass(frozen=True)
class Reported:
    """An accuracy on Kinetics-400 validation as its source reported it."""

    top1: float
    top5: float | None  # None where the source gives no top-5
    views: str  # clips x crops: "10x1" (centre crop at the training size), "10x3" (3 crops at the test size)
    head_pooling: str  # how the model pooled at test time: "window" (the original) or "global"
    source: str


@dataclass(frozen=True)
class WeightsRecord:
    name: str  # "<model>.<source>"
    model: str
    layout: str  # the checkpoint layout of the published file
    url: str
    recipe: Recipe
    reported: tuple[Reported, ...]
    reported_cost: str  # FLOPs and parameters as the source states them, with its convention
    sha256: str | None = None  # a full digest or a published prefix of it; None where none is published
    note: str = ""

    @property
    def file_name(self) -> str:
        return self.name + Path(self.url).suffix  # unique per record: X3D_M.pyth and x3d_m.pyth would clash


_SF = "https://dl.fbaipublicfiles.com/pyslowfast/x3d_models/"
_PTV = "https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/"
_MM = "https://download.openmmlab.com/mmaction/v1.0/recognition/x3d/facebook/"
_SF_ZOO = "SlowFast MODEL_ZOO.md (10x3: the config files' two-decimal comment)"
_PTV_ZOO = "pytorchvideo MODEL_ZOO.md"
_MM_ZOO = "mmaction2 x3d README (SlowFast weights converted, mmaction2's pipeline)"


def _slowfast(model: str, top1_10: float, top1_30: float, cost: str) -> WeightsRecord:
    return WeightsRecord(
        f"{model}.slowfast", model, "slowfast", f"{_SF}{model}.pyth", RECIPES[model],
        (Reported(top1_10, None, "10x1", "window", _SF_ZOO), Reported(top1_30, None, "10x3", "window", _SF_ZOO)),
        f"{cost} (MODEL_ZOO: multiply-adds at the training crop)",
    )


def _ptv(model: str, top1: float, top5: float, cost: str) -> WeightsRecord:
    size = model.removeprefix("x3d_").upper()
    return WeightsRecord(
        f"{model}.pytorchvideo", model, "pytorchvideo", f"{_PTV}X3D_{size}.pyth", RECIPES[model],
        (Reported(top1, top5, "10x3", "window", _PTV_ZOO),),
        f"{cost} (at the test crop, by a counter ~8% above conv+linear multiply-adds)",
        note="res2's shortcut has no BN in this layout; x3dnet restores it as an exact identity",
    )


def _mmaction2(model: str, file: str, top1_10: float, top1_30: float, sha256: str) -> WeightsRecord:
    return WeightsRecord(
        f"{model}.mmaction2", model, "mmaction2", _MM + file, RECIPES[model],
        (Reported(top1_10, None, "10x1", "global", _MM_ZOO), Reported(top1_30, None, "10x3", "global", _MM_ZOO)),
        "converted from the SlowFast file", sha256=sha256,
        note="mmaction2 reports these with global pooling at test time; x3dnet defaults to the original's windows",
    )


WEIGHTS: dict[str, WeightsRecord] = {
    r.name: r
    for r in (
        _slowfast("x3d_xs", 68.7, 69.46, "0.60 GFLOPs, 3.8M params"),
        _slowfast("x3d_s", 73.1, 73.50, "1.96 GFLOPs, 3.8M params"),
        _slowfast("x3d_m", 75.1, 76.21, "4.73 GFLOPs, 3.8M params"),
        _slowfast("x3d_l", 76.9, 77.48, "18.37 GFLOPs, 6.2M params"),
        _ptv("x3d_xs", 69.12, 88.63, "0.91 GFLOPs x 30 views, 3.79M params"),
        _ptv("x3d_s", 73.33, 91.27, "2.96 GFLOPs x 30 views, 3.79M params"),
        _ptv("x3d_m", 75.94, 92.72, "6.72 GFLOPs x 30 views, 3.79M params"),
        _ptv("x3d_l", 77.44, 93.31, "26.64 GFLOPs x 30 views, 6.15M params"),
        # mmaction2 names its files with the first 8 hex digits of their sha256.
        _mmaction2("x3d_s", "x3d_s_13x6x1_facebook-kinetics400-rgb_20201027-623825a0.pth", 73.2, 73.3, "623825a0"),
        _mmaction2("x3d_m", "x3d_m_16x5x1_facebook-kinetics400-rgb_20201027-3f42382a.pth", 75.2, 76.4, "3f42382a"),
    )
}


def get_weights(name: str) -> WeightsRecord:
    """A record by name (``"x3d_m.pytorchvideo"``); a bare model name gives its SlowFast original."""
    if name in WEIGHTS:
        return WEIGHTS[name]
    try:
        model = get_config(name).name
    except ConfigError:
        model = None
    if model is not None and f"{model}.slowfast" in WEIGHTS:
        return WEIGHTS[f"{model}.slowfast"]
    raise CheckpointError(f"{name}: no published weights of that name (see `x3dnet weights list`)")


def cache_dir() -> Path:
    if "X3DNET_HOME" in os.environ:
        return Path(os.environ["X3DNET_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "x3dnet"


def cached_path(record: WeightsRecord) -> Path:
    return cache_dir() / record.file_name


def resolve_weights(weights: str | os.PathLike[str]) -> Path:
    """A path to a checkpoint: an existing file as it is, or a published record's cached file
    (downloaded when missing)."""
    if os.fspath(weights) == "":
        raise CheckpointError("an empty string was given as the weights")
    path = Path(weights)
    if path.exists():
        return path
    try:
        record = get_weights(str(weights))
    except CheckpointError:
        raise CheckpointError(f"{weights}: no such file, and no published weights of that name") from None
    return download_weights(record)


def download_weights(record: WeightsRecord | str, *, force: bool = False, progress: bool = True) -> Path:
    """Download a record's file into the cache unless it is there already; return its path."""
    record = get_weights(record) if isinstance(record, str) else record
    dest = cached_path(record)
    if dest.exists() and not force:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"the weights cache {dest.parent} (X3DNET_HOME) cannot be made: "
                          f"{describe_os_error(e)}") from None
    with atomic_path(dest) as tmp:  # renamed into the cache only once it loads strictly into its model
        with open(tmp, "wb") as out:
            digest = _fetch(record, out, progress=progress)
        if record.sha256 is not None and not digest.startswith(record.sha256):
            raise DownloadError(f"{record.name}: downloaded file has sha256 {digest[:16]}..., expected {record.sha256}")
        try:
            load_weights(X3D(get_config(record.model)), load_checkpoint(tmp))
        except CheckpointError as e:
            raise DownloadError(f"{record.name}: the file from {record.url} is not {record.model}: {e}") from None
    return dest


def _fetch(record: WeightsRecord, out, *, progress: bool) -> str:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(record.url, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=record.name,
                      disable=not progress, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:  # the server answered, with an error
        raise DownloadError(f"{record.name}: cannot download {record.url} (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DownloadError(
            f"{record.name}: cannot download {record.url} ({_reason(e)}); offline? "
            f"Put the file at {cached_path(record)} or pass its path as weights"
        ) from None
    if total is not None and received != total:
        raise DownloadError(
            f"{record.name}: download from {record.url} stopped after {received} of {total} bytes"
        )
    return digest.hexdigest()


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", error)  # URLError wraps the socket error
    return str(reason) or type(reason).__name__
