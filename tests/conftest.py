"""Reference fixtures: outputs of the original X3D (facebookresearch/SlowFast) on random weights.

The tiny ones live in tests/fixtures; the X3D-XS ones (tens of MB) are read from the steering repo's
shared/fixtures beside this checkout (or $X3DNET_SHARED) and skipped only where that is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Under pytest-xdist (`make test` runs `-n auto`: a worker per core) each worker, and every x3dnet process
# a test starts, computes on one thread: the workers already fill the cores. On 2 cores the suite took
# 323 s with two threads per worker, 110-162 s with one, and 251-257 s serially (one or two threads).
_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if _WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by OpenMP when torch loads, here and in children

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKER:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from x3dnet import X3DConfig, derive_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED = Path(os.environ.get("X3DNET_SHARED", ROOT.parent / "shared")) / "fixtures"
LAYOUT_FILES = {"slowfast": "slowfast.pyth", "pytorchvideo": "ptv.pyth", "mmaction2": "mmaction2.pth"}
TINY = ("tiny_a", "tiny_b")


def fixture_dir(name: str) -> Path:
    if name in TINY:
        return FIXTURES
    if not (SHARED / f"{name}_io.pt").exists():
        pytest.skip(f"{SHARED} is absent: the {name} reference fixtures live there")
    return SHARED


def checkpoint_path(name: str, layout: str) -> Path:
    return fixture_dir(name) / f"{name}_{LAYOUT_FILES[layout]}"


def reference_io(name: str) -> dict:
    return torch.load(fixture_dir(name) / f"{name}_io.pt", weights_only=True)


def tiny_spec(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def tiny_config(name: str) -> X3DConfig:
    """A tiny reference model's config, derived from its hyper-parameters by the X3D expansion rules."""
    spec = tiny_spec(name)
    return derive_config(
        name, width_factor=spec["width_factor"], depth_factor=spec["depth_factor"],
        bottleneck_factor=spec["bottleneck_factor"], base_width=spec["dim_c1"], head_width=spec["dim_c5"],
        frames=spec["frames"], train_crop=spec["train_crop"], num_classes=spec["num_classes"],
    )


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never read or fill the user's real weights cache from a test.
    monkeypatch.setenv("X3DNET_HOME", str(tmp_path_factory.mktemp("x3dnet_home")))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    # Random inputs and weights in tests are the same on every run: a failure can be reproduced.
    torch.manual_seed(0)
