"""Validation of untrusted vulnerability reports, messages and attachments (no I/O).

Everything a reporter sends is checked here by type, size and content before it touches
the database; every refusal raises :class:`IntakeError` with a stable ``reason`` (one of
:class:`IntakeReason`) and the ``field`` at fault, and the route counts it
(:class:`RejectionCounter`). Attachments are accepted by what their bytes are (magic
numbers), never by the name or type the client claims, and only as plain text, PDF, PNG
or JPEG; they are always served back as downloads (see ``routes``).

Example::

    sub = validate_report({"title": "...", "description": "..."}, [], limits=cfg.limits,
                          models=("thermostat", "lock"))
"""

from __future__ import annotations

import enum
import hashlib
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hearth.errors import ValidationError
from hearth.service.disclosure.config import IntakeLimits

__all__ = [
    "REPORT_FIELDS",
    "Attachment",
    "IntakeError",
    "IntakeReason",
    "RawAttachment",
    "RejectionCounter",
    "ReportSubmission",
    "safe_filename",
    "sniff_content_type",
    "validate_message",
    "validate_report",
]


class IntakeReason(enum.StrEnum):
    """Stable reason codes for refused disclosure input (counted per reason)."""

    REQUEST_TOO_LARGE = "request_too_large"
    MALFORMED_JSON = "malformed_json"
    MALFORMED_FORM = "malformed_form"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    FIELD_TOO_LONG = "field_too_long"
    FIELD_TOO_SHORT = "field_too_short"
    CONTROL_CHARACTERS = "control_characters"
    INVALID_EMAIL = "invalid_email"
    UNKNOWN_MODEL = "unknown_model"
    TOO_MANY_ATTACHMENTS = "too_many_attachments"
    ATTACHMENT_TOO_LARGE = "attachment_too_large"
    ATTACHMENT_EMPTY = "attachment_empty"
    ATTACHMENT_TYPE_REFUSED = "attachment_type_refused"
    RATE_LIMITED = "rate_limited"
    SPAM_SUSPECTED = "spam_suspected"
    FORM_TOO_FAST = "form_too_fast"
    FORM_EXPIRED = "form_expired"
    BAD_FORM_TOKEN = "bad_form_token"  # noqa: S105 - a reason code, not a secret
    POW_REQUIRED = "pow_required"
    POW_INVALID = "pow_invalid"
    CHALLENGE_EXPIRED = "challenge_expired"
    CHALLENGE_REUSED = "challenge_reused"
    CSRF_FAILED = "csrf_failed"


class IntakeError(ValidationError):
    """Refused input: ``reason`` (stable code), ``field`` (or ``None``), ``detail`` (text)."""

    def __init__(self, reason: IntakeReason, detail: str, *, field: str | None = None) -> None:
        super().__init__(reason.value, detail)
        self.field = field

    def as_json(self) -> dict[str, Any]:
        return {"error": self.reason, "field": self.field, "detail": self.detail}


class RejectionCounter:
    """Thread-safe count of refusals per reason (exposed to the security team)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._counts.items()))

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


@dataclass(frozen=True)
class RawAttachment:
    """An upload as received: the client's file name and bytes (its claimed type is ignored)."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes
    sha256: str


@dataclass(frozen=True)
class ReportSubmission:
    title: str
    description: str
    model: str | None
    version: str
    reporter_name: str
    reporter_email: str
    wants_credit: bool
    attachments: tuple[Attachment, ...] = field(default=())


REPORT_FIELDS = frozenset(
    {"title", "description", "model", "version", "reporter_name", "reporter_email",
     "wants_credit"}
)
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+\Z"
)
# Bidirectional-override and isolate characters can make text read differently from
# what it is ("Trojan Source"); refused with the C0/C1 controls.
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _text(
    data: Mapping[str, Any], name: str, *, max_chars: int, required: bool, multiline: bool,
    min_chars: int = 0,
) -> str:
    value = data.get(name)
    if value is None or value == "":
        if required:
            raise IntakeError(IntakeReason.MISSING_FIELD, f"{name} is required", field=name)
        return ""
    if not isinstance(value, str):
        raise IntakeError(IntakeReason.WRONG_TYPE, f"{name} must be text", field=name)
    if len(value) > max_chars:
        raise IntakeError(
            IntakeReason.FIELD_TOO_LONG, f"{name} is longer than {max_chars} characters",
            field=name,
        )
    value = value.replace("\r\n", "\n").replace("\r", "\n")
    allowed = "\n\t" if multiline else ""
    for ch in value:
        if ch in _BIDI or (unicodedata.category(ch) == "Cc" and ch not in allowed):
            raise IntakeError(
                IntakeReason.CONTROL_CHARACTERS,
                f"{name} contains control or text-direction characters", field=name,
            )
    value = value.strip()
    if required and len(value) < max(1, min_chars):
        raise IntakeError(
            IntakeReason.FIELD_TOO_SHORT, f"{name} needs at least {max(1, min_chars)} characters",
            field=name,
        )
    return value


def validate_report(
    data: Mapping[str, Any],
    attachments: Sequence[RawAttachment],
    *,
    limits: IntakeLimits,
    models: Iterable[str],
) -> ReportSubmission:
    """Check a report's fields and attachments; raises :class:`IntakeError`."""
    unknown = set(data) - REPORT_FIELDS
    if unknown:
        raise IntakeError(
            IntakeReason.UNKNOWN_FIELD, f"unknown field {sorted(unknown)[0]!r}",
            field=sorted(unknown)[0],
        )
    title = _text(data, "title", max_chars=limits.max_title_chars, required=True,
                  multiline=False, min_chars=5)
    description = _text(data, "description", max_chars=limits.max_text_chars, required=True,
                        multiline=True, min_chars=20)
    model_raw = _text(data, "model", max_chars=limits.max_short_chars, required=False,
                      multiline=False)
    model: str | None = model_raw or None
    if model is not None and model not in set(models):
        raise IntakeError(IntakeReason.UNKNOWN_MODEL, "model is not one of our products",
                          field="model")
    version = _text(data, "version", max_chars=limits.max_short_chars, required=False,
                    multiline=False)
    name = _text(data, "reporter_name", max_chars=limits.max_short_chars, required=False,
                 multiline=False)
    email = _text(data, "reporter_email", max_chars=254, required=False, multiline=False)
    if email and not _EMAIL.match(email):
        raise IntakeError(IntakeReason.INVALID_EMAIL, "reporter_email is not an e-mail address",
                          field="reporter_email")
    credit = data.get("wants_credit", False)
    if isinstance(credit, str) and credit in ("on", "true", "1", ""):
        credit = credit != ""
    if not isinstance(credit, bool):
        raise IntakeError(IntakeReason.WRONG_TYPE, "wants_credit must be true or false",
                          field="wants_credit")
    return ReportSubmission(
        title=title,
        description=description,
        model=model,
        version=version,
        reporter_name=name,
        reporter_email=email,
        wants_credit=credit,
        attachments=validate_attachments(attachments, limits=limits),
    )


def validate_message(data: Mapping[str, Any], *, limits: IntakeLimits) -> str:
    """A message body from a reporter or the team; raises :class:`IntakeError`."""
    unknown = set(data) - {"body", "visibility"}
    if unknown:
        raise IntakeError(IntakeReason.UNKNOWN_FIELD, f"unknown field {sorted(unknown)[0]!r}",
                          field=sorted(unknown)[0])
    return _text(data, "body", max_chars=limits.max_text_chars, required=True, multiline=True)


def validate_attachments(
    attachments: Sequence[RawAttachment], *, limits: IntakeLimits
) -> tuple[Attachment, ...]:
    if len(attachments) > limits.max_attachments:
        raise IntakeError(
            IntakeReason.TOO_MANY_ATTACHMENTS, f"at most {limits.max_attachments} attachments",
            field="attachments",
        )
    out: list[Attachment] = []
    for raw in attachments:
        if not raw.data:
            raise IntakeError(IntakeReason.ATTACHMENT_EMPTY, "an attachment is empty",
                              field="attachments")
        if len(raw.data) > limits.max_attachment_bytes:
            raise IntakeError(
                IntakeReason.ATTACHMENT_TOO_LARGE,
                f"an attachment is larger than {limits.max_attachment_bytes} bytes",
                field="attachments",
            )
        ctype = sniff_content_type(raw.data)
        if ctype is None or ctype not in limits.attachment_types:
            raise IntakeError(
                IntakeReason.ATTACHMENT_TYPE_REFUSED,
                "attachments must be plain text (UTF-8), PDF, PNG or JPEG",
                field="attachments",
            )
        out.append(
            Attachment(
                filename=safe_filename(raw.filename, ctype),
                content_type=ctype,
                data=raw.data,
                sha256=hashlib.sha256(raw.data).hexdigest(),
            )
        )
    return tuple(out)


_EXT = {"text/plain": ".txt", "application/pdf": ".pdf", "image/png": ".png",
        "image/jpeg": ".jpg"}


def sniff_content_type(data: bytes) -> str | None:
    """The type of ``data`` by its magic bytes: PNG, JPEG, PDF, or UTF-8 text; else None.

    Text must decode as UTF-8 and contain no NUL or other control bytes besides tab,
    newline, carriage return and form feed, so binaries and polyglots are refused.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n\r\f" for c in text):
        return None
    return "text/plain"


def safe_filename(name: str, content_type: str) -> str:
    """A harmless download name: the client's stem in ``[A-Za-z0-9._-]``, our extension."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_.")[:60] or "attachment"
    return stem + _EXT.get(content_type, ".bin")
