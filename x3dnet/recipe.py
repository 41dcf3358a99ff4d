"""The clip recipe a checkpoint was trained for, and the original's test sizes for it (spec section 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    frames: int  # T: frames per clip
    stride: int  # tau: source frames between two sampled frames, counted at target_fps
    train_crop: int
    test_short_side: int  # 1-crop ("10-view") testing: short side -> this, then a centre train_crop
    test_crop: int  # 3-crop ("30-view") testing: short side -> this, three square crops of this size
    target_fps: int = 30
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)  # RGB, in [0, 1] units
    std: tuple[float, float, float] = (0.225, 0.225, 0.225)

    @property
    def clip(self) -> str:
        """The paper's "T x tau" name, e.g. ``"16x5"``."""
        return f"{self.frames}x{self.stride}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# The published configurations (SlowFast configs/Kinetics/X3D_*.yaml); XL's are the paper's, derived.
RECIPES: dict[str, Recipe] = {
    "x3d_xs": Recipe(frames=4, stride=12, train_crop=160, test_short_side=182, test_crop=182),
    "x3d_s": Recipe(frames=13, stride=6, train_crop=160, test_short_side=182, test_crop=182),
    "x3d_m": Recipe(frames=16, stride=5, train_crop=224, test_short_side=256, test_crop=256),
    "x3d_l": Recipe(frames=16, stride=5, train_crop=312, test_short_side=356, test_crop=356),
    "x3d_xl": Recipe(frames=16, stride=5, train_crop=312, test_short_side=356, test_crop=356),
}
