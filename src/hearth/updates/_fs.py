"""File-system errors of the update system (durable writes: :mod:`hearth._fsutil`)."""

from __future__ import annotations

import errno

from hearth.updates.errors import UpdateError, UpdateReason


def os_error(e: OSError, what: str) -> UpdateError:
    """Convert an ``OSError`` into an :class:`UpdateError` (``no_space`` for a full disk)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return UpdateError(UpdateReason.NO_SPACE, f"no space left while {what}")
    return UpdateError(UpdateReason.IO_ERROR, f"{e.strerror or type(e).__name__} while {what}")
