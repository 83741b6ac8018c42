"""Support periods: until when a model gets security updates (guideline 3, UK PSTI).

The UK PSTI regulations define the *defined support period* as "the minimum length of time,
expressed as a period of time with an end date, for which security updates will be
provided". Each model has one, set by the maker:

* it is defined with an end date in the future (:meth:`SupportPeriod.define`) and published
  (public product page, machine-readable JSON, the consumer's view, the unit itself);
* once published it may be extended but never shortened (:meth:`SupportPeriod.extend`);
* its :meth:`~SupportPeriod.status` is ``supported``, ``ending_soon`` (fewer than 90 days
  left) or ``ended`` (the end date has passed: the model no longer gets security updates,
  and every view says so).

The end date is inclusive: updates are provided until the end of that day (UTC).

Example::

    period = SupportPeriod.define("thermostat", dt.date(2031, 12, 31))
    period.status()                  # SupportStatus.SUPPORTED
    support_document([period])       # the public JSON document
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hearth.errors import ValidationError
from hearth.protocol import MODELS

__all__ = [
    "ENDING_SOON",
    "PSTI_DEFINITION",
    "SupportPeriod",
    "SupportStatus",
    "support_document",
]

ENDING_SOON = dt.timedelta(days=90)
"""Below this much time left, a model's support is ``ending_soon``."""
SUPPORT_FORMAT = 1
MAX_SUPPORT_YEARS = 30
PSTI_DEFINITION = (
    "The defined support period is the minimum length of time, with an end date, for which "
    "security updates will be provided for this model."
)


class SupportStatus(enum.StrEnum):
    SUPPORTED = "supported"
    ENDING_SOON = "ending_soon"
    ENDED = "ended"


def _now(now: dt.datetime | None) -> dt.datetime:
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise ValidationError("invalid_schema", "times must be timezone-aware (UTC)")
    return now.astimezone(dt.UTC)


@dataclass(frozen=True)
class SupportPeriod:
    """A model's published support period. Build it with :meth:`define` (checks the end
    date is in the future) or :meth:`from_json` (a stored, already published period)."""

    model: str
    end_date: dt.date
    published_at: dt.datetime

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValidationError("unknown_model", f"unknown model {self.model!r}")
        if not isinstance(self.end_date, dt.date) or isinstance(self.end_date, dt.datetime):
            raise ValidationError("wrong_type", "end_date must be a date")
        if self.published_at.tzinfo is None:
            raise ValidationError("invalid_schema", "published_at must be timezone-aware")

    @classmethod
    def define(
        cls, model: str, end_date: dt.date, *, now: dt.datetime | None = None
    ) -> SupportPeriod:
        """Define (publish) a support period; the end date must be after today (UTC) and
        within :data:`MAX_SUPPORT_YEARS`. Raises :class:`~hearth.errors.ValidationError`."""
        now = _now(now)
        if not isinstance(end_date, dt.date) or isinstance(end_date, dt.datetime):
            raise ValidationError("wrong_type", "end_date must be a date (YYYY-MM-DD)")
        if end_date <= now.date():
            raise ValidationError("out_of_range", "a support period must end in the future")
        if end_date.year > now.year + MAX_SUPPORT_YEARS:
            raise ValidationError(
                "out_of_range", f"end date more than {MAX_SUPPORT_YEARS} years ahead"
            )
        return cls(model=model, end_date=end_date, published_at=now.replace(microsecond=0))

    def extend(self, end_date: dt.date, *, now: dt.datetime | None = None) -> SupportPeriod:
        """A later end date. A published period may be extended, never shortened."""
        if end_date < self.end_date:
            raise ValidationError(
                "out_of_range", "a published support period cannot be shortened"
            )
        return SupportPeriod.define(self.model, end_date, now=now)

    def days_remaining(self, now: dt.datetime | None = None) -> int:
        """Whole days of support left after today (0 on the last day, negative once ended)."""
        return (self.end_date - _now(now).date()).days

    def status(self, now: dt.datetime | None = None) -> SupportStatus:
        days = self.days_remaining(now)
        if days < 0:
            return SupportStatus.ENDED
        if days < ENDING_SOON.days:
            return SupportStatus.ENDING_SOON
        return SupportStatus.SUPPORTED

    def to_json(self, now: dt.datetime | None = None) -> dict[str, Any]:
        """The machine-readable form served on the public endpoint and shown to consumers."""
        now = _now(now)
        return {
            "format": SUPPORT_FORMAT,
            "model": self.model,
            "end_date": self.end_date.isoformat(),
            "published_at": self.published_at.isoformat(),
            "status": self.status(now).value,
            "days_remaining": max(self.days_remaining(now), 0),
            "security_updates": self.status(now) is not SupportStatus.ENDED,
        }

    @classmethod
    def from_json(cls, obj: object) -> SupportPeriod:
        """Load a stored period (its end date may be past: status then says ``ended``)."""
        if not isinstance(obj, dict):
            raise ValidationError("invalid_schema", "a support period is a JSON object")
        try:
            return cls(
                model=str(obj["model"]),
                end_date=dt.date.fromisoformat(str(obj["end_date"])),
                published_at=dt.datetime.fromisoformat(str(obj["published_at"])),
            )
        except (KeyError, ValueError) as e:
            raise ValidationError("invalid_schema", "malformed support period") from e


def support_document(
    periods: Iterable[SupportPeriod], *, now: dt.datetime | None = None
) -> dict[str, Any]:
    """The public machine-readable document: every model's support period and status."""
    now = _now(now)
    return {
        "format": SUPPORT_FORMAT,
        "generated_at": now.replace(microsecond=0).isoformat(),
        "definition": PSTI_DEFINITION,
        "models": [p.to_json(now) for p in sorted(periods, key=lambda p: p.model)],
    }
