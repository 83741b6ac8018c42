"""Small file-system helpers: durable atomic writes and secret files (mode 0600)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Step", "atomic_write", "fsync_dir", "read_json", "write_json", "write_secret"]

Step = Callable[[str], None]
"""A hook called with the name of a step just completed (tests use it to crash there)."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes, *, mode: int = 0o644, on_step: Step | None = None, step: str = ""
) -> None:
    """Write ``data`` to ``path`` atomically and durably: temp file in the same directory,
    fsync, rename, fsync the directory - after a crash ``path`` holds either the old or the
    new bytes. ``on_step`` is called with ``f"{step}:temp-written"`` before the rename.

    The file is created with ``mode`` from the start, so a secret is never briefly
    readable by others.
    """
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


def write_secret(path: Path, data: bytes) -> None:
    """Write a private key or other secret with mode 0600."""
    atomic_write(path, data, mode=0o600)


def write_json(path: Path, obj: Any, *, mode: int = 0o644) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode=mode)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
