"""Files a user names: inputs checked before they are opened, outputs written whole, run folders locked.

Every verb reads and writes through these few functions, so that each way a path can be wrong (empty,
missing, a folder, a FIFO that would block forever, a symlink loop, a read-only or full filesystem) is
reported once, the same way, as one line naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import ClassVar

from .errors import X3DNetError


class PathError(X3DNetError):
    """A path that cannot be used as asked: not a regular file, missing, unwritable, locked."""


def input_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` as a regular file that can be opened without blocking, or ``PathError`` saying why not.

    A FIFO, a socket or a device would make a decoder or ``torch.load`` wait forever (or read a stream
    that is not a file); they are refused before anything opens them. ``what`` names the kind of file
    in messages ("video", "checkpoint").
    """
    text = os.fspath(path)
    if text == "":
        raise PathError(f"an empty string was given as the {what}'s path")
    try:
        info = os.stat(text)
    except OSError as e:
        raise PathError(f"{text}: {describe_os_error(e)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise PathError(f"{text}: is a directory, not a {what}")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file")
        raise PathError(f"{text}: is {kind}, not a {what} file")
    return Path(text)


def describe_os_error(e: OSError) -> str:
    """An OS error in the words a user needs ("no such file", "symbolic link loop", "read-only filesystem")."""
    words = {
        errno.ENOENT: "no such file", errno.ELOOP: "a symbolic link loop", errno.EACCES: "permission denied",
        errno.EROFS: "read-only filesystem", errno.ENOSPC: "no space left on the device",
        errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EISDIR: "is a directory",
        errno.ENAMETOOLONG: "the name is too long", errno.EDQUOT: "disk quota exceeded",
    }
    return words.get(e.errno, (e.strerror or str(e)).lower())


def os_error_line(e: OSError) -> str:
    """One line for an ``OSError`` that reached the command line: the path it concerns and the reason."""
    where = e.filename if e.filename is not None else None
    return f"{where}: {describe_os_error(e)}" if where is not None else describe_os_error(e)


def output_file(path: str | os.PathLike[str], *, force: bool = False, what: str = "file") -> Path:
    """``path`` checked as a destination: not a folder, its folder there, not replaced unless ``force``."""
    text = os.fspath(path)
    if text == "":
        raise PathError(f"an empty string was given as the {what}'s path")
    path = Path(text)
    if path.is_dir():
        raise PathError(f"{path}: is a directory; name the {what} to write")
    if not path.parent.is_dir():
        raise PathError(f"{path}: its folder {path.parent} does not exist")
    if (path.exists() or path.is_symlink()) and not force:
        raise PathError(f"{path}: exists already; add --force to replace it")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` only when the block succeeds.

    A crash or a kill during the write leaves ``path`` as it was. The file gets the permissions any new
    file gets (0666 less the umask), not the 0600 of a temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        with suppress(OSError):  # clean-up must never hide the error that stopped the write
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` whole (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_atomic_with(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` and give the result ``path``'s name (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


class FolderLock:
    """An exclusive lock on a run folder, held while the process runs (released when it exits or dies).

    Two processes writing one folder would mix their records and describe each other's results; the
    second is refused with one line. The lock is ``fcntl.flock`` on ``.lock`` inside the folder, so a
    killed process never leaves a stale lock behind.
    """

    _held: ClassVar[set[int]] = set()  # descriptors of the locks this process holds

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            owner = os.read(self.fd, 32).decode(errors="replace").strip()
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PathError(f"{folder}: another x3dnet process{f' (pid {owner})' if owner else ''} is using "
                                "this run folder; wait for it to end, or choose another --out") from None
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        FolderLock._held.add(self.fd)

    def release(self) -> None:
        if self.fd >= 0:
            FolderLock._held.discard(self.fd)
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1

    @classmethod
    def _drop_in_child(cls) -> None:
        # A forked child (a DataLoader worker) inherits the descriptor, and a flock lasts while any copy is
        # open: the lock would outlive a killed run for as long as its workers linger. The child closes its
        # copies (closing, unlike LOCK_UN, leaves the parent's lock in place).
        for fd in cls._held:
            with suppress(OSError):
                os.close(fd)
        cls._held = set()


os.register_at_fork(after_in_child=FolderLock._drop_in_child)
