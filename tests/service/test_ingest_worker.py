"""The ingest worker against a real Mosquitto: shared subscription, manual acks, and
nothing lost when the worker dies before its batch is committed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.broker import Broker
from hearth.service.ingest import IngestCore, IngestWorker, counts
from hearth.service.models import TelemetryRow
from hearth.service.mqtt import MqttIdentity, make_client
from tests.helpers import wait_until
from tests.service import messages as m
from tests.service.conftest import Fleet

if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
    pytest.fail("Mosquitto is not installed (apt-get install mosquitto)", pytrace=False)

pytestmark = [pytest.mark.broker, pytest.mark.parametrize("backend", ["sqlite"], indirect=True)]


class UnitClient:
    def __init__(self, broker: Broker, fleet: Fleet, device_id: str) -> None:
        d = fleet.directory / device_id
        identity = MqttIdentity(
            host=broker.connect_host, port=broker.port, username=device_id,
            password=(d / "mqtt.secret").read_text().strip(), client_id=device_id,
            certfile=d / "device.pem", keyfile=d / "device.key", cafile=d / "ca.pem")
        self.device_id = device_id
        self.client = make_client(identity)
        self.client.reconnect()
        self.client.loop_start()

    def publish(self, kind: str, payload: bytes) -> None:
        info = self.client.publish(m.topic(self.device_id, kind), payload, qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _seqs(sf: sessionmaker[Session], device_id: str) -> list[int]:
    with sf() as s:
        return list(s.scalars(sa.select(TelemetryRow.seq).where(TelemetryRow.device_id ==
                                                                device_id)
                              .order_by(TelemetryRow.seq)))


def _count(sf: sessionmaker[Session], device_id: str, reason: str) -> int:
    with sf() as s:
        return counts(s).get((device_id, reason), 0)


def _worker(broker: Broker, sf: sessionmaker[Session], client_id: str) -> IngestWorker:
    worker = IngestWorker(broker.identity("hearth-ingest"), IngestCore(sf, batch_size=10),
                          client_id=client_id, session_expiry=600)
    worker.start()
    wait_until(lambda: worker.subscribed, what="ingest subscriptions")
    return worker


def test_worker_stores_and_quarantines_live_messages(
    broker: Broker, sf: sessionmaker[Session], imported: Fleet
) -> None:
    worker = _worker(broker, sf, "hearth-ingest-t1")
    unit = UnitClient(broker, imported, imported.thermostats[0])
    try:
        for seq in range(1, 6):
            unit.publish("telemetry", m.telemetry(unit.device_id, seq))
        unit.publish("telemetry", b"not json")
        wait_until(lambda: _seqs(sf, unit.device_id) == [1, 2, 3, 4, 5], what="telemetry")
        wait_until(lambda: _count(sf, unit.device_id, "malformed_json") == 1, what="quarantine")
        wait_until(lambda: worker.stats()["acked"] == 6, what="acks after commit")
    finally:
        unit.close()
        worker.stop()


def test_nothing_is_lost_when_the_worker_dies_before_committing(
    broker: Broker, sf: sessionmaker[Session], imported: Fleet
) -> None:
    engine = sf.kw["bind"]
    dbapi = engine.dialect.loaded_dbapi
    down = {"on": False}

    @sa_event.listens_for(engine, "before_cursor_execute")
    def _fail(*_a: Any) -> None:
        if down["on"]:
            raise dbapi.OperationalError("database unavailable")

    worker = _worker(broker, sf, "hearth-ingest-t2")
    unit = UnitClient(broker, imported, imported.thermostats[1])
    try:
        unit.publish("telemetry", m.telemetry(unit.device_id, 1))
        wait_until(lambda: _seqs(sf, unit.device_id) == [1], what="first message")
        down["on"] = True
        unit.publish("telemetry", m.telemetry(unit.device_id, 2))
        unit.publish("telemetry", m.telemetry(unit.device_id, 3))
        wait_until(lambda: worker.stats()["flush_failures"] >= 1, what="failing flushes")
        worker.stop()  # dies with its batch uncommitted: nothing of it was acknowledged
        unit.publish("telemetry", m.telemetry(unit.device_id, 4))  # while no worker runs
        down["on"] = False
        assert _seqs(sf, unit.device_id) == [1]
        worker = _worker(broker, sf, "hearth-ingest-t2")  # same session, redelivery
        wait_until(lambda: _seqs(sf, unit.device_id) == [1, 2, 3, 4], what="redelivered")
        assert _count(sf, unit.device_id, "accepted") == 4
    finally:
        sa_event.remove(engine, "before_cursor_execute", _fail)
        unit.close()
        worker.stop()



def test_command_publisher_delivers_to_the_unit(
    broker: Broker, sf: sessionmaker[Session], imported: Fleet
) -> None:
    from hearth import protocol
    from hearth.service.commands import CommandService, MqttCommandPublisher

    dev = imported.thermostats[2]
    unit = UnitClient(broker, imported, dev)
    received: list[bytes] = []
    subacks: list[object] = []
    unit.client.on_message = lambda _c, _u, msg: received.append(msg.payload)
    unit.client.on_subscribe = lambda _c, _u, _mid, rcs, _p: subacks.append(rcs)
    unit.client.subscribe(protocol.command_topic(dev), qos=1)
    publisher = MqttCommandPublisher(broker.identity("hearth-control"))
    publisher.start()
    try:
        wait_until(lambda: subacks, what="unit subscribed to its command topic")
        CommandService(publisher).send(sf, dev, "set_target", {"target": 19.5})
        wait_until(lambda: received, what="command delivered")
        cmd = protocol.parse_command(received[0], device_id=dev,
                                     model=protocol.MODELS["thermostat"])
        assert cmd.params == {"target": 19.5}
    finally:
        publisher.stop()
        unit.close()
