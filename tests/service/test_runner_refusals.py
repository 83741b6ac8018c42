"""`hearth up` turns the broker's log into refusal counts: nothing is lost when the
database write fails, nothing is counted twice when it succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from hearth.service import db, runner
from hearth.service.broker_log import LogWatch
from hearth.service.config import Settings
from hearth.service.models import BrokerRefusal

REFUSAL = b"2026-11-25T23:00:00: Client <unknown> disconnected, not authorised.\n"


def test_counts_survive_a_failed_write_and_are_recorded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = runner.Stack(Settings(data_dir=tmp_path / "data"))
    db.migrate(stack.engine)
    log = tmp_path / "mosquitto.log"
    log.write_bytes(REFUSAL * 2)
    stack.broker_log = LogWatch(log, from_start=True)

    def stored() -> dict[str, int]:
        with stack.session_factory() as s:
            return {r.reason: r.count for r in s.scalars(sa.select(BrokerRefusal))}

    def broken(*_a: object) -> None:
        raise sa.exc.OperationalError("INSERT", {}, Exception("database is away"))

    real = runner.record_refusals
    monkeypatch.setattr(runner, "record_refusals", broken)
    with pytest.raises(sa.exc.OperationalError):
        stack.count_broker_refusals()
    with log.open("ab") as f:
        f.write(REFUSAL)
    monkeypatch.setattr(runner, "record_refusals", real)
    stack.count_broker_refusals()
    assert stored() == {"auth_refused": 3}
    stack.count_broker_refusals()  # nothing new
    assert stored() == {"auth_refused": 3}
    stack.engine.dispose()
