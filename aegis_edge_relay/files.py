"""Atomic file writes for the relay's data directory (temp file, fsync, rename)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

__all__ = ["atomic_write", "ensure_private_dir", "tighten_mode"]


def tighten_mode(path: Path, mode: int) -> int | None:
    """Clear the permission bits of ``path`` that ``mode`` does not grant (never widens);
    returns the old bits if they changed, None if they were tight or the file is absent."""
    try:
        old = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None
    if old & ~mode:
        os.chmod(path, old & mode)
        return old
    return None


def ensure_private_dir(path: Path) -> int | None:
    """Create ``path`` (mode 0700) if it does not exist; tighten it to 0700 if it does.

    Returns the old mode when an existing directory was tightened (the caller logs it)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return tighten_mode(path, 0o700)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    The temp file is created with ``mode`` from the start, so a secret is never readable by
    others, not even for an instant; the directory is fsynced after the rename.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
