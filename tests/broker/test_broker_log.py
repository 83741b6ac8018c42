"""Counting what the broker refused, from its log: the line formats of the real Mosquitto
(one refusal of each kind against the shared broker) and the watcher's bookkeeping."""

from __future__ import annotations

import collections
import socket
import ssl
import struct
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from hearth.pki import MakerPKI
from hearth.protocol import device_topic
from hearth.service.broker import INGEST
from hearth.service.broker_log import (
    HOLD_ABORTED,
    HOLD_BEGINS,
    HOLD_ENDS,
    REASONS,
    LogWatch,
    classify,
    mark,
    weight,
)
from tests.broker.conftest import PeerFactory, Unit, World, raw_tls_context
from tests.helpers import plain_mqtt_connect, wait_until

pytestmark = pytest.mark.broker

STAMP = "2026-11-25T23:00:00: "


def test_each_refusal_of_the_real_broker_counts_once_under_its_reason(
    shared: World, attempt: PeerFactory, connect: PeerFactory, tmp_path: Path
) -> None:
    watch = LogWatch(shared.broker.log_path)  # from now on
    seen: collections.Counter[str] = collections.Counter()
    a, b = shared.units[0], shared.units[1]
    host, port = "127.0.0.1", shared.broker.port
    ca = a.identity(shared.broker).cafile

    def handshake(ctx: ssl.SSLContext) -> None:
        with socket.create_connection((host, port), timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=host) as tls:
                    tls.recv(1)  # TLS 1.3: the server's refusal arrives after the handshake
            except (ssl.SSLError, OSError):
                pass

    foreign = a.reissue(MakerPKI.create(tmp_path / "other"), tmp_path / "foreign.pem")
    assert not attempt(a.identity(shared.broker, certfile=foreign)).connected
    handshake(raw_tls_context(cafile=ca, cert=None))
    handshake(raw_tls_context(cafile=ca, cert=None, max_version=ssl.TLSVersion.TLSv1_1))
    plain_mqtt_connect(host, port)
    assert not attempt(a.identity(shared.broker, password=a.password[:-2] + "xx")).connected
    assert not attempt(a.identity(shared.broker, username=b.device_id, client_id=b.device_id,
                                  password=b.password)).connected
    assert not attempt(shared.broker.identity(INGEST), client_id=a.device_id).connected
    # a client id that would write a line of its own into the log (Mosquitto refuses it
    # before anything logs it), a reserved packet type, a SUBSCRIBE that does not parse,
    # and a PUBLISH announcing 100,000 bytes: each after a good CONNECT
    forged = f"x\n{STAMP}{HOLD_BEGINS}"
    assert not attempt(a.identity(shared.broker, username=b.device_id, password=b.password,
                                  client_id=forged)).connected
    # a connected unit on another unit's topics, the broker's control topic, a wildcard
    d = connect(shared.units[3].identity(shared.broker))
    own = device_topic(shared.units[3].device_id, "telemetry")
    assert not d.publish(own, b"{}").is_failure  # its own: not counted
    assert d.publish(device_topic(b.device_id, "telemetry"), b"{}").is_failure
    assert d.subscribe(device_topic(b.device_id, "cmd"))[0].is_failure
    assert d.subscribe("#")[0].is_failure
    assert d.publish("$CONTROL/dynamic-security/v1", b"{}").is_failure
    c = shared.units[2]
    for junk in (bytes([0x00, 0x00]), bytes([0x82, 0x05, 0, 1, 0, 0, 0]),
                 bytes([0x30, 0xA0, 0x8D, 0x06])):
        assert mqtt_session_then(shared, c, junk)[:2] == bytes([0x20, 0x02])  # CONNACK
    expected = {"certificate_refused": 1, "no_certificate": 1, "tls_version_refused": 1,
                "not_tls": 1, "auth_refused": 1, "identity_mismatch": 1,
                "client_id_mismatch": 1, "protocol_error": 3, "oversize_packet": 1,
                "acl_denied": 4}

    def counted() -> bool:
        seen.update(watch.read())
        return all(seen[r] >= n for r, n in expected.items())

    wait_until(counted, timeout=15, what=f"the broker's refusals counted (so far {seen})")
    seen.update(watch.read())
    assert dict(seen) == expected
    assert set(seen) <= set(REASONS)
    assert HOLD_BEGINS not in shared.broker.log_path.read_text()


def mqtt_session_then(world: World, unit: Unit, tail: bytes) -> bytes:
    """CONNECT as ``unit`` (MQTT 3.1.1, its own certificate and password) over raw TLS,
    then send ``tail``; returns the bytes that came back."""

    def field(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    body = (field(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 60) + field(
        unit.device_id.encode()) + field(unit.device_id.encode()) + field(
        unit.password.encode()))
    ctx = raw_tls_context(cafile=unit.directory / "ca.pem",
                          cert=(unit.directory / "device.pem", unit.directory / "device.key"))
    with socket.create_connection(("127.0.0.1", world.broker.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(bytes([0x10, len(body)]) + body)
        back = tls.recv(4)
        tls.sendall(tail)
        try:
            return back + tls.recv(16)
        except OSError:
            return back


@pytest.mark.parametrize(("line", "reason"), [
    ("OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed",
     "certificate_refused"),
    ("OpenSSL Error[0]: error:0A0000C7:SSL routines::peer did not return a certificate",
     "no_certificate"),
    ("OpenSSL Error[0]: error:0A000102:SSL routines::unsupported protocol",
     "tls_version_refused"),
    ("Client connection from 127.0.0.1 failed: error:0A0000C1:SSL routines::no shared "
     "cipher.", "cipher_refused"),
    ("Client connection from 127.0.0.1 failed: error:0A00010B:SSL routines::wrong version "
     "number.", "not_tls"),
    ("OpenSSL Error[0]: error:0A000126:SSL routines::unexpected eof while reading",
     "tls_failed"),
    ("hearth-identity: refused client x from 127.0.0.1: the username is not the "
     "certificate's common name", "identity_mismatch"),
    ("hearth-identity: refused client x from 127.0.0.1: the client id is not the username "
     "or the username and a '-' suffix", "client_id_mismatch"),
    ("Client <unknown> disconnected, not authorised.", "auth_refused"),
    ("Client abc disconnected: Protocol error.", "protocol_error"),
    ("Client <unknown> disconnected due to protocol error.", "protocol_error"),
    ("Client abc disconnected due to malformed packet.", "protocol_error"),
    ("Client abc disconnected due to oversize packet.", "oversize_packet"),
    ("hearth-acl: denied publish by unit " + "a" * 32 + ": not one of its own topics",
     "acl_denied"),
    ("hearth-acl: 1234 more denials were not logged one by one", "acl_denied"),
    ("hearth-acl: many more denials were not logged one by one", None),
    ("New connection from 127.0.0.1:43805 on port 50017.", None),
    ("Client abc disconnected.", None),
    ("Client abc been disconnected by administrative action.", None),
])
def test_classify(line: str, reason: str | None) -> None:
    assert classify(line) == reason
    assert reason is None or reason in REASONS
    assert weight(line) == (1234 if line.startswith("hearth-acl: 1234") else 1)


def test_follow_up_lines_do_not_count_twice_and_partial_lines_wait(tmp_path: Path) -> None:
    log = tmp_path / "mosquitto.log"
    log.write_bytes(f"{STAMP}OpenSSL Error[0]: x certificate verify failed\n".encode())
    watch = LogWatch(log)  # starts at the end: the line above is history
    with log.open("ab") as f:
        f.write(f"{STAMP}OpenSSL Error[0]: x certificate verify failed\n"
                f"{STAMP}Client <unknown> disconnected: Protocol error.\n"
                f"{STAMP}hearth-identity: refused client a from b: the username is not "
                f"the certificate's common name\n"
                f"{STAMP}Client <unknown> disconnected, not authori".encode())
    assert watch.read() == {"certificate_refused": 1, "identity_mismatch": 1}
    with log.open("ab") as f:  # the rest of the follow-up line, then a plain refusal
        f.write(f"sed.\n{STAMP}Client <unknown> disconnected, not authorised.\n"
                f"{STAMP}Client c disconnected: Protocol error.\n".encode())
    assert watch.read() == {"auth_refused": 1, "protocol_error": 1}
    assert watch.read() == {}


def test_a_replaced_or_truncated_log_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "mosquitto.log"
    refusal = f"{STAMP}Client <unknown> disconnected, not authorised.\n".encode()
    log.write_bytes(refusal * 3)
    watch = LogWatch(log, from_start=True)
    assert watch.read() == {"auth_refused": 3}
    log.write_bytes(refusal)  # truncated and rewritten (shorter than what was read)
    assert watch.read() == {"auth_refused": 1}
    replacement = tmp_path / "new.log"
    replacement.write_bytes(refusal * 2)
    replacement.replace(log)  # another file under the same name
    assert watch.read() == {"auth_refused": 2}
    log.unlink()
    assert watch.read() == {}


def test_certificate_failures_while_units_are_held_back_count_apart(tmp_path: Path) -> None:
    """Between the broker's hold markers a certificate failure is ``held_back``; any
    other refusal keeps its reason, and after either kind of end marker (or in a log
    that was replaced) certificate failures are refusals again."""
    log = tmp_path / "mosquitto.log"
    watch = LogWatch(log)
    cert = f"{STAMP}OpenSSL Error[0]: x certificate verify failed\n"
    after = f"{STAMP}Client <unknown> disconnected: Protocol error.\n"
    with log.open("a") as f:
        f.write(cert + after)
    mark(log, HOLD_BEGINS)
    with log.open("a") as f:
        f.write(cert + after + cert + f"{STAMP}Client <unknown> disconnected, not authorised.\n")
    assert watch.read() == {"certificate_refused": 1, "held_back": 2, "auth_refused": 1}
    for end in (HOLD_ENDS, HOLD_ABORTED):
        mark(log, end)
        with log.open("a") as f:
            f.write(cert)
        assert watch.read() == {"certificate_refused": 1}
        mark(log, HOLD_BEGINS)
    log.write_text(cert)  # replaced while holding: a new log starts outside any hold
    assert watch.read() == {"certificate_refused": 1}
    assert "held_back" in REASONS
    mark(log, HOLD_ENDS)
    stamp, _, text = log.read_text().splitlines()[-1].partition(": ")
    assert text == HOLD_ENDS and len(stamp) == len("2026-11-26T01:00:00")


def test_a_flood_of_denied_publishes_is_counted_exactly_with_few_log_lines(
    shared: World, connect: PeerFactory
) -> None:
    """A unit hammering another unit's topic: every denial counts, while the plugin logs
    at most 20 of them one by one per second and reports the rest as a number."""
    watch = LogWatch(shared.broker.log_path)
    start = shared.broker.log_path.stat().st_size
    flood = 500
    peer = connect(shared.units[4].identity(shared.broker))
    peer.stop_loop()
    other = device_topic(shared.units[5].device_id, "telemetry")
    for i in range(flood):
        assert peer.client.publish(other, b"%d" % i, qos=0).rc == paho.MQTT_ERR_SUCCESS
        assert peer.client.loop_write() == paho.MQTT_ERR_SUCCESS
    wait_until(lambda: peer.client.loop_write() == paho.MQTT_ERR_SUCCESS
               and not peer.client.want_write(), what="every publish written")
    seen: collections.Counter[str] = collections.Counter()

    def counted() -> bool:
        seen.update(watch.read())
        return seen["acl_denied"] >= flood

    wait_until(counted, timeout=15, what=f"{flood} denials counted (so far {seen})")
    assert dict(seen) == {"acl_denied": flood}
    with shared.broker.log_path.open("rb") as f:
        f.seek(start)
        lines = [line for line in f.read().decode().splitlines() if "hearth-acl:" in line]
    one_by_one = [line for line in lines if "hearth-acl: denied publish" in line]
    seconds = {line.partition(": ")[0] for line in lines}
    assert 0 < len(one_by_one) <= 20 * (len(seconds) + 1) < flood
    assert len(lines) - len(one_by_one) >= 1  # the rest, as counts
