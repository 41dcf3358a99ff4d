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
