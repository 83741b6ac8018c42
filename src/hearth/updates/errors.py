"""Errors of the update system: one class, :class:`UpdateError`, with a stable reason code.

::

    HearthError
    └── UpdateError      an update could not be published, fetched, verified or installed;
                         ``reason`` is an :class:`UpdateReason` (stable, machine-readable)

Foreign exceptions (python-tuf's ``RepositoryError``/``DownloadError`` families, ``OSError``)
are converted at the boundary with ``raise ... from e`` so callers only catch
:class:`~hearth.errors.HearthError`.
"""

from __future__ import annotations

import enum

from hearth.errors import HearthError

__all__ = ["UpdateError", "UpdateReason"]


class UpdateReason(enum.StrEnum):
    """Why an update step was refused. These codes are reported to the service."""

    # -- TUF metadata ------------------------------------------------------------------------
    BAD_SIGNATURE = "bad_signature"
    """Metadata unsigned, signed by a key the delegating role does not list, or below the
    role's threshold."""
    METADATA_ROLLBACK = "metadata_rollback"
    """Metadata older than what the unit already trusts (or inconsistent versions)."""
    EXPIRED_METADATA = "expired_metadata"
    """Metadata past its expiry: a freeze attack or a repository that stopped re-signing."""
    HASH_MISMATCH = "hash_mismatch"
    """A file's length or hashes differ from the signed metadata (tampering, mix-and-match)."""
    TOO_LARGE = "too_large"
    """More bytes than the signed length (or a hard limit) allow."""
    DOWNLOAD_FAILED = "download_failed"
    REPOSITORY_ERROR = "repository_error"
    """Any other invalid metadata."""
    BAD_ROOT = "bad_root"
    THRESHOLD_NOT_MET = "threshold_not_met"
    # -- release selection ---------------------------------------------------------------------
    NOT_FOUND = "not_found"
    WRONG_MODEL = "wrong_model"
    NOT_NEWER = "not_newer"
    """The offered bundle is not newer than the installed version (rollback refused)."""
    MIN_FROM_VERSION = "min_from_version"
    """The installed version is older than the bundle's minimum version to update from."""
    BAD_TARGET_INFO = "bad_target_info"
    CONFLICT = "conflict"
    # -- bundles, slots, boot ----------------------------------------------------------------
    BAD_BUNDLE = "bad_bundle"
    TAMPERED = "tampered"
    SLOT_BUSY = "slot_busy"
    NO_SPACE = "no_space"
    IO_ERROR = "io_error"
    NOT_PROVISIONED = "not_provisioned"


class UpdateError(HearthError):
    """An update step was refused or failed; ``reason`` says why, ``detail`` explains."""

    def __init__(self, reason: UpdateReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
