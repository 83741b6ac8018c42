"""File-system helpers for the update system: durable, atomic writes with named steps."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hearth.updates.errors import UpdateError, UpdateReason

Step = Callable[[str], None]
"""A hook called with the name of a step just completed (tests use it to crash there)."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(
    path: Path, data: bytes, *, mode: int = 0o644, on_step: Step | None = None, step: str = ""
) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, rename it over ``path`` and
    fsync the directory: after a crash ``path`` holds either the old or the new bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if on_step is not None:
            on_step(f"{step}:temp-written")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def os_error(e: OSError, what: str) -> UpdateError:
    """Convert an ``OSError`` into an :class:`UpdateError` (``no_space`` for a full disk)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return UpdateError(UpdateReason.NO_SPACE, f"no space left while {what}")
    return UpdateError(UpdateReason.IO_ERROR, f"{e.strerror or type(e).__name__} while {what}")
