"""Errors a user can cause. The CLI prints their message as one line and exits non-zero."""


class X3DNetError(Exception):
    """Base of every error caused by input (a file, a name, a flag), not by a bug."""


class CheckpointError(X3DNetError, ValueError):
    """A checkpoint file that cannot be read, is not an X3D, or does not fit the model."""


class DownloadError(X3DNetError):
    """Published weights that could not be fetched or did not check out."""


class ConfigError(X3DNetError, ValueError):
    """An unknown model name or an impossible config."""


class VideoError(X3DNetError):
    """A video that cannot be read: missing, not a video, no video stream, no frames, undecodable."""


class BackendError(X3DNetError):
    """An inference engine that is not installed, cannot run here, or disagrees with eager PyTorch."""


class FieldError(ConfigError):
    """A config or recipe field of the wrong type or out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


def require_int(field: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in [low, high] (an integral float such as YAML's ``16.0`` counts), else ``FieldError``."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FieldError(field, f"must be an integer from {low} to {high}, not {value!r}"[:200])
    return value


def require_float(field: str, value: object, low: float, high: float, *, open_low: bool = False) -> float:
    """``value`` as a finite float in [low, high] (or (low, high] with ``open_low``), else ``FieldError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if ok and open_low and value == low:
        ok = False
    if not ok:  # NaN fails every comparison, and so lands here
        span = f"{'above' if open_low else 'from'} {low:g} {'up ' if open_low else ''}to {high:g}"
        raise FieldError(field, f"must be a number {span}, not {value!r}"[:200])
    return float(value)


def require_ints(field: str, value: object, length: int, low: int, high: int) -> tuple[int, ...]:
    """``value`` as a tuple of ``length`` ints in [low, high]."""
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise FieldError(field, f"must be a list of {length} integers, not {value!r}"[:200])
    return tuple(require_int(f"{field}[{i}]", v, low, high) for i, v in enumerate(value))
