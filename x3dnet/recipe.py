"""The clip recipe a checkpoint was trained for, and the original's test sizes for it (spec section 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, require_float, require_int

# Bounds on what a file may ask for. Published recipes are far inside them (X3D-L: 16 frames, 356 px);
# a crafted file asking for 100,000 frames must be refused before it sizes a tensor.
MAX_FRAMES = 256
MAX_SIZE = 2048
MAX_CLIP = 64 * 512 * 512  # frames x side x side of the largest view: 200 MB as float32 RGB

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

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("frames", require_int("frames", self.frames, 1, MAX_FRAMES))
        put("stride", require_int("stride", self.stride, 1, 1000))
        put("train_crop", require_int("train_crop", self.train_crop, 1, MAX_SIZE))
        put("test_short_side", require_int("test_short_side", self.test_short_side, self.train_crop, MAX_SIZE))
        put("test_crop", require_int("test_crop", self.test_crop, 1, MAX_SIZE))
        target_fps = require_float("target_fps", self.target_fps, 0, 1000, open_low=True)
        put("target_fps", int(target_fps) if target_fps.is_integer() else target_fps)
        for name, low, high, open_low in (("mean", 0.0, 1.0, False), ("std", 1e-3, 10.0, False)):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or len(values) != 3:
                raise ConfigError(f"{name}: must be 3 numbers (R, G, B), not {values!r}"[:200])
            put(name, tuple(require_float(f"{name}[{c}]", v, low, high, open_low=open_low)
                            for c, v in enumerate(values)))
        largest = max(self.test_short_side, self.test_crop)
        if self.frames * largest * largest > MAX_CLIP:
            raise ConfigError(f"frames x test size: {self.frames} x {largest}^2 is larger than any clip x3dnet "
                              f"runs ({MAX_CLIP} pixels)")

    @property
    def clip(self) -> str:
        """The paper's "T x tau" name, e.g. ``"16x5"``."""
        return f"{self.frames}x{self.stride}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        if not isinstance(data, dict):
            raise ConfigError(f"a recipe must be an object of fields, not {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ConfigError(f"unknown recipe fields: {', '.join(sorted(map(str, unknown)))[:200]}")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ConfigError(f"the recipe lacks {', '.join(missing)}")
        return cls(**data)


# The published configurations (SlowFast configs/Kinetics/X3D_*.yaml); XL's are the paper's, derived.
RECIPES: dict[str, Recipe] = {
    "x3d_xs": Recipe(frames=4, stride=12, train_crop=160, test_short_side=182, test_crop=182),
    "x3d_s": Recipe(frames=13, stride=6, train_crop=160, test_short_side=182, test_crop=182),
    "x3d_m": Recipe(frames=16, stride=5, train_crop=224, test_short_side=256, test_crop=256),
    "x3d_l": Recipe(frames=16, stride=5, train_crop=312, test_short_side=356, test_crop=356),
    "x3d_xl": Recipe(frames=16, stride=5, train_crop=312, test_short_side=356, test_crop=356),
}
