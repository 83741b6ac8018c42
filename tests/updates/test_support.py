"""Support periods: defined with a future end date, never shortened, status over time."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from hearth.errors import ValidationError
from hearth.updates.support import SupportPeriod, SupportStatus, support_document

NOW = dt.datetime(2026, 1, 15, 12, 0, tzinfo=dt.UTC)


def test_end_date_must_be_in_the_future_when_defined() -> None:
    for end in (NOW.date(), NOW.date() - dt.timedelta(days=1)):
        with pytest.raises(ValidationError) as e:
            SupportPeriod.define("thermostat", end, now=NOW)
        assert e.value.reason == "out_of_range"
    with pytest.raises(ValidationError):
        SupportPeriod.define("thermostat", dt.date(2090, 1, 1), now=NOW)
    with pytest.raises(ValidationError):
        SupportPeriod.define("toaster", dt.date(2030, 1, 1), now=NOW)
    with pytest.raises(ValidationError):
        SupportPeriod.define("lock", dt.datetime(2030, 1, 1), now=NOW)
    with pytest.raises(ValidationError):
        SupportPeriod.define("lock", dt.date(2030, 1, 1), now=dt.datetime(2026, 1, 1))


def test_status_over_time() -> None:
    period = SupportPeriod.define("lock", dt.date(2026, 12, 31), now=NOW)
    assert period.status(NOW) is SupportStatus.SUPPORTED
    assert period.status(dt.datetime(2026, 10, 2, tzinfo=dt.UTC)) is SupportStatus.SUPPORTED
    assert period.status(dt.datetime(2026, 10, 3, tzinfo=dt.UTC)) is SupportStatus.ENDING_SOON
    last_day = dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.UTC)
    assert period.status(last_day) is SupportStatus.ENDING_SOON
    assert period.days_remaining(last_day) == 0
    assert period.status(dt.datetime(2027, 1, 1, tzinfo=dt.UTC)) is SupportStatus.ENDED


def test_can_be_extended_never_shortened() -> None:
    period = SupportPeriod.define("lock", dt.date(2028, 6, 30), now=NOW)
    assert period.extend(dt.date(2029, 6, 30), now=NOW).end_date == dt.date(2029, 6, 30)
    with pytest.raises(ValidationError):
        period.extend(dt.date(2027, 6, 30), now=NOW)


def test_machine_readable_json() -> None:
    period = SupportPeriod.define("thermostat", dt.date(2031, 12, 31), now=NOW)
    doc = support_document([period], now=dt.datetime(2032, 1, 2, tzinfo=dt.UTC))
    json.dumps(doc)
    (entry,) = doc["models"]
    assert entry == {
        "format": 1, "model": "thermostat", "end_date": "2031-12-31",
        "published_at": "2026-01-15T12:00:00+00:00", "status": "ended",
        "days_remaining": 0, "security_updates": False,
    }
    assert "minimum length of time" in doc["definition"]
    assert SupportPeriod.from_json(entry) == period  # a past period still loads
    with pytest.raises(ValidationError):
        SupportPeriod.from_json({"model": "thermostat", "end_date": "soon"})
