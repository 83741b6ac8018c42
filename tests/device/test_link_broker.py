"""The link against a real Mosquitto over mutual TLS (marker ``broker``).

A minimal broker set up here, independent of the service's broker supervisor: client
certificates required, per-unit passwords, an ACL that confines each unit to its own
topics. A test peer plays the cloud (service client certificate, all device topics).
"""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hearth.device.agent import Agent
from hearth.device.apps import ThermostatApp
from hearth.device.identity import UnitIdentity
from hearth.pki import MakerPKI, cert_to_pem, generate_key, key_to_pem
from hearth.protocol import new_command_id, to_wire
from tests.helpers import free_port, wait_until

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
if not Path(MOSQUITTO).exists() or shutil.which("mosquitto_passwd") is None:
    pytest.fail("Mosquitto is not installed (apt-get install mosquitto)", pytrace=False)

pytestmark = pytest.mark.broker

CLOUD_USER = "hearth-test"
CLOUD_PASSWORD = "cloud-test-password"  # test-only broker  # pragma: allowlist secret


@dataclass
class Mosquitto:
    directory: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.directory / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.directory / "mosquitto.conf")],
            stdout=log, stderr=log,
        )
        log.close()
        wait_until(self._listening, what="mosquitto listening")

    def _listening(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, (self.directory / "mosquitto.log").read_text()
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


def make_broker(
    pki: MakerPKI, directory: Path, units: list[Path], *, hostnames: tuple[str, ...] = (
        "127.0.0.1", "localhost"), server_pki: MakerPKI | None = None,
) -> Mosquitto:
    directory.mkdir(parents=True, exist_ok=True)
    spki = server_pki or pki
    key = generate_key()
    cert = spki.issue_server_cert(key.public_key(), hostnames)
    (directory / "server.pem").write_bytes(cert_to_pem(cert) + cert_to_pem(spki.service_ca.cert))
    (directory / "server.key").write_bytes(key_to_pem(key))
    (directory / "clients-ca.pem").write_bytes(pki.chain_pem())
    passwd = directory / "passwd"
    passwd.touch()
    for user, password in [(CLOUD_USER, CLOUD_PASSWORD)] + [
        (u.name, (u / "mqtt.secret").read_text().strip()) for u in units
    ]:
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
    (directory / "acl").write_text(
        "pattern read hearth/v1/d/%u/cmd\n"
        "pattern write hearth/v1/d/%u/telemetry\n"
        "pattern write hearth/v1/d/%u/event\n"
        "pattern write hearth/v1/d/%u/cmd/result\n"
        f"user {CLOUD_USER}\n"
        "topic readwrite hearth/#\n"
    )
    port = free_port()
    (directory / "mosquitto.conf").write_text(
        "per_listener_settings false\n"
        "allow_anonymous false\n"
        f"password_file {passwd}\n"
        f"acl_file {directory / 'acl'}\n"
        "persistence true\n"
        f"persistence_location {directory}/\n"
        "user root\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
        f"listener {port} 127.0.0.1\n"
        f"cafile {directory / 'clients-ca.pem'}\n"
        f"certfile {directory / 'server.pem'}\n"
        f"keyfile {directory / 'server.key'}\n"
        "require_certificate true\n"
        "tls_version tlsv1.2\n"
    )
    return Mosquitto(directory, port)


@dataclass
class Cloud:
    """A test peer with a service client certificate, collecting device messages."""

    client: paho.Client
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self, suffix: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect_cloud(pki: MakerPKI, broker: Mosquitto, tmp: Path) -> Cloud:
    key = generate_key()
    cert = pki.issue_service_client_cert(CLOUD_USER, key.public_key())
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "c.pem").write_bytes(cert_to_pem(cert))
    (tmp / "c.key").write_bytes(key_to_pem(key))
    ctx = ssl.create_default_context(cafile=str(broker.directory / "clients-ca.pem"))
    ctx.load_cert_chain(tmp / "c.pem", tmp / "c.key")
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"cloud-{free_port()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.tls_set_context(ctx)
    client.username_pw_set(CLOUD_USER, CLOUD_PASSWORD)
    cloud = Cloud(client)
    subscribed = threading.Event()

    def on_message(c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with cloud.lock:
            cloud.messages.append((msg.topic, bytes(msg.payload)))

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, *a: c.subscribe("hearth/v1/d/+/#", qos=1)
    client.reconnect_delay_set(1, 1)  # the test peer may use paho's own reconnect
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600  # keep its queue across a broker restart
    # Mosquitto 2.0.11 persists only sessions that began with clean_start = 0
    client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
    client.loop_start()
    wait_until(subscribed.is_set, what="cloud subscribed")
    return cloud


@pytest.fixture
def units(copy_unit: Callable[..., Path]) -> list[Path]:
    return [copy_unit("thermostat", 0), copy_unit("thermostat", 1)]


@pytest.fixture
def broker(session_pki: MakerPKI, tmp_path: Path, units: list[Path]) -> Iterator[Mosquitto]:
    b = make_broker(session_pki, tmp_path / "broker", units)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def cloud(session_pki: MakerPKI, broker: Mosquitto, tmp_path: Path) -> Iterator[Cloud]:
    c = connect_cloud(session_pki, broker, tmp_path / "cloud")
    yield c
    c.close()


@pytest.fixture
def make_agent(broker: Mosquitto) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(unit: Path, **kw: Any) -> Agent:
        kw = {"telemetry_interval": 3600.0, "backoff_base": 0.05, "backoff_cap": 0.2,
              "mqtt_host": "127.0.0.1", "mqtt_port": broker.port, **kw}
        agent = Agent(UnitIdentity.load(unit), ThermostatApp(tick=0.05), **kw)
        agents.append(agent)
        return agent

    yield make
    for a in agents:
        a.stop()


def seqs(payloads: list[bytes]) -> list[int]:
    import json

    return [json.loads(p)["seq"] for p in payloads]


def test_backlog_is_published_in_order_and_deleted_on_puback(
    units: list[Path], cloud: Cloud, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(units[0], max_inflight=8)
    for _ in range(100):
        agent.enqueue_telemetry()
    agent.start()
    wait_until(lambda: agent.status().queued == 0, what="outbox drained")
    # start() queues one more report at once; every one arrives, in order
    got = seqs(cloud.received("/telemetry"))
    assert got == sorted(got) and set(range(1, 101)) <= set(got)
    assert agent.connected and agent.link.subscribed
    assert agent.status().published >= 100


def test_command_round_trip(
    units: list[Path], cloud: Cloud, make_agent: Callable[..., Agent]
) -> None:
    agent = make_agent(units[0])
    agent.start()
    wait_until(lambda: agent.link.subscribed, what="subscribed")
    cid = new_command_id()
    cmd = {
        "v": 1, "command_id": cid, "device_id": agent.device_id, "name": "set_target",
        "params": {"target": 26.0}, "issued_at": "2024-01-01T00:00:00+00:00",
        "expires_at": "2099-01-01T00:00:00+00:00",
    }
    cloud.client.publish(f"hearth/v1/d/{agent.device_id}/cmd", to_wire(cmd), qos=1)
    results = wait_until(lambda: cloud.received("/cmd/result"), what="command result")
    assert cid.encode() in results[0] and b'"succeeded"' in results[0]
    assert agent.app.readings()["target"] == 26.0


def test_a_unit_cannot_publish_as_another_unit(
    units: list[Path], cloud: Cloud, make_agent: Callable[..., Agent]
) -> None:
    """The broker refuses a unit's message on another unit's topic; the link drops and
    counts it instead of retrying forever (it would block its queue)."""
    agent = make_agent(units[0])
    other = units[1].name
    agent.outbox.put("telemetry", f"hearth/v1/d/{other}/telemetry", lambda s: b"{}")
    agent.enqueue_telemetry()
    agent.start()
    wait_until(lambda: agent.status().queued == 0, what="outbox drained")
    assert agent.status().refused_by_broker == 1
    assert cloud.received(f"{other}/telemetry") == []
    assert len(cloud.received(f"{agent.device_id}/telemetry")) >= 1


def test_broker_restart_loses_nothing_and_backoff_resets(
    units: list[Path], broker: Mosquitto, cloud: Cloud, make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent(units[0], telemetry_interval=0.05, stable_after=0.3)
    agent.start()
    wait_until(lambda: agent.connected, what="connected")
    wait_until(lambda: len(cloud.received("/telemetry")) >= 3, what="telemetry online")
    broker.stop()
    wait_until(lambda: not agent.connected, what="disconnect noticed")
    outage_start = len(agent.connect_attempts)
    wait_until(lambda: len(agent.connect_attempts) >= outage_start + 3, what="retries")
    wait_until(lambda: agent.status().queued >= 5, what="telemetry queued offline")
    wait_until(lambda: agent.link.backoff.attempt >= 3, what="backoff growing")
    assert agent.app.max_gap < 2.0  # type: ignore[attr-defined]
    broker.start()
    wait_until(lambda: agent.connected, what="reconnected")
    wait_until(lambda: agent.link.backoff.attempt == 0, what="backoff reset when stable")
    agent.request_stop()  # stops the telemetry timer; the link keeps draining
    agent.app.stop()
    wait_until(lambda: agent.status().queued == 0, what="backlog drained")
    last = agent.outbox.next_seq - 1
    wait_until(
        lambda: last in seqs(cloud.received("/telemetry")), what="all telemetry at the cloud"
    )
    got = seqs(cloud.received("/telemetry"))
    assert set(got) == set(range(1, last + 1))  # nothing lost across the outage
    assert sorted(set(got)) == sorted(dict.fromkeys(got))  # first arrivals in order
    assert [s for i, s in enumerate(got) if s not in got[:i]] == sorted(set(got))


def _refused(agent: Agent, attempts: int = 3) -> None:
    agent.start()
    wait_until(lambda: len(agent.connect_attempts) >= attempts, what="attempts")
    assert not agent.connected and agent.link.connects == 0


def test_refuses_a_broker_certificate_for_another_host(
    session_pki: MakerPKI, tmp_path: Path, units: list[Path]
) -> None:
    b = make_broker(session_pki, tmp_path / "b", units, hostnames=("broker.example",))
    b.start()
    try:
        agent = Agent(UnitIdentity.load(units[0]), ThermostatApp(), mqtt_host="127.0.0.1",
                      mqtt_port=b.port, backoff_base=0.01, backoff_cap=0.05)
        try:
            _refused(agent)
        finally:
            agent.stop()
    finally:
        b.stop()


def test_refuses_a_broker_from_another_ca(
    session_pki: MakerPKI, tmp_path: Path, units: list[Path]
) -> None:
    rogue = MakerPKI.create(tmp_path / "rogue")
    b = make_broker(session_pki, tmp_path / "b", units, server_pki=rogue)
    b.start()
    try:
        agent = Agent(UnitIdentity.load(units[0]), ThermostatApp(), mqtt_host="127.0.0.1",
                      mqtt_port=b.port, backoff_base=0.01, backoff_cap=0.05)
        try:
            _refused(agent)
        finally:
            agent.stop()
    finally:
        b.stop()


def test_wrong_password_is_refused_and_retried_with_backoff(
    units: list[Path], broker: Mosquitto, make_agent: Callable[..., Agent]
) -> None:
    (units[0] / "mqtt.secret").write_text("not-the-password")
    agent = make_agent(units[0])
    _refused(agent)
    wait_until(lambda: agent.link.backoff.attempt >= 3, what="backoff growing")
