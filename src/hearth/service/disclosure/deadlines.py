"""Deadlines in working days and calendar days, computed from a report's receipt time.

A promise of "acknowledgement within 5 working days" is kept in the security team's time
zone: the days counted are working weekdays that are not holidays, counting starts on the
first working day *after* the day of receipt, and the deadline is the end of the Nth such
day (midnight local time, returned in UTC). A report that arrives on Friday evening or
during a weekend is therefore due at the end of the following Friday, not earlier.

All functions are pure: they take the time and return the time. Times are aware UTC.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

__all__ = ["Deadlines", "WorkCalendar", "utc_now"]


def utc_now() -> dt.datetime:
    """The real clock (aware UTC). Code takes a ``clock`` callable so tests can freeze it."""
    return dt.datetime.now(dt.UTC)


def _aware(t: dt.datetime) -> dt.datetime:
    if t.tzinfo is None:
        raise ValueError("naive datetime: Hearth times are timezone-aware UTC")
    return t


@dataclass(frozen=True)
class WorkCalendar:
    """Which days the team works: weekdays (Monday = 0) minus holidays, in ``tz``."""

    tz: ZoneInfo
    weekdays: frozenset[int] = frozenset({0, 1, 2, 3, 4})
    holidays: frozenset[dt.date] = frozenset()

    @classmethod
    def of(
        cls, tz: ZoneInfo, weekdays: Iterable[int], holidays: Iterable[dt.date]
    ) -> WorkCalendar:
        wd = frozenset(weekdays)
        if not wd or not wd <= set(range(7)):
            raise ValueError("weekdays must be a non-empty subset of 0..6")
        return cls(tz=tz, weekdays=wd, holidays=frozenset(holidays))

    def is_working_day(self, day: dt.date) -> bool:
        return day.weekday() in self.weekdays and day not in self.holidays

    def end_of_working_days(self, start: dt.datetime, n: int) -> dt.datetime:
        """End (local midnight, as UTC) of the ``n``-th working day after ``start``'s day."""
        if n < 1:
            raise ValueError("n must be at least 1")
        day = _aware(start).astimezone(self.tz).date()
        counted = 0
        # A year of holidays cannot stall this: at least one weekday works each week.
        while counted < n:
            day += dt.timedelta(days=1)
            if self.is_working_day(day):
                counted += 1
        end_local = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=self.tz)
        return end_local.astimezone(dt.UTC)

    def working_days_between(self, start: dt.datetime, end: dt.datetime) -> int:
        """Whole working days strictly after ``start``'s day up to and including ``end``'s."""
        a = _aware(start).astimezone(self.tz).date()
        b = _aware(end).astimezone(self.tz).date()
        count = 0
        while a < b:
            a += dt.timedelta(days=1)
            if self.is_working_day(a):
                count += 1
        return count


@dataclass(frozen=True)
class Deadlines:
    """The promises made to a reporter, computed from when the report arrived."""

    acknowledge_by: dt.datetime
    fix_target: dt.datetime

    @classmethod
    def for_report(
        cls,
        received_at: dt.datetime,
        *,
        calendar: WorkCalendar,
        acknowledge_within_working_days: int,
        fix_target_days: int,
    ) -> Deadlines:
        received_at = _aware(received_at).astimezone(dt.UTC)
        return cls(
            acknowledge_by=calendar.end_of_working_days(
                received_at, acknowledge_within_working_days
            ),
            fix_target=received_at + dt.timedelta(days=fix_target_days),
        )
