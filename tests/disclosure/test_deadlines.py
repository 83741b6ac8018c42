"""Working-day deadlines and the overdue flags."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from hearth.service.disclosure.deadlines import Deadlines, WorkCalendar

UTC = dt.UTC
CAL = WorkCalendar.of(ZoneInfo("UTC"), range(5), [])


def test_five_working_days_skip_the_weekend() -> None:
    monday = dt.datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    # Tue..Fri are days 1-4, the next Monday day 5: due at the end of Monday 9 March
    assert CAL.end_of_working_days(monday, 5) == dt.datetime(2026, 3, 10, tzinfo=UTC)


def test_a_report_on_friday_evening_or_saturday_is_due_the_next_friday() -> None:
    friday = dt.datetime(2026, 3, 6, 22, 0, tzinfo=UTC)
    saturday = dt.datetime(2026, 3, 7, 12, 0, tzinfo=UTC)
    end_of_next_friday = dt.datetime(2026, 3, 14, tzinfo=UTC)
    assert CAL.end_of_working_days(friday, 5) == end_of_next_friday
    assert CAL.end_of_working_days(saturday, 5) == end_of_next_friday


def test_holidays_do_not_count() -> None:
    cal = WorkCalendar.of(ZoneInfo("UTC"), range(5), [dt.date(2026, 3, 3), dt.date(2026, 3, 4)])
    monday = dt.datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    assert cal.end_of_working_days(monday, 5) == dt.datetime(2026, 3, 12, tzinfo=UTC)
    assert cal.working_days_between(monday, dt.datetime(2026, 3, 6, tzinfo=UTC)) == 2


def test_days_are_counted_in_the_teams_time_zone() -> None:
    tokyo = WorkCalendar.of(ZoneInfo("Asia/Tokyo"), range(5), [])
    # Friday 20:00 UTC is already Saturday 05:00 in Tokyo: counting starts Monday
    friday_utc = dt.datetime(2026, 3, 6, 20, 0, tzinfo=UTC)
    due = tokyo.end_of_working_days(friday_utc, 1)
    assert due == dt.datetime(2026, 3, 10, 0, 0, tzinfo=ZoneInfo("Asia/Tokyo")).astimezone(UTC)


def test_report_deadlines() -> None:
    received = dt.datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    d = Deadlines.for_report(received, calendar=CAL, acknowledge_within_working_days=5,
                             fix_target_days=90)
    assert d.acknowledge_by == dt.datetime(2026, 3, 10, tzinfo=UTC)
    assert d.fix_target == received + dt.timedelta(days=90)
