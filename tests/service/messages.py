"""Builders of raw MQTT payloads, valid by default; tests override fields to break them."""

from __future__ import annotations

import datetime as dt
from typing import Any

from hearth import protocol

TS = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
RECEIVED = TS + dt.timedelta(seconds=1)


def topic(device_id: str, kind: str = "telemetry") -> str:
    return f"{protocol.TOPIC_PREFIX}/{device_id}/{kind}"


def telemetry_dict(device_id: str, seq: int, readings: dict[str, Any] | None = None,
                   **fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "v": 1,
        "device_id": device_id,
        "seq": seq,
        "ts": (TS + dt.timedelta(seconds=seq % 100_000)).isoformat(),
        "readings": {"temperature": 21.5, "heater": False} if readings is None else readings,
    }
    msg.update(fields)
    return msg


def telemetry(device_id: str, seq: int, readings: dict[str, Any] | None = None,
              **fields: Any) -> bytes:
    return protocol.to_wire(telemetry_dict(device_id, seq, readings, **fields))


def event(device_id: str, seq: int, kind: str = "boot", detail: str = "",
          **fields: Any) -> bytes:
    msg: dict[str, Any] = {"v": 1, "device_id": device_id, "seq": seq,
                           "ts": (TS + dt.timedelta(seconds=seq % 100_000)).isoformat(),
                           "kind": kind, "detail": detail}
    msg.update(fields)
    return protocol.to_wire(msg)


def result(device_id: str, command_id: str, seq: int = 1, status: str = "succeeded",
           **fields: Any) -> bytes:
    msg: dict[str, Any] = {"v": 1, "command_id": command_id, "device_id": device_id,
                           "seq": seq, "ts": TS.isoformat(), "status": status}
    msg.update(fields)
    return protocol.to_wire(msg)
