"""Small file-system helpers shared by the data pipeline and the checkpoints: atomic writes, free
space, and writes the storage refuses (a full disk, a quota, a failing device) as one clear line."""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager, suppress
from pathlib import Path

# What a write can meet that no retry fixes: the storage is full, over quota, or failing.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


class DiskError(OSError):
    """A write the storage refused; the message is one line naming the file or folder, `reason`
    the system's words (e.g. "No space left on device")."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def disk_error_reason(error: BaseException | None) -> str | None:
    """The system's words if `error` (or an exception it was raised from) is a write the storage
    refused, else None. torch.save reports these as a plain RuntimeError carrying only the words."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskError):
            return error.reason
        if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
            return os.strerror(error.errno)
        if type(error) is RuntimeError:
            for code in DISK_ERRNOS:
                if os.strerror(code) in str(error):
                    return os.strerror(code)
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def disk_errors_named(where: str | os.PathLike):
    """Raise a write the storage refuses inside the block as a DiskError naming `where`."""
    try:
        yield
    except DiskError:
        raise
    except Exception as e:
        reason = disk_error_reason(e)
        if reason is None:
            raise
        raise DiskError(f"{os.fspath(where)}: {reason}", reason) from e


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text or bytes whole or not at all: a kill leaves the old file or none, never half;
    a failed write leaves no temporary file behind."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with disk_errors_named(path), open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system of `folder` (or of its
    nearest existing ancestor, for a folder not made yet)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def folder_bytes(folder: str | os.PathLike) -> int:
    """What the files under `folder` take on its file system (allocated blocks; at least their size)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with suppress(FileNotFoundError):
                stat = os.stat(os.path.join(root, name))
                total += max(stat.st_size, stat.st_blocks * 512)
    return total


def human_bytes(count: float) -> str:
    """1234567 -> "1.2 MB" (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
