"""Fixtures for the broker tests: minted units, a real Mosquitto, a small test client.

Every broker here is a real Mosquitto 2 on a free port in a temporary directory. The
module-scoped ``shared`` broker serves the tests that do not change it; tests that
restart, kill or stop a broker start their own.
"""

from __future__ import annotations

import datetime as dt
import shutil
import ssl
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from paho.mqtt.reasoncodes import ReasonCode

from hearth.factory import load_manifest, mint
from hearth.pki import MakerPKI, cert_from_pem, cert_to_pem, key_from_pem
from hearth.service.broker import Broker, units_from_manifest
from hearth.service.mqtt import MqttIdentity, make_client
from tests.helpers import free_port, wait_until

if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
    pytest.fail("Mosquitto is not installed (apt-get install mosquitto)", pytrace=False)


@dataclass(frozen=True)
class Unit:
    """A minted unit's flash, as the unit itself would read it."""

    device_id: str
    directory: Path

    @property
    def password(self) -> str:
        return (self.directory / "mqtt.secret").read_text().strip()

    @property
    def cert(self) -> x509.Certificate:
        return cert_from_pem((self.directory / "device.pem").read_bytes())

    def identity(self, broker: Broker, **changes: Any) -> MqttIdentity:
        ident = MqttIdentity(
            host=broker.connect_host,
            port=broker.port,
            username=self.device_id,
            password=self.password,
            client_id=self.device_id,
            certfile=self.directory / "device.pem",
            keyfile=self.directory / "device.key",
            cafile=self.directory / "ca.pem",
        )
        return replace(ident, **changes)

    def reissue(self, pki: MakerPKI, out: Path, **kwargs: Any) -> Path:
        """A new certificate for this unit's key from ``pki`` (kwargs: validity...)."""
        key = key_from_pem((self.directory / "device.key").read_bytes())
        cert = pki.issue_device_cert(self.device_id, key.public_key(), **kwargs)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(cert_to_pem(cert))
        return out


def mint_units(pki: MakerPKI, out: Path, count: int) -> list[Unit]:
    minted = mint(pki, model="thermostat", count=count, out=out)
    return [Unit(m.device_id, m.directory) for m in minted]


class Peer:
    """A test MQTT client driven by its own loop thread, without automatic reconnects.

    ``connect()`` returns whether the broker accepted the connection; a refusal in the
    TLS handshake, a failed CONNACK or a connection dropped before CONNACK is ``False``.

    Not thread-safe against inbound traffic: a packet sent from the test thread
    (``subscribe``, ``publish``) is written at once, concurrently with the loop thread's
    PUBACKs for arriving messages, and Mosquitto may read interleaved bytes ("Protocol
    error"). Send from ``on_connect`` when messages may be streaming in (a resumed
    session with a queue).
    """

    def __init__(self, identity: MqttIdentity, *, client_id: str | None = None,
                 clean_start: bool = True, session_expiry: int = 0,
                 client: paho.Client | None = None) -> None:
        self.client = client or make_client(identity, client_id=client_id,
                                            clean_start=clean_start,
                                            session_expiry=session_expiry)
        self.identity = identity
        self.connack: ReasonCode | None = None
        self.lost = threading.Event()
        self.messages: list[paho.MQTTMessage] = []
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.pubacks: dict[int, ReasonCode] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        c = self.client
        c.on_connect = lambda _c, _u, _f, rc, _p: setattr(self, "connack", rc)
        c.on_disconnect = lambda _c, _u, _f, _rc, _p: self.lost.set()
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self.subacks.__setitem__(mid, rcs)
        c.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc)
        c.on_message = lambda _c, _u, msg: self.messages.append(msg)

    def _run(self) -> None:
        while not self._stop.is_set():
            rc = self.client.loop(timeout=0.02)
            if rc != paho.MQTT_ERR_SUCCESS:
                self.lost.set()
                return

    def connect(self, timeout: float = 5.0) -> bool:
        try:
            self.client.reconnect()
        except OSError:  # includes ssl.SSLError: refused in the TLS handshake
            self.lost.set()
            return False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: self.connack is not None or self.lost.is_set(), timeout=timeout,
                   interval=0.005, what="CONNACK or disconnect")
        return self.connected

    @property
    def connected(self) -> bool:
        return (self.connack is not None and not self.connack.is_failure
                and not self.lost.is_set())

    def subscribe(self, topic: str, qos: int = 1) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic, qos=qos)
        assert mid is not None
        wait_until(lambda: mid in self.subacks, interval=0.005, what=f"SUBACK {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=qos)
        wait_until(lambda: info.mid in self.pubacks, interval=0.005, what=f"PUBACK {topic}")
        return self.pubacks[info.mid]

    def stop_loop(self) -> None:
        """Stop the loop thread: from now on the test thread drives ``client`` alone (a
        TLS connection must not be read and written from two threads at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            assert not self._thread.is_alive(), "the loop thread did not stop"

    def got(self, payload: bytes, topic: str | None = None) -> bool:
        return any(m.payload == payload and (topic is None or m.topic == topic)
                   for m in list(self.messages))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            if self.connected:
                self.client.disconnect()
                self.client.loop(timeout=0.05)
        finally:
            sock = self.client.socket()
            if sock is not None:
                sock.close()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    """Collects the test's peers and closes them at the end."""
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


PeerFactory = Callable[..., Peer]


@pytest.fixture
def connect(peers: list[Peer]) -> PeerFactory:
    """``connect(identity, **kw) -> Peer`` that must be accepted."""

    def _connect(identity: MqttIdentity, **kwargs: Any) -> Peer:
        peer = Peer(identity, **kwargs)
        peers.append(peer)
        assert peer.connect(), f"{identity.username} was refused: {peer.connack}"
        return peer

    return _connect


@pytest.fixture
def attempt(peers: list[Peer]) -> PeerFactory:
    """``attempt(identity, **kw) -> Peer``: tries to connect; check ``peer.connected``."""

    def _attempt(identity: MqttIdentity, **kwargs: Any) -> Peer:
        peer = Peer(identity, **kwargs)
        peers.append(peer)
        peer.connect()
        return peer

    return _attempt


@dataclass
class World:
    pki: MakerPKI
    broker: Broker
    units: list[Unit]
    tmp: Path


def start_world(tmp: Path, count: int, **broker_kwargs: Any) -> World:
    pki = MakerPKI.create(tmp / "pki")
    units = mint_units(pki, tmp / "units", count)
    broker = Broker(tmp / "broker", pki, port=free_port(),
                    units=units_from_manifest(load_manifest(tmp / "units")), **broker_kwargs)
    broker.start()
    return World(pki, broker, units, tmp)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One broker with eight units for all tests that leave it as they found it
    (revocation tests each use their own units of it)."""
    world = start_world(tmp_path_factory.mktemp("shared"), 8)
    yield world
    world.broker.stop()


INGEST_SESSIONS = ("hearth-ingest-0", "hearth-ingest-1")


@pytest.fixture(params=[(), INGEST_SESSIONS], ids=["plain", "ingest-sessions"])
def own(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    """A broker of the test's own, with three units (for restarts, kills and stops);
    once without and once with ingest sessions to restore at every (re)start."""
    world = start_world(tmp_path, 3, ingest_sessions=request.param)
    yield world
    world.broker.stop()


@pytest.fixture
def own_plain(tmp_path: Path) -> Iterator[World]:
    """A broker of the test's own without ingest sessions (the behaviour before them)."""
    world = start_world(tmp_path, 3)
    yield world
    world.broker.stop()


@pytest.fixture
def held(tmp_path: Path) -> Iterator[World]:
    """A broker of the test's own with three units and two ingest sessions to restore."""
    world = start_world(tmp_path, 3, ingest_sessions=INGEST_SESSIONS)
    yield world
    world.broker.stop()


def raw_tls_context(*, cafile: Path, cert: tuple[Path, Path] | None,
                    max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cafile))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if max_version is not None:
        # OpenSSL 3 refuses TLS < 1.2 at its default security level on the client side
        # too; lower it so the *broker* is what refuses.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated
            ctx.minimum_version = min(max_version, ssl.TLSVersion.TLSv1_2)
            ctx.maximum_version = max_version
    return ctx


def past(days: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
