"""The supervised Mosquitto broker against a real Mosquitto: one named test per attack.

Units are minted with :func:`hearth.factory.mint` and connect with the files in their
own flash. Every negative test has a positive control in the same test, so that it fails
if the refusal came from somewhere else (a broken client, a dead broker).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import time
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion

from hearth.errors import BrokerError, ConfigError, NotFoundError, PKIError
from hearth.factory import dynsec_password_hash, load_manifest
from hearth.pki import MakerPKI
from hearth.protocol import MAX_PAYLOAD_BYTES, device_topic
from hearth.service import broker as broker_mod
from hearth.service.broker import (
    ADMIN,
    CONTROL,
    INGEST,
    INGEST_SHARE_GROUP,
    Broker,
    BrokerUnit,
    units_from_manifest,
)
from hearth.service.mqtt import MqttIdentity, make_client
from tests.broker.conftest import (
    Peer,
    PeerFactory,
    Unit,
    World,
    mint_units,
    past,
    raw_tls_context,
)
from tests.helpers import free_port, plain_mqtt_connect, wait_until

pytestmark = pytest.mark.broker

NOT_AUTHORIZED = 135


def telemetry(unit: Unit) -> str:
    return device_topic(unit.device_id, "telemetry")


def cmd(unit: Unit) -> str:
    return device_topic(unit.device_id, "cmd")


def share(kind: str) -> str:
    return f"$share/{INGEST_SHARE_GROUP}/hearth/v1/d/+/{kind}"


def ingest_peer(world: World, connect: PeerFactory) -> Peer:
    peer = connect(world.broker.identity(INGEST), client_id=f"{INGEST}-{os.urandom(4).hex()}")
    for kind in ("telemetry", "event", "cmd/result"):
        assert not peer.subscribe(share(kind))[0].is_failure
    return peer


def control_peer(world: World, connect: PeerFactory) -> Peer:
    return connect(world.broker.identity(CONTROL), client_id=f"{CONTROL}-{os.urandom(4).hex()}")


def send_command(control: Peer, unit: Unit, payload: bytes) -> None:
    assert not control.publish(cmd(unit), payload).is_failure


# --- the happy path ------------------------------------------------------------------------------
def test_unit_publishes_telemetry_and_receives_command(
    shared: World, connect: PeerFactory
) -> None:
    a = shared.units[0]
    ingest = ingest_peer(shared, connect)
    control = control_peer(shared, connect)
    unit = connect(a.identity(shared.broker))
    assert not unit.subscribe(cmd(a))[0].is_failure

    for kind in ("telemetry", "event", "cmd/result"):
        assert not unit.publish(device_topic(a.device_id, kind), f"up-{kind}".encode()).is_failure
    wait_until(lambda: all(ingest.got(f"up-{k}".encode(), device_topic(a.device_id, k))
                           for k in ("telemetry", "event", "cmd/result")),
               what="ingest receives telemetry, event and cmd/result")

    send_command(control, a, b"set_target")
    wait_until(lambda: unit.got(b"set_target", cmd(a)), what="unit receives its command")


def test_unit_payload_limit(shared: World, connect: PeerFactory) -> None:
    """16 KiB payloads pass; a packet over ``max_packet_size`` is refused."""
    u = shared.units[6]
    ingest = ingest_peer(shared, connect)
    unit = connect(u.identity(shared.broker))
    big = b"x" * MAX_PAYLOAD_BYTES
    assert not unit.publish(telemetry(u), big).is_failure
    wait_until(lambda: ingest.got(big), what="a 16 KiB message")
    unit.client.publish(telemetry(u), b"y" * (4 * MAX_PAYLOAD_BYTES), qos=1)
    wait_until(unit.lost.is_set, what="the broker drops the oversized packet's sender")
    assert not ingest.got(b"y" * (4 * MAX_PAYLOAD_BYTES))


# --- who may connect -----------------------------------------------------------------------------
def test_refused_certificate_from_another_ca(
    shared: World, attempt: PeerFactory, tmp_path: Path
) -> None:
    a = shared.units[0]
    other = MakerPKI.create(tmp_path / "other-maker")
    foreign = a.reissue(other, tmp_path / "foreign.pem")
    assert not attempt(a.identity(shared.broker, certfile=foreign)).connected
    # control: the same key, id and password with a certificate of our CA get in
    ours = a.reissue(shared.pki, tmp_path / "ours.pem")
    assert attempt(a.identity(shared.broker, certfile=ours)).connected


def test_refused_expired_certificate(shared: World, attempt: PeerFactory, tmp_path: Path) -> None:
    a = shared.units[0]
    expired = a.reissue(shared.pki, tmp_path / "expired.pem", not_before=past(10),
                        validity=dt.timedelta(days=1))
    assert not attempt(a.identity(shared.broker, certfile=expired)).connected
    fresh = a.reissue(shared.pki, tmp_path / "fresh.pem")
    assert attempt(a.identity(shared.broker, certfile=fresh)).connected


def test_refused_without_client_certificate(shared: World, attempt: PeerFactory) -> None:
    a = shared.units[0]
    ident = a.identity(shared.broker)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=a.device_id, protocol=paho.MQTTv5)
        ctx = raw_tls_context(cafile=ident.cafile, cert=None)
        ctx.maximum_version = version
        client.tls_set_context(ctx)
        client.username_pw_set(a.device_id, a.password)
        client.connect_async(ident.host, ident.port)
        assert not attempt(ident, client=client).connected, version
    assert attempt(ident).connected


def test_refused_plain_tcp(shared: World, attempt: PeerFactory) -> None:
    a = shared.units[0]
    reply = plain_mqtt_connect(shared.broker.connect_host, shared.broker.port)
    assert not reply.startswith(b"\x20"), "the broker answered a plain-TCP CONNECT"
    assert attempt(a.identity(shared.broker)).connected


def test_refused_tls_1_1(shared: World) -> None:
    a = shared.units[0]
    cafile = a.directory / "ca.pem"
    cert = (a.directory / "device.pem", a.directory / "device.key")
    address = (shared.broker.connect_host, shared.broker.port)
    for version in (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1):
        ctx = raw_tls_context(cafile=cafile, cert=cert, max_version=version)
        with socket.create_connection(address, timeout=5) as s, pytest.raises(ssl.SSLError) as e:
            ctx.wrap_socket(s, server_hostname="localhost")
        # the broker's alert, not the client's own refusal to speak old TLS
        assert e.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", e.value
    ctx = raw_tls_context(cafile=cafile, cert=cert, max_version=ssl.TLSVersion.TLSv1_2)
    with socket.create_connection(address, timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="localhost") as t:
        assert t.version() == "TLSv1.2"


def test_refused_weak_tls12_cipher(shared: World) -> None:
    a = shared.units[0]
    ctx = raw_tls_context(cafile=a.directory / "ca.pem",
                          cert=(a.directory / "device.pem", a.directory / "device.key"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA")  # CBC, no AEAD
    address = (shared.broker.connect_host, shared.broker.port)
    with socket.create_connection(address, timeout=5) as s, pytest.raises(ssl.SSLError):
        ctx.wrap_socket(s, server_hostname="localhost")


def test_refused_wrong_password(shared: World, attempt: PeerFactory) -> None:
    u = shared.units[7]
    peer = attempt(u.identity(shared.broker, password=u.password[:-2] + "xx"))
    assert not peer.connected
    assert peer.connack is not None and peer.connack.value == NOT_AUTHORIZED
    assert attempt(u.identity(shared.broker)).connected


def test_refused_client_id_of_another_unit(shared: World, attempt: PeerFactory) -> None:
    a, b = shared.units[0], shared.units[1]
    assert not attempt(a.identity(shared.broker), client_id=b.device_id).connected
    assert not attempt(a.identity(shared.broker), client_id="anything-else").connected
    assert attempt(a.identity(shared.broker)).connected


def test_refused_another_units_username_with_wrong_password(
    shared: World, attempt: PeerFactory
) -> None:
    """A's certificate, B's username and client id, a guessed password: refused."""
    a, b = shared.units[0], shared.units[1]
    guess = a.identity(shared.broker, username=b.device_id, client_id=b.device_id,
                       password=a.password)
    assert not attempt(guess).connected


def test_certificate_of_one_unit_with_another_units_secret_is_refused(
    shared: World, connect: PeerFactory, attempt: PeerFactory
) -> None:
    """The certificate identity is the username (Hearth's identity plugin, ADR 0001):
    A's certificate with B's username, client id *and* B's broker secret is refused, and
    B, connected, keeps its session and its commands."""
    a, b = shared.units[0], shared.units[1]
    victim = connect(b.identity(shared.broker))
    assert not victim.subscribe(cmd(b))[0].is_failure
    stolen = a.identity(shared.broker, username=b.device_id, client_id=b.device_id,
                        password=b.password)
    thief = attempt(stolen)
    assert not thief.connected
    assert thief.connack is not None and thief.connack.value == NOT_AUTHORIZED
    wait_until(lambda: "hearth-identity: refused client " + b.device_id
               in shared.broker.log_path.read_text(errors="replace"),
               what="the identity plugin to log the refusal")
    send_command(control_peer(shared, connect), b, b"after-stolen-secret")
    wait_until(lambda: victim.got(b"after-stolen-secret"), what="B still receives")
    assert victim.connected  # positive control: B's own certificate and secret


def test_service_certificate_with_another_identitys_secret_is_refused(
    shared: World, attempt: PeerFactory
) -> None:
    """The ingest worker's certificate with the admin identity's username and password
    is refused: service identities are bound to their certificates too."""
    ingest, admin = shared.broker.identity(INGEST), shared.broker.identity(ADMIN)
    forged = replace(admin, certfile=ingest.certfile, keyfile=ingest.keyfile)
    peer = attempt(forged)
    assert not peer.connected
    assert peer.connack is not None and peer.connack.value == NOT_AUTHORIZED
    assert attempt(admin).connected  # positive control


def test_service_identity_cannot_take_a_units_client_id(
    shared: World, connect: PeerFactory, attempt: PeerFactory
) -> None:
    """Service identities may use several client ids (one per worker), but only their
    own name or name-suffix: the ingest identity with a unit's client id is refused and
    the unit stays connected."""
    a = shared.units[2]
    victim = connect(a.identity(shared.broker))
    intruder = attempt(shared.broker.identity(INGEST), client_id=a.device_id)
    assert not intruder.connected
    assert intruder.connack is not None and intruder.connack.value == NOT_AUTHORIZED
    for other in ("hearth-ingestx", "hearth-ingest-", "x-hearth-ingest", CONTROL):
        assert not attempt(shared.broker.identity(INGEST), client_id=other).connected
    assert victim.connected
    assert attempt(shared.broker.identity(INGEST), client_id=f"{INGEST}-7").connected


# --- session take-over ---------------------------------------------------------------------------
def test_session_takeover_refused_and_victim_keeps_receiving(
    shared: World, connect: PeerFactory, attempt: PeerFactory
) -> None:
    a, b = shared.units[0], shared.units[1]
    victim = connect(b.identity(shared.broker))
    assert not victim.subscribe(cmd(b))[0].is_failure
    thief = attempt(a.identity(shared.broker), client_id=b.device_id)
    assert not thief.connected
    control = control_peer(shared, connect)
    send_command(control, b, b"after-takeover-attempt")
    wait_until(lambda: victim.got(b"after-takeover-attempt"), what="victim still receives")
    assert victim.connected


# --- what a unit may do --------------------------------------------------------------------------
def test_unit_cannot_publish_to_another_units_telemetry(
    shared: World, connect: PeerFactory
) -> None:
    a, b = shared.units[0], shared.units[1]
    ingest = ingest_peer(shared, connect)
    unit = connect(a.identity(shared.broker))
    assert unit.publish(telemetry(b), b"forged").value == NOT_AUTHORIZED
    assert not unit.publish(telemetry(a), b"control").is_failure
    wait_until(lambda: ingest.got(b"control"), what="the positive control")
    assert not ingest.got(b"forged")


def test_unit_cannot_retain_messages(shared: World, connect: PeerFactory) -> None:
    a = shared.units[0]
    ingest = ingest_peer(shared, connect)
    unit = connect(a.identity(shared.broker))
    unit.client.publish(telemetry(a), b"left-behind", qos=1, retain=True)
    wait_until(lambda: not unit.connected, what="the broker refusing a retained publish")
    control = connect(a.identity(shared.broker))
    assert not control.publish(telemetry(a), b"control").is_failure
    wait_until(lambda: ingest.got(b"control"), what="the positive control")
    assert not ingest.got(b"left-behind")


def test_unit_cannot_subscribe_to_another_units_commands(
    shared: World, connect: PeerFactory
) -> None:
    a, b = shared.units[0], shared.units[1]
    unit = connect(a.identity(shared.broker))
    assert unit.subscribe(cmd(b))[0].value == NOT_AUTHORIZED
    assert unit.subscribe(f"$share/x/{cmd(b)}")[0].value == NOT_AUTHORIZED
    assert unit.subscribe("hearth/v1/d/+/cmd")[0].value == NOT_AUTHORIZED
    assert not unit.subscribe(cmd(a))[0].is_failure
    control = control_peer(shared, connect)
    send_command(control, b, b"for-b")
    send_command(control, a, b"for-a")
    wait_until(lambda: unit.got(b"for-a"), what="the positive control")
    assert not unit.got(b"for-b")


def test_unit_cannot_publish_commands(shared: World, connect: PeerFactory) -> None:
    a, b = shared.units[0], shared.units[1]
    unit_a = connect(a.identity(shared.broker))
    unit_b = connect(b.identity(shared.broker))
    assert not unit_a.subscribe(cmd(a))[0].is_failure
    assert not unit_b.subscribe(cmd(b))[0].is_failure
    assert unit_a.publish(cmd(b), b"forged-for-b").value == NOT_AUTHORIZED
    assert unit_a.publish(cmd(a), b"forged-for-self").value == NOT_AUTHORIZED
    control = control_peer(shared, connect)
    send_command(control, b, b"real-b")
    send_command(control, a, b"real-a")
    wait_until(lambda: unit_a.got(b"real-a") and unit_b.got(b"real-b"),
               what="the positive controls")
    assert not unit_b.got(b"forged-for-b")
    assert not unit_a.got(b"forged-for-self")


def test_unit_cannot_subscribe_to_wildcards_or_control(
    shared: World, connect: PeerFactory
) -> None:
    a = shared.units[0]
    unit = connect(a.identity(shared.broker))
    for topic in ("#", "$CONTROL/#", "$CONTROL/dynamic-security/v1/response", "$SYS/#",
                  "hearth/#", f"hearth/v1/d/{a.device_id}/#", telemetry(a)):
        assert unit.subscribe(topic)[0].value == NOT_AUTHORIZED, topic
    assert not unit.subscribe(cmd(a))[0].is_failure


def test_unit_cannot_use_the_control_api(shared: World, connect: PeerFactory) -> None:
    a, b = shared.units[0], shared.units[1]
    unit = connect(a.identity(shared.broker))
    request = b'{"commands":[{"command":"disableClient","username":"%s"}]}' % (
        b.device_id.encode())
    assert unit.publish("$CONTROL/dynamic-security/v1", request).value == NOT_AUTHORIZED
    victim = connect(b.identity(shared.broker))
    assert victim.connected


# --- service identities --------------------------------------------------------------------------
def test_control_cannot_subscribe_to_telemetry(shared: World, connect: PeerFactory) -> None:
    a = shared.units[0]
    control = control_peer(shared, connect)
    assert control.subscribe("hearth/v1/d/+/telemetry")[0].value == NOT_AUTHORIZED
    assert control.subscribe(share("telemetry"))[0].value == NOT_AUTHORIZED
    assert control.subscribe("#")[0].value == NOT_AUTHORIZED
    ingest = ingest_peer(shared, connect)
    unit = connect(a.identity(shared.broker))
    assert not unit.publish(telemetry(a), b"reading").is_failure
    wait_until(lambda: ingest.got(b"reading"), what="the positive control")
    assert not control.messages


def test_ingest_cannot_publish_commands(shared: World, connect: PeerFactory) -> None:
    a = shared.units[0]
    ingest = ingest_peer(shared, connect)
    unit = connect(a.identity(shared.broker))
    assert not unit.subscribe(cmd(a))[0].is_failure
    assert ingest.publish(cmd(a), b"from-ingest").value == NOT_AUTHORIZED
    assert ingest.publish(telemetry(a), b"ingest-forges").value == NOT_AUTHORIZED
    send_command(control_peer(shared, connect), a, b"from-control")
    wait_until(lambda: unit.got(b"from-control"), what="the positive control")
    assert not unit.got(b"from-ingest")


def test_ingest_only_through_its_shared_subscription(
    shared: World, connect: PeerFactory
) -> None:
    ingest = connect(shared.broker.identity(INGEST), client_id=f"{INGEST}-scope")
    for topic in ("hearth/v1/d/+/telemetry", "$share/other/hearth/v1/d/+/telemetry",
                  f"$share/{INGEST_SHARE_GROUP}/hearth/v1/d/#", share("cmd"), "#"):
        assert ingest.subscribe(topic)[0].value == NOT_AUTHORIZED, topic
    assert not ingest.subscribe(share("telemetry"))[0].is_failure


def test_admin_is_limited_to_the_control_api(shared: World, connect: PeerFactory) -> None:
    a = shared.units[0]
    admin = connect(shared.broker.identity(ADMIN), client_id=f"{ADMIN}-scope")
    assert admin.publish(cmd(a), b"x").value == NOT_AUTHORIZED
    assert admin.subscribe("hearth/v1/d/+/telemetry")[0].value == NOT_AUTHORIZED
    assert not admin.subscribe("$CONTROL/dynamic-security/v1/response")[0].is_failure


def test_identity_repr_hides_password(shared: World) -> None:
    ident = shared.broker.identity(INGEST)
    assert ident.password and ident.password not in repr(ident)
    with pytest.raises(NotFoundError):
        shared.broker.identity("hearth-root")


# --- revocation and quarantine -------------------------------------------------------------------
def test_refused_revoked_certificate(shared: World, attempt: PeerFactory, tmp_path: Path) -> None:
    e = shared.units[4]
    assert attempt(e.identity(shared.broker)).connected
    shared.broker.revoke(e.device_id, e.cert)
    assert not attempt(e.identity(shared.broker)).connected
    # The CRL alone refuses it: lift the plugin's disable and try again ...
    shared.broker.enable_unit(e.device_id)
    assert not attempt(e.identity(shared.broker)).connected
    # ... while a new certificate for the same unit gets in (so it was the CRL).
    reissued = e.reissue(shared.pki, tmp_path / "reissued.pem")
    assert attempt(e.identity(shared.broker, certfile=reissued)).connected


def test_revoked_while_connected_session_is_cut(
    shared: World, connect: PeerFactory, attempt: PeerFactory
) -> None:
    d = shared.units[3]
    unit = connect(d.identity(shared.broker))
    assert not unit.subscribe(cmd(d))[0].is_failure
    start = time.monotonic()
    shared.broker.revoke(d.device_id, d.cert)
    wait_until(unit.lost.is_set, timeout=5.0, what="the revoked unit's session to be cut")
    assert time.monotonic() - start < 5.0
    assert not attempt(d.identity(shared.broker)).connected


def test_revoked_service_certificate_refused(
    shared: World, attempt: PeerFactory, tmp_path: Path
) -> None:
    """The CRL file carries both issuing CAs' lists: a service-CA revocation works too."""
    ident = shared.broker.identity(CONTROL)
    old_cert, old_key = tmp_path / "old.pem", tmp_path / "old.key"
    shutil.copy(ident.certfile, old_cert)
    shutil.copy(ident.keyfile, old_key)
    old = replace(ident, certfile=old_cert, keyfile=old_key, client_id=f"{CONTROL}-old")
    assert attempt(old).connected
    from hearth.pki import cert_from_pem

    shared.pki.revoke(cert_from_pem(old_cert.read_bytes()))
    shared.broker.reload_crl()
    wait_until(lambda: not attempt(old).connected, what="the reloaded CRL to refuse")
    renewed = shared.broker.identity(CONTROL)  # reissued because the old one is revoked
    assert renewed.certfile.read_bytes() != old_cert.read_bytes()
    assert attempt(replace(renewed, client_id=f"{CONTROL}-new")).connected


def test_revoke_checks_the_certificate_belongs_to_the_unit(shared: World) -> None:
    a, b = shared.units[0], shared.units[1]
    with pytest.raises(PKIError):
        shared.broker.revoke(a.device_id, b.cert)
    assert not shared.pki.is_revoked(b.cert)


def test_quarantine_cuts_and_lifts(
    shared: World, connect: PeerFactory, attempt: PeerFactory
) -> None:
    f = shared.units[5]
    unit = connect(f.identity(shared.broker))
    shared.broker.disable_unit(f.device_id)
    wait_until(unit.lost.is_set, timeout=5.0, what="the quarantined unit's session to be cut")
    assert not attempt(f.identity(shared.broker)).connected
    shared.broker.enable_unit(f.device_id)
    assert attempt(f.identity(shared.broker)).connected
    with pytest.raises(NotFoundError):
        shared.broker.disable_unit("0" * 32)


# --- configuration -------------------------------------------------------------------------------
def test_generated_files_are_private_and_hardened(shared: World) -> None:
    d = shared.broker.directory
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    secret_files = [d / "server.key", d / "dynamic-security.json"]
    for name in (ADMIN, INGEST, CONTROL):
        shared.broker.identity(name)
        secret_files += [d / "identities" / name / "client.key",
                         d / "identities" / name / "password"]
    for path in secret_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    conf = (d / "mosquitto.conf").read_text().splitlines()
    for line in ("require_certificate true", "use_identity_as_username false",
                 "allow_anonymous false", "per_listener_settings false",
                 "tls_version tlsv1.2", "set_tcp_nodelay true", "persistence true",
                 f"listener {shared.broker.port} 127.0.0.1"):
        assert line in conf, line
    assert sum(line.startswith("listener ") for line in conf) == 1
    text = "\n".join(conf)
    for name in (ADMIN, INGEST, CONTROL):
        assert shared.broker.identity(name).password not in text
    dynsec = json.loads((d / "dynamic-security.json").read_text())
    assert dynsec["defaultACLAccess"] == {"publishClientSend": False,
                                          "publishClientReceive": False,
                                          "subscribe": False, "unsubscribe": True}


def test_identity_before_start(tmp_path: Path, session_pki: MakerPKI) -> None:
    broker = Broker(tmp_path / "b", session_pki, port=free_port())
    ident = broker.identity(INGEST)
    assert ident.cafile.read_bytes() == session_pki.root_pem()
    assert stat.S_IMODE(ident.keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(broker.directory.stat().st_mode) == 0o700
    assert broker.identity(INGEST).password == ident.password  # stable


def test_unit_and_config_validation(tmp_path: Path, session_pki: MakerPKI) -> None:
    good = dynsec_password_hash("secret")
    BrokerUnit("a" * 32, good)
    with pytest.raises(ConfigError):
        BrokerUnit("A" * 32, good)
    with pytest.raises(ConfigError):
        BrokerUnit("a" * 32, {**good, "password": "not base64!"})  # pragma: allowlist secret
    with pytest.raises(ConfigError):
        BrokerUnit("a" * 32, {**good, "iterations": 0})
    with pytest.raises(ConfigError):
        Broker(tmp_path, session_pki, units=[BrokerUnit("a" * 32, good)] * 2)
    with pytest.raises(ConfigError):
        Broker(tmp_path, session_pki, host="127.0.0.1\nlistener 1883")
    with pytest.raises(ConfigError):
        Broker(tmp_path, session_pki, port=0)


def test_mosquitto_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEARTH_MOSQUITTO", "/nonexistent/mosquitto")
    with pytest.raises(BrokerError):
        broker_mod.mosquitto_path()
    monkeypatch.delenv("HEARTH_MOSQUITTO")
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(os, "access", lambda _p, _m: False)
    with pytest.raises(BrokerError, match="apt-get install mosquitto"):
        broker_mod.mosquitto_path()


def test_start_failure_reports_the_log_and_leaves_nothing_running(
    tmp_path: Path, session_pki: MakerPKI
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        broker = Broker(tmp_path / "broker", session_pki, port=busy.getsockname()[1])
        with pytest.raises(BrokerError, match="Address already in use"):
            broker.start()
    assert broker.pid is None
    broker.stop()


# --- supervision and lifecycle (own brokers) -----------------------------------------------------
def test_supervisor_restarts_killed_mosquitto(own: World, attempt: PeerFactory) -> None:
    a = own.units[0]
    first = own.broker.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: own.broker.restarts == 1 and own.broker.pid not in (None, first),
               what="the supervisor to restart mosquitto")
    wait_until(lambda: attempt(a.identity(own.broker)).connected,
               what="a unit to connect to the restarted broker")


def test_stop_terminates_the_process(own: World, attempt: PeerFactory) -> None:
    pid = own.broker.pid
    assert pid is not None
    own.broker.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert own.broker.pid is None and own.broker.restarts == 0
    own.broker.stop()  # a second stop is harmless
    assert not attempt(own.units[0].identity(own.broker)).connected


def test_context_manager_starts_and_stops(tmp_path: Path, session_pki: MakerPKI) -> None:
    with Broker(tmp_path / "b", session_pki, port=free_port()) as broker:
        pid = broker.pid
        assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_queued_command_survives_broker_restart(
    own: World, connect: PeerFactory, peers: list[Peer]
) -> None:
    a = own.units[0]
    first = connect(a.identity(own.broker), clean_start=False, session_expiry=3600)
    assert not first.subscribe(cmd(a))[0].is_failure
    first.close()
    send_command(control_peer(own, connect), a, b"queued-while-offline")
    own.broker.restart()
    assert own.broker.restarts == 0  # a deliberate restart is not a crash
    again = connect(a.identity(own.broker), clean_start=False, session_expiry=3600)
    wait_until(lambda: again.got(b"queued-while-offline"), what="the queued command")


def test_reload_keeps_offline_sessions_and_refuses_nobody(
    shared: World, connect: PeerFactory
) -> None:
    """On SIGHUP (every CRL reload, every revocation) Mosquitto re-checks every session,
    offline ones too, which have no TLS connection to show a certificate: the identity
    plugin leaves those to dynamic-security (they show theirs when they reconnect), so
    the reload refuses nobody and a command queued for an offline unit is delivered."""
    a = shared.units[2]  # (units 3-5 are revoked or quarantined by other tests)
    first = connect(a.identity(shared.broker), clean_start=False, session_expiry=3600)
    assert not first.subscribe(cmd(a))[0].is_failure
    first.close()
    send_command(control_peer(shared, connect), a, b"queued-across-a-reload")
    log = shared.broker.log_path
    before = log.stat().st_size
    shared.broker.reload_crl()
    again = connect(a.identity(shared.broker), clean_start=False, session_expiry=3600)
    wait_until(lambda: again.got(b"queued-across-a-reload"), what="the queued command")
    with log.open("rb") as f:
        f.seek(before)
        since = f.read().decode("utf-8", "replace")
    assert "Reloading config" in since
    assert "hearth-identity: refused" not in since, since


def test_revoked_unit_stays_disabled_after_restart(
    own: World, attempt: PeerFactory, tmp_path: Path
) -> None:
    a, b = own.units[0], own.units[1]
    own.broker.revoke(b.device_id, b.cert)
    own.broker.restart()
    reissued = b.reissue(own.pki, tmp_path / "b-new.pem")  # passes the CRL
    assert not attempt(b.identity(own.broker, certfile=reissued)).connected
    assert attempt(a.identity(own.broker)).connected
    assert own.broker.units[b.device_id].enabled is False


def test_add_units_live(own: World, connect: PeerFactory, attempt: PeerFactory) -> None:
    (new,) = mint_units(own.pki, own.tmp / "batch-2", 1)
    assert not attempt(new.identity(own.broker)).connected
    own.broker.add_units_live(units_from_manifest(load_manifest(own.tmp / "batch-2")))
    unit = connect(new.identity(own.broker))
    assert not unit.subscribe(cmd(new))[0].is_failure
    assert connect(own.units[0].identity(own.broker)).connected  # the old ones too


def test_expired_crl_is_refreshed(own: World, attempt: PeerFactory) -> None:
    """An expired CRL makes Mosquitto refuse every unit; refresh_crl() re-signs it."""
    a = own.units[0]
    stale = b"".join(
        ca.build_crl([], validity=dt.timedelta(minutes=-1)).public_bytes(
            serialization.Encoding.PEM)
        for ca in (own.pki.device_ca, own.pki.service_ca)
    )
    own.pki.crl_path().write_bytes(stale)
    (own.broker.directory / "crl.pem").write_bytes(stale)
    os.kill(own.broker.pid or 0, signal.SIGHUP)
    wait_until(lambda: not attempt(a.identity(own.broker)).connected,
               what="the expired CRL to refuse units")
    assert own.broker.refresh_crl() is True
    wait_until(lambda: attempt(a.identity(own.broker)).connected,
               what="units to get in with the fresh CRL")
    assert own.broker.refresh_crl() is False


def test_service_client_helper_refuses_unverified_broker(
    shared: World, tmp_path: Path
) -> None:
    """make_client verifies the broker against the maker root: another root fails."""
    other = MakerPKI.create(tmp_path / "other")
    (tmp_path / "other-root.pem").write_bytes(other.root_pem())
    ident: MqttIdentity = replace(shared.broker.identity(INGEST),
                                  cafile=tmp_path / "other-root.pem")
    client = make_client(ident, client_id=f"{INGEST}-verify")
    with pytest.raises(ssl.SSLCertVerificationError):
        client.reconnect()


def test_make_client_validates_its_inputs(shared: World, tmp_path: Path) -> None:
    ident = shared.broker.identity(INGEST)
    with pytest.raises(ConfigError):
        make_client(ident, session_expiry=-1)
    with pytest.raises(ConfigError):
        make_client(replace(ident, keyfile=tmp_path / "missing.key"))
