"""The supervised Mosquitto broker: configuration, identity binding, revocation.

Hearth runs Mosquitto 2 as a child process and owns every file it reads. :class:`Broker`
writes them into one directory (mode 0700)::

    mosquitto.conf             one mTLS listener; nothing else listens
    server.pem  server.key     the broker's certificate (service CA), key 0600
    ca.pem                     device CA + service CA + root: who may connect
    root-ca.pem                the maker root: how the service's own clients verify us
    crl.pem                    the CRLs of both issuing CAs, concatenated
    dynamic-security.json      clients, roles and ACLs for the dynamic-security plugin (0600)
    identities/<name>/         the service's own identities: client.pem, client.key,
                               password (0600)
    mosquitto.db               persistence: sessions and queued QoS 1 messages
    mosquitto.log              the broker's log (no secrets: it logs ids, never passwords)

Security reasoning (see ``docs/adr/0001-broker-identity-binding.md``):

* A connection needs *both* a client certificate the CA signed and not revoked, *and* a
  username and password that the dynamic-security plugin knows, and the certificate's
  identity *is* the username: Hearth's own plugin (:mod:`hearth.service.broker_plugin`),
  asked first, refuses a CONNECT whose username is not the certificate's commonName. A
  unit's username is its device id (= certificate CN) and dynamic-security binds its
  client id to the same value, so a unit can only connect as itself, and taking over its
  session needs both its private key and its 256-bit broker secret.
  ``use_identity_as_username`` stays off: with it on, Mosquitto 2.0.11 skips plugin
  authentication altogether.
* Least privilege per unit: a unit may publish only to its own ``telemetry``, ``event``
  and ``cmd/result`` topics, and subscribe to and receive only its own ``cmd`` topic.
  Everything else is denied by default. Mosquitto 2.0.11's plugin does *not* substitute
  ``%u``/``%c`` in ACL topics (measured), so every unit has its own role.
* The service identities are as narrow: ``hearth-admin`` only speaks the plugin's
  ``$CONTROL`` API, ``hearth-ingest`` only takes the units' uplink topics through the
  shared subscription ``$share/hearth-ingest/...``, ``hearth-control`` only publishes
  commands, ``hearth-updates`` only takes update checks (``$share/hearth-updates/...``) and
  publishes update offers. A unit may also publish its own ``update/check`` and receive its
  own ``update/offer`` (the signed-updates token channel, ``hearth.service.updates``).
* Revocation (:meth:`Broker.revoke`) rewrites the CRL and reloads it (blocks new
  connections) *and* disables the unit in the plugin, which cuts a live session at once.
  A reloaded CRL alone leaves an established session running.
* Restarts lose nothing a unit was PUBACKed for: Mosquitto 2.0.11 does not restore shared
  subscriptions from its persistence file, so with ``ingest_sessions`` every spawn holds
  the units back (``crl.pem`` without the device CA's CRL), re-subscribes each ingest
  session, and only then installs the full CRL (:class:`Broker`).

Example::

    units = units_from_manifest(load_manifest(Path("batch-1")))
    with Broker(Path("data/broker"), pki, port=8883, units=units) as broker:
        ingest = make_client(broker.identity("hearth-ingest"), client_id="hearth-ingest-1")
        ...
        broker.revoke(device_id, certificate)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from hearth._fsutil import atomic_write, write_secret
from hearth.errors import BrokerError, ConfigError, NotFoundError, PKIError
from hearth.factory import dynsec_password_hash
from hearth.pki import (
    DEVICE_ID_RE,
    MakerPKI,
    cert_from_pem,
    cert_to_pem,
    common_name,
    generate_key,
    key_to_pem,
)
from hearth.protocol import MAX_PAYLOAD_BYTES, TOPIC_PREFIX
from hearth.service import broker_log
from hearth.service.broker_plugin import identity_plugin_path
from hearth.service.mqtt import DEFAULT_KEEPALIVE, MqttIdentity, make_client

__all__ = [
    "ADMIN",
    "CONTROL",
    "INGEST",
    "INGEST_SESSION_EXPIRY",
    "INGEST_SHARE_GROUP",
    "INGEST_SUBSCRIPTIONS",
    "SERVICE_IDENTITIES",
    "UPDATES",
    "Broker",
    "BrokerLimits",
    "BrokerUnit",
    "dynsec_plugin_path",
    "mosquitto_path",
    "units_from_manifest",
]

log = logging.getLogger(__name__)

ADMIN = "hearth-admin"
"""Service identity that may only use the dynamic-security ``$CONTROL`` API."""
INGEST = "hearth-ingest"
"""Service identity that may only take unit uplink messages via the shared subscription."""
CONTROL = "hearth-control"
"""Service identity that may only publish commands to units."""
UPDATES = "hearth-updates"
"""Service identity that may only take units' update checks (shared subscription
``$share/hearth-updates/.../update/check``) and publish to their ``update/offer`` topics."""
SERVICE_IDENTITIES = (ADMIN, INGEST, CONTROL, UPDATES)
INGEST_SHARE_GROUP = "hearth-ingest"
"""Ingest workers subscribe to ``$share/hearth-ingest/hearth/v1/d/+/<kind>``."""

UNIT_UPLINK_KINDS = ("telemetry", "event", "cmd/result")
INGEST_SUBSCRIPTIONS = tuple(
    f"$share/{INGEST_SHARE_GROUP}/{TOPIC_PREFIX}/+/{kind}" for kind in UNIT_UPLINK_KINDS
)
"""The shared subscriptions of the ingest workers: exactly what the ingest role may use
(``hearth.service.ingest.SUBSCRIPTIONS`` spells out the same three filters)."""
INGEST_SESSION_EXPIRY = 3600
"""Session expiry (s) of the persistent ingest sessions the broker restores at every
start; the same as :class:`hearth.service.ingest.IngestWorker`'s default."""
DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE_TOPIC = DYNSEC_TOPIC + "/response"

# TLS 1.2 suites: forward secrecy and AEAD only (the server key is ECDSA P-256).
# TLS 1.3 suites are OpenSSL's defaults, all of which are AEAD.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305"
)
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
RENEW_BEFORE = dt.timedelta(days=30)
"""Broker and service-identity certificates are reissued when they expire sooner."""
CRL_REFRESH_BEFORE = dt.timedelta(days=3)
"""The CRLs are re-signed when their ``nextUpdate`` is closer than this (validity 7 d)."""
STABLE_AFTER = 30.0
"""A Mosquitto that ran this many seconds before dying restarts with the shortest backoff."""

_PLUGIN_NAME = "mosquitto_dynamic_security.so"
_INGEST_SESSION_RE = re.compile(r"hearth-ingest-[0-9a-z-]{1,32}")
_RESTORE_ATTEMPTS = 3
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - mapped, not bound


# --- finding the parts ------------------------------------------------------------------
def mosquitto_path() -> Path:
    """The ``mosquitto`` binary: ``$HEARTH_MOSQUITTO``, then ``PATH``, then the sbin dirs.

    Raises:
        BrokerError: Mosquitto is not installed (or the override does not exist).
    """
    override = os.environ.get("HEARTH_MOSQUITTO")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrokerError(f"HEARTH_MOSQUITTO={override} is not an executable file")
        return path
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for d in ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/usr/bin"):
        path = Path(d) / "mosquitto"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise BrokerError(
        "Mosquitto 2 was not found: install Mosquitto: apt-get install mosquitto "
        "(or set HEARTH_MOSQUITTO to the binary)"
    )


def dynsec_plugin_path() -> Path:
    """Mosquitto's dynamic-security plugin (``mosquitto_dynamic_security.so``).

    Looks at ``$HEARTH_MOSQUITTO_DYNSEC``, then the usual library directories.

    Raises:
        BrokerError: the plugin is not installed.
    """
    override = os.environ.get("HEARTH_MOSQUITTO_DYNSEC")
    if override:
        path = Path(override)
        if not path.is_file():
            raise BrokerError(f"HEARTH_MOSQUITTO_DYNSEC={override} is not a file")
        return path
    candidates: list[Path] = []
    for base in ("/usr/lib", "/usr/local/lib", "/usr/lib64", "/opt/homebrew/lib"):
        root = Path(base)
        candidates.append(root / _PLUGIN_NAME)
        candidates.extend(sorted(root.glob(f"*/{_PLUGIN_NAME}")))  # multiarch, mosquitto*/
    for path in candidates:
        if path.is_file():
            return path
    raise BrokerError(
        f"the Mosquitto dynamic-security plugin ({_PLUGIN_NAME}) was not found: "
        "install Mosquitto 2: apt-get install mosquitto (or set HEARTH_MOSQUITTO_DYNSEC)"
    )


# --- configuration values -------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerLimits:
    """Explicit limits of the broker and of its supervisor.

    Raises:
        ConfigError: a limit is not positive, or the packet limit is below the payload
            limit.
    """

    max_packet_size: int = MAX_PAYLOAD_BYTES + 2048
    """Largest MQTT packet accepted: a 16 KiB payload plus topic, properties and header."""
    max_inflight_messages: int = 100
    """Unacknowledged QoS 1 messages in flight to one client."""
    max_queued_messages: int = 1_000_000
    """QoS 1 messages queued for one client (offline persistent session or busy ingest).

    Mosquitto PUBACKs a unit's message and then drops it when the receiving session's
    queue is full (measured: a paused ingest session got exactly 10,000 + 1,000 in flight
    of 15,000 acknowledged messages). Ingest sessions must be able to hold a whole fleet's
    backlog after an outage, so this is large; it costs broker memory only when ingest
    falls behind (roughly 0.5 KB a message)."""
    autosave_interval: int = 60
    """Seconds between persistence snapshots (Mosquitto also saves on a clean stop)."""
    persistent_client_expiration_days: int = 30
    """Sessions of clients absent this long are dropped."""
    start_timeout: float = 30.0
    """Seconds for Mosquitto to serve mTLS after spawning (~8 s with 100k units)."""
    stop_timeout: float = 5.0
    control_timeout: float = 10.0
    restart_backoff_initial: float = 0.1
    restart_backoff_max: float = 5.0
    crl_check_interval: float = 3600.0

    def __post_init__(self) -> None:
        ints = ("max_packet_size", "max_inflight_messages", "max_queued_messages",
                "autosave_interval", "persistent_client_expiration_days")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"BrokerLimits.{name} must be a positive integer")
        if self.max_packet_size < MAX_PAYLOAD_BYTES + 256:
            raise ConfigError("BrokerLimits.max_packet_size must exceed the payload limit")
        for name in ("start_timeout", "stop_timeout", "control_timeout",
                     "restart_backoff_initial", "restart_backoff_max", "crl_check_interval"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"BrokerLimits.{name} must be positive")


@dataclass(frozen=True)
class BrokerUnit:
    """A unit as the broker knows it: device id, broker password hash, enabled or not.

    ``password_hash`` is the manifest's ``mqtt_password_hash``
    (:func:`hearth.factory.dynsec_password_hash`: base64 PBKDF2-SHA512 digest, base64
    salt, iterations). The broker never sees the password itself.

    Raises:
        ConfigError: the device id or the hash is malformed.
    """

    device_id: str
    password_hash: dict[str, Any] = field(repr=False, hash=False)
    enabled: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.device_id, str) or not DEVICE_ID_RE.match(self.device_id):
            raise ConfigError("a unit's device id must be 32 lowercase hex digits")
        h = self.password_hash
        try:
            digest = base64.b64decode(h["password"], validate=True)
            salt = base64.b64decode(h["salt"], validate=True)
            iterations = h["iterations"]
        except (KeyError, TypeError, binascii.Error) as e:
            raise ConfigError(f"unit {self.device_id}: malformed broker password hash") from e
        if len(digest) != 64 or not 8 <= len(salt) <= 64:
            raise ConfigError(f"unit {self.device_id}: not a PBKDF2-SHA512 password hash")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or not (
            1 <= iterations <= 10_000_000
        ):
            raise ConfigError(f"unit {self.device_id}: iterations out of range")


def units_from_manifest(manifest: Mapping[str, Any]) -> list[BrokerUnit]:
    """The :class:`BrokerUnit` list of a factory manifest (:func:`hearth.factory.load_manifest`).

    Raises:
        ConfigError: an entry is malformed.
    """
    try:
        return [
            BrokerUnit(entry["device_id"], entry["mqtt_password_hash"])
            for entry in manifest["units"]
        ]
    except (KeyError, TypeError) as e:
        raise ConfigError("manifest units need device_id and mqtt_password_hash") from e


def _check_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOSTNAME_RE.match(host):
            raise ConfigError(f"not a host name or IP address: {host!r}") from None
        return host.lower()


# --- dynamic-security document ---------------------------------------------------------------
def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def _unit_role(device_id: str) -> str:
    return f"hearth-unit-{device_id}"


def _client(username: str, password_hash: Mapping[str, Any], role: str, *,
            clientid: str | None = None, disabled: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "username": username,
        "password": password_hash["password"],
        "salt": password_hash["salt"],
        "iterations": password_hash["iterations"],
        "roles": [{"rolename": role}],
    }
    if clientid is not None:
        entry["clientid"] = clientid
    if disabled:
        entry["disabled"] = True
    return entry


def _service_roles() -> list[dict[str, Any]]:
    return [
        {
            "rolename": ADMIN,
            "acls": [
                _acl("publishClientSend", "$CONTROL/dynamic-security/#"),
                _acl("subscribePattern", "$CONTROL/dynamic-security/#"),
                _acl("publishClientReceive", "$CONTROL/dynamic-security/#"),
            ],
        },
        {
            # The plugin checks a shared subscription with its $share/<group>/ prefix
            # (measured on 2.0.11), and delivery against the plain topic.
            "rolename": INGEST,
            "acls": [
                *(_acl("subscribePattern", topic) for topic in INGEST_SUBSCRIPTIONS),
                *(_acl("publishClientReceive", f"{TOPIC_PREFIX}/+/{kind}")
                  for kind in UNIT_UPLINK_KINDS),
            ],
        },
        {
            "rolename": CONTROL,
            "acls": [_acl("publishClientSend", f"{TOPIC_PREFIX}/+/cmd")],
        },
        {
            # Signed updates: the update channel, and nothing else (see
            # hearth.service.updates.responder).
            "rolename": UPDATES,
            "acls": [
                _acl("subscribePattern", f"$share/{UPDATES}/{TOPIC_PREFIX}/+/update/check"),
                _acl("publishClientReceive", f"{TOPIC_PREFIX}/+/update/check"),
                _acl("publishClientSend", f"{TOPIC_PREFIX}/+/update/offer"),
            ],
        },
    ]


def _dynsec_document(
    units: Iterable[BrokerUnit], service_hashes: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The dynamic-security plugin's configuration for ``units`` and the service identities.

    Pure: no I/O. Default access is deny for publishing, subscribing and receiving.
    """
    clients: list[dict[str, Any]] = []
    roles = _service_roles()
    for name in SERVICE_IDENTITIES:
        # Service identities are not bound to one client id here: several ingest workers
        # connect at once, each with its own id - which Hearth's identity plugin limits to
        # the name or name-suffix, so none can take a unit's client id.
        clients.append(_client(name, service_hashes[name], name))
    for unit in units:
        uid = unit.device_id
        base = f"{TOPIC_PREFIX}/{uid}"
        roles.append({
            "rolename": _unit_role(uid),
            "acls": [
                *(_acl("publishClientSend", f"{base}/{kind}") for kind in UNIT_UPLINK_KINDS),
                _acl("subscribePattern", f"{base}/cmd"),
                _acl("publishClientReceive", f"{base}/cmd"),
                # the update channel: its own request out, its own offers in
                _acl("publishClientSend", f"{base}/update/check"),
                _acl("subscribePattern", f"{base}/update/offer"),
                _acl("publishClientReceive", f"{base}/update/offer"),
            ],
        })
        clients.append(_client(uid, unit.password_hash, _unit_role(uid), clientid=uid,
                               disabled=not unit.enabled))
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


# --- a short synchronous MQTT session (probe and $CONTROL) -----------------------------
class _Session:
    """One short-lived connection driven synchronously with ``loop()``; no threads.

    By default a throw-away clean session with a random client id. With ``client_id`` and
    ``session_expiry`` it resumes (or creates) that persistent session *without taking
    anything from it*: messages the broker queued for the session are never acknowledged
    (manual acknowledgement, Receive Maximum 1), so after a clean disconnect the broker
    still holds them for whoever resumes the session next.
    """

    def __init__(self, identity: MqttIdentity, *, timeout: float, client_id: str | None = None,
                 session_expiry: int = 0) -> None:
        self.deadline = time.monotonic() + timeout
        self.client = make_client(
            identity, client_id=client_id or f"{identity.username}-{secrets.token_hex(6)}",
            connect_timeout=max(0.1, min(2.0, timeout)),
        )
        if session_expiry:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = session_expiry
            props.ReceiveMaximum = 1
            self.client.manual_ack_set(True)
            self.client.connect_async(identity.host, identity.port, keepalive=DEFAULT_KEEPALIVE,
                                      clean_start=False, properties=props)
        self.connack: ReasonCode | None = None
        self.session_present = False
        self.gone = False
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.acked: dict[int, ReasonCode] = {}
        self.messages: list[paho.MQTTMessage] = []
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = lambda _c, _u, _f, _rc, _p: setattr(self, "gone", True)
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self.subacks.__setitem__(mid, rcs)
        c.on_publish = lambda _c, _u, mid, rc, _p: self.acked.__setitem__(mid, rc)
        c.on_message = lambda _c, _u, msg: self.messages.append(msg)

    def _on_connect(self, _c: paho.Client, _u: object, flags: paho.ConnectFlags,
                    rc: ReasonCode, _p: Properties | None) -> None:
        self.session_present = bool(flags.session_present)
        self.connack = rc

    def pump(self, done: Callable[[], bool], what: str) -> None:
        while not done():
            if self.gone:
                raise BrokerError(f"the broker closed the connection while waiting for {what}")
            if time.monotonic() > self.deadline:
                raise BrokerError(f"timed out waiting for {what}")
            rc = self.client.loop(timeout=0.02)
            if rc != paho.MQTT_ERR_SUCCESS and not done():
                raise BrokerError(f"connection lost while waiting for {what} ({rc.name})")

    def connect(self) -> None:
        try:
            self.client.reconnect()
        except OSError as e:  # includes ssl.SSLError
            raise BrokerError(f"cannot connect to the broker: {e}") from e
        self.pump(lambda: self.connack is not None, "CONNACK")
        assert self.connack is not None
        if self.connack.is_failure:
            raise BrokerError(f"the broker refused the connection: {self.connack}")

    def subscribe(self, *topics: str) -> None:
        """Subscribe to ``topics`` at QoS 1 in one SUBSCRIBE; wait for the SUBACK.

        Raises:
            BrokerError: a filter was refused or granted another QoS than 1.
        """
        rc, mid = self.client.subscribe([(topic, 1) for topic in topics])
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"cannot send SUBSCRIBE for {topics} ({rc.name})")
        self.pump(lambda: mid in self.subacks, f"SUBACK for {topics}")
        granted = self.subacks[mid]
        if len(granted) != len(topics) or any(r.is_failure or r.value != 1 for r in granted):
            raise BrokerError(f"subscription to {topics} not granted at QoS 1: {granted}")

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        self.pump(lambda: info.mid in self.acked, f"PUBACK for {topic}")
        if self.acked[info.mid].is_failure:
            raise BrokerError(f"publish to {topic} refused: {self.acked[info.mid]}")

    def close(self) -> None:
        """Send DISCONNECT (normal disconnection: a persistent session is kept) and close."""
        with contextlib.suppress(Exception):
            if self.client.disconnect() == paho.MQTT_ERR_SUCCESS:
                end = time.monotonic() + 1.0
                while not self.gone and time.monotonic() < end:
                    if self.client.loop(timeout=0.01) != paho.MQTT_ERR_SUCCESS:
                        break
        with contextlib.suppress(Exception):
            sock = self.client.socket()
            if sock is not None:
                sock.close()


# --- the supervisor ------------------------------------------------------------------------
class Broker:
    """A Mosquitto child process with Hearth's configuration, restarted if it dies.

    Use it as a context manager (``with Broker(...) as broker``) or call :meth:`start`
    and :meth:`stop`. Thread-safe: one lock serialises start, stop, restarts and control
    operations.

    ``ingest_sessions`` are the client ids of the ingest workers' persistent sessions
    (``hearth-ingest-0`` ...). Mosquitto 2.0.11 restores persistent sessions and their
    plain subscriptions after a restart but *not* their shared subscriptions, so a unit
    that published before its ingest worker had resubscribed would get a PUBACK for a
    message nobody receives. Whenever Mosquitto is (re)spawned the broker therefore holds
    every unit back (the device CA's CRL is left out of ``crl.pem``: every device
    certificate fails the handshake), resumes each ingest session as ``hearth-ingest``
    and subscribes it to :data:`INGEST_SUBSCRIPTIONS`, disconnects (the session and what
    is queued for it stay), and only then installs the full CRL and reloads it. The real
    worker resumes the session whenever it reconnects. See ADR 0001.

    Raises:
        ConfigError: ``host``, ``port``, ``directory``, a unit or an ingest session id is
            invalid, or a device id or session id appears twice.
    """

    def __init__(
        self,
        directory: Path,
        pki: MakerPKI,
        *,
        host: str = "127.0.0.1",
        port: int = 8883,
        units: Iterable[BrokerUnit] = (),
        server_names: Iterable[str] = (),
        limits: BrokerLimits | None = None,
        ingest_sessions: Iterable[str] = (),
    ) -> None:
        directory = Path(directory).absolute()
        if any(ch in str(directory) for ch in "\n\r\t\"'"):
            raise ConfigError("the broker directory path must not contain quotes or controls")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError("port must be 1..65535")
        self._dir = directory
        self._pki = pki
        self._host = _check_host(host)
        self._port = port
        self._server_names = [_check_host(n) for n in server_names]
        self._limits = limits or BrokerLimits()
        self._units = self._index(units)
        self._ingest_sessions = self._check_sessions(ingest_sessions)
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._supervisor: threading.Thread | None = None
        self._restarts = 0

    def __repr__(self) -> str:
        return f"Broker({self._dir!s}, {self._host}:{self._port}, units={len(self._units)})"

    @staticmethod
    def _index(units: Iterable[BrokerUnit]) -> dict[str, BrokerUnit]:
        out: dict[str, BrokerUnit] = {}
        for unit in units:
            if not isinstance(unit, BrokerUnit):
                raise ConfigError("units must be BrokerUnit values")
            if unit.device_id in out:
                raise ConfigError(f"device id {unit.device_id} appears twice")
            out[unit.device_id] = unit
        return out

    @staticmethod
    def _check_sessions(sessions: Iterable[str]) -> tuple[str, ...]:
        if isinstance(sessions, str):
            raise ConfigError("ingest_sessions must be a list of client ids, not one string")
        out: list[str] = []
        for sid in sessions:
            if not isinstance(sid, str) or not _INGEST_SESSION_RE.fullmatch(sid):
                raise ConfigError(
                    f"ingest session id {sid!r} must match {_INGEST_SESSION_RE.pattern}")
            if sid in out:
                raise ConfigError(f"ingest session {sid} appears twice")
            out.append(sid)
        return tuple(out)

    # -- properties -------------------------------------------------------------------------
    @property
    def ingest_sessions(self) -> tuple[str, ...]:
        """Client ids of the ingest sessions restored before units may connect."""
        return self._ingest_sessions

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def connect_host(self) -> str:
        """Where local clients connect (a wildcard bind address maps to loopback)."""
        return _WILDCARD_HOSTS.get(self._host, self._host)

    @property
    def pid(self) -> int | None:
        """Process id of the running Mosquitto, or ``None``."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def restarts(self) -> int:
        """How many times the supervisor restarted Mosquitto after it died."""
        return self._restarts

    @property
    def units(self) -> Mapping[str, BrokerUnit]:
        """A snapshot of the units the broker is configured with, by device id."""
        with self._lock:
            return dict(self._units)

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration, start Mosquitto and wait until it serves mTLS.

        Returns once ``hearth-admin`` completed a verified mTLS + password connection,
        the ingest sessions are restored and units may connect.

        Raises:
            BrokerError: Mosquitto is missing, already running under this object, exits
                at start or is not ready within ``limits.start_timeout`` (the message
                carries the tail of its log).
            PKIError: a certificate could not be issued.
        """
        with self._lock:
            if self.running:
                raise BrokerError("the broker is already running")
            self._stopping.clear()
            self._prepare()
            self._spawn_and_wait()
            thread = threading.Thread(
                target=self._supervise, name=f"hearth-broker-{self._port}", daemon=True
            )
            self._supervisor = thread
            thread.start()

    def stop(self) -> None:
        """Stop Mosquitto (SIGTERM, then SIGKILL after ``limits.stop_timeout``).

        Safe to call more than once and on a broker that never started. Mosquitto
        saves its persistence file on SIGTERM, so queued QoS 1 messages survive.
        Raises nothing.
        """
        self._stopping.set()
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)
            thread, self._supervisor = self._supervisor, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self._limits.stop_timeout + self._limits.start_timeout)

    def restart(self) -> None:
        """Regenerate the configuration and restart Mosquitto now (not counted in
        :attr:`restarts`). Connected clients are disconnected and reconnect; persistent
        sessions and queued QoS 1 messages survive, and units are held back until the
        ingest sessions are restored (as at :meth:`start`).

        Raises:
            BrokerError: the broker is not running, or did not come back.
        """
        with self._lock:
            if not self.running:
                raise BrokerError("the broker is not running")
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)
            self._prepare()
            self._spawn_and_wait()

    # -- units -------------------------------------------------------------------------------
    def set_units(self, units: Iterable[BrokerUnit]) -> None:
        """Replace the unit list. Takes effect at the next start or restart.

        Raises:
            ConfigError: a device id appears twice.
        """
        index = self._index(units)
        with self._lock:
            self._units = index

    def add_units_live(self, units: Iterable[BrokerUnit]) -> None:
        """Add (or replace) units and make them effective now.

        The plugin's ``createClient`` takes only a plaintext password and the service
        holds only hashes, so a running broker is restarted with the regenerated
        configuration (see the ADR). Connected units reconnect; nothing queued is lost.

        Raises:
            ConfigError: a device id appears twice in ``units``.
            BrokerError: the broker did not come back after the restart.
        """
        index = self._index(units)
        with self._lock:
            self._units.update(index)
            if self.running:
                self.restart()

    def disable_unit(self, device_id: str) -> None:
        """Quarantine a unit: refuse its connections and cut its live session now.

        It stays disabled across restarts until :meth:`enable_unit`.

        Raises:
            NotFoundError: the broker does not know the unit.
            BrokerError: the running broker did not acknowledge the change.
        """
        self._set_enabled(device_id, False)

    def enable_unit(self, device_id: str) -> None:
        """Lift a quarantine (a revoked certificate stays refused by the CRL).

        Raises:
            NotFoundError: the broker does not know the unit.
            BrokerError: the running broker did not acknowledge the change.
        """
        self._set_enabled(device_id, True)

    def _set_enabled(self, device_id: str, enabled: bool) -> None:
        with self._lock:
            unit = self._units.get(device_id)
            if unit is None:
                raise NotFoundError(f"the broker has no unit {device_id!r}")
            self._units[device_id] = replace(unit, enabled=enabled)
            if self.running:
                command = "enableClient" if enabled else "disableClient"
                self._control([{"command": command, "username": device_id}])

    def revoke(self, device_id: str, cert: x509.Certificate) -> None:
        """Revoke a unit's certificate and cut its live session.

        Records the revocation and rewrites the CRL (:meth:`MakerPKI.revoke`), installs
        and reloads it (SIGHUP: new connections with the certificate fail the TLS
        handshake) and disables the unit in the plugin, which disconnects a live
        session at once. Returns after the plugin acknowledged. The unit stays disabled
        across restarts of this object; whoever builds the unit list later (the fleet
        registry) must pass ``enabled=False`` for it, and the CRL refuses the
        certificate regardless.

        Raises:
            PKIError: the certificate is not this PKI's or its CN is not ``device_id``.
            BrokerError: the running broker did not acknowledge the disable. The
                revocation and the CRL are in place already; retry with
                :meth:`disable_unit`.
        """
        if common_name(cert) != device_id:
            raise PKIError("the certificate's common name is not the device id")
        self._pki.revoke(cert)
        with self._lock:
            unit = self._units.get(device_id)
            if unit is not None:
                self._units[device_id] = replace(unit, enabled=False)
            self.reload_crl()
            if self.running and unit is not None:
                self._control([{"command": "disableClient", "username": device_id}])

    def reload_crl(self) -> None:
        """Install the PKI's current CRL file and make a running Mosquitto reload it.

        Use after revoking a certificate directly with :meth:`MakerPKI.revoke` (for
        example a service identity). New connections with a revoked certificate then
        fail; established sessions are not affected (see :meth:`revoke`).

        Raises:
            PKIError: the CRL cannot be read or re-signed.
        """
        with self._lock:
            self._install_crl()
            if self.running:
                self._reload()

    def refresh_crl(self) -> bool:
        """Re-sign and reload the CRLs if they expire within :data:`CRL_REFRESH_BEFORE`.

        Mosquitto refuses every client of a CA whose CRL has expired, so the supervisor
        calls this every ``limits.crl_check_interval`` seconds. Returns whether it
        refreshed.

        Raises:
            PKIError: the CRL file cannot be read or signed.
        """
        with self._lock:
            if not self._crl_due(self._dir / "crl.pem"):
                return False
            self.reload_crl()
            return True

    # -- identities and control -------------------------------------------------------------
    def identity(self, name: str) -> MqttIdentity:
        """Connection details of a service identity (``hearth-admin``, ``hearth-ingest``,
        ``hearth-control``); creates its certificate and password on first use.

        Service identities are not bound to one client id; ``client_id`` defaults to the
        identity's name, so processes that connect at the same time must each pass their
        own, ``<name>-<suffix>`` (``make_client(identity, client_id=...)``), or they take
        over each other's session. Any other client id is refused by the broker. A revoked
        or expiring certificate is reissued here.

        Raises:
            NotFoundError: ``name`` is not a service identity.
            PKIError: its certificate could not be issued.
        """
        if name not in SERVICE_IDENTITIES:
            raise NotFoundError(f"no service identity {name!r}; known: {SERVICE_IDENTITIES}")
        with self._lock:
            self._ensure_identity(name)
        d = self._identity_dir(name)
        return MqttIdentity(
            host=self.connect_host,
            port=self._port,
            username=name,
            password=(d / "password").read_text(encoding="ascii").strip(),
            client_id=name,
            certfile=d / "client.pem",
            keyfile=d / "client.key",
            cafile=self._dir / "root-ca.pem",
        )

    def _control(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send dynamic-security commands as ``hearth-admin``; wait for the responses.

        Each command gets a correlation id; the call returns the plugin's responses in
        order once all arrived.

        Raises:
            BrokerError: no connection, a timeout, or the plugin reported an error.
        """
        ids = [secrets.token_hex(8) for _ in commands]
        request = {"commands": [{**c, "correlationData": i} for c, i in zip(commands, ids,
                                                                               strict=True)]}
        session = _Session(self.identity(ADMIN), timeout=self._limits.control_timeout)
        try:
            session.connect()
            session.subscribe(DYNSEC_RESPONSE_TOPIC)
            session.publish(DYNSEC_TOPIC, json.dumps(request).encode())
            found: dict[str, dict[str, Any]] = {}

            def collect() -> bool:
                while session.messages:
                    msg = session.messages.pop(0)
                    try:
                        responses = json.loads(msg.payload)["responses"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    for r in responses:
                        if isinstance(r, dict) and r.get("correlationData") in ids:
                            found[r["correlationData"]] = r
                return len(found) == len(ids)

            session.pump(collect, "the dynamic-security response")
        finally:
            session.close()
        out = [found[i] for i in ids]
        for r in out:
            if r.get("error"):
                raise BrokerError(f"dynamic-security {r.get('command')} failed: {r['error']}")
        return out

    # -- internals: files ------------------------------------------------------------------
    def _identity_dir(self, name: str) -> Path:
        return self._dir / "identities" / name

    def _ensure_dir(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self._dir, 0o700)
        root = self._pki.root_pem()
        path = self._dir / "root-ca.pem"
        if not path.exists() or path.read_bytes() != root:
            atomic_write(path, root)

    def _prepare(self) -> None:
        self._ensure_dir()
        atomic_write(self._dir / "ca.pem", self._pki.chain_pem())
        self._ensure_server_cert()
        hashes = {name: self._ensure_identity(name) for name in SERVICE_IDENTITIES}
        if self._crl_due(self._dir / "crl.pem"):
            self._pki.write_crl()
        # Units are held back (no device-CA CRL) until the ingest sessions are restored.
        self._install_crl(hold=bool(self._ingest_sessions))
        document = _dynsec_document(self._units.values(), hashes)
        atomic_write(self._dir / "dynamic-security.json",
                     json.dumps(document, separators=(",", ":")).encode(), mode=0o600)
        atomic_write(self._dir / "mosquitto.conf", self._config().encode())

    def _cert_usable(self, path: Path, issuer: x509.Certificate) -> bool:
        try:
            cert = cert_from_pem(path.read_bytes())
            cert.verify_directly_issued_by(issuer)
        except (OSError, PKIError, ValueError, TypeError):
            return False
        now = dt.datetime.now(dt.UTC)
        return bool(cert.not_valid_before_utc <= now
                    and cert.not_valid_after_utc - RENEW_BEFORE > now)

    def _server_names_wanted(self) -> list[str]:
        names = list(LOCAL_NAMES)
        for name in (self._host, *self._server_names):
            if name not in names and name not in _WILDCARD_HOSTS:
                names.append(name)
        return names

    def _ensure_server_cert(self) -> None:
        pem, key_path = self._dir / "server.pem", self._dir / "server.key"
        wanted = self._server_names_wanted()
        if self._cert_usable(pem, self._pki.service_ca.cert) and key_path.exists():
            cert = cert_from_pem(pem.read_bytes())
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                have = {str(v) for v in san.value.get_values_for_type(x509.DNSName)} | {
                    str(v) for v in san.value.get_values_for_type(x509.IPAddress)}
            except x509.ExtensionNotFound:
                have = set()
            if have == set(wanted):
                return
        key = generate_key()
        cert = self._pki.issue_server_cert(key.public_key(), wanted)
        write_secret(key_path, key_to_pem(key))
        atomic_write(pem, cert_to_pem(cert))

    def _ensure_identity(self, name: str) -> dict[str, Any]:
        """Issue the identity's certificate and password if needed; return the hash."""
        self._ensure_dir()
        d = self._identity_dir(name)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d.parent, 0o700)
        pem, key_path, pw_path = d / "client.pem", d / "client.key", d / "password"
        if not (self._cert_usable(pem, self._pki.service_ca.cert) and key_path.exists()
                and not self._pki.is_revoked(cert_from_pem(pem.read_bytes()))):
            key = generate_key()
            cert = self._pki.issue_service_client_cert(name, key.public_key())
            write_secret(key_path, key_to_pem(key))
            atomic_write(pem, cert_to_pem(cert))
        if not pw_path.exists():
            write_secret(pw_path, secrets.token_urlsafe(32).encode())
        return dynsec_password_hash(pw_path.read_text(encoding="ascii").strip())

    def _crl_due(self, path: Path) -> bool:
        try:
            crls = _load_crls(path.read_bytes())
        except (OSError, ValueError):
            return True
        soon = dt.datetime.now(dt.UTC) + CRL_REFRESH_BEFORE
        return len(crls) < 2 or any(
            c.next_update_utc is None or c.next_update_utc < soon for c in crls
        )

    def _install_crl(self, *, hold: bool = False) -> None:
        """Copy the PKI's CRLs to ``crl.pem``; with ``hold``, only the service CA's.

        Mosquitto checks every client certificate against a CRL of its issuer
        (``crlfile``); without one for the device CA every device certificate fails the
        handshake ("unable to get certificate CRL") while the service identities, whose
        CA's CRL is there, get in. That holds all units back in O(1), however large the
        fleet, and a SIGHUP with the full file lets them in (measured on 2.0.11: the reload
        replaces the CRL store, it does not add to it).
        """
        source = self._pki.crl_path()
        if self._crl_due(source):
            self._pki.write_crl()
        data = source.read_bytes()
        if hold:
            service = self._pki.service_ca.cert
            kept = [crl for crl in _load_crls(data)
                    if crl.issuer == service.subject
                    and crl.is_signature_valid(service.public_key())]  # type: ignore[arg-type]
            if len(kept) != 1:
                raise PKIError(f"{source} does not hold exactly one CRL of the service CA")
            data = kept[0].public_bytes(serialization.Encoding.PEM)
        atomic_write(self._dir / "crl.pem", data)

    def _config(self) -> str:
        d, lim = self._dir, self._limits
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [
            "# Generated by hearth.service.broker - edits are overwritten at every start.",
            "per_listener_settings false",
            "allow_anonymous false",
            "allow_zero_length_clientid false",
            # Mosquitto started as root drops to this user; running as the current user
            # keeps our 0600 files readable. Production runs `hearth up` unprivileged.
            f"user {user}",
            "persistence true",
            f"persistence_location {d}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {lim.autosave_interval}",
            f"persistent_client_expiration {lim.persistent_client_expiration_days}d",
            f"log_dest file {d}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"log_timestamp_format {broker_log.LOG_TIMESTAMP_FORMAT}",
            "set_tcp_nodelay true",
            # Nothing in Hearth retains; a unit must not leave messages behind on a topic.
            "retain_available false",
            f"max_packet_size {lim.max_packet_size}",
            f"max_inflight_messages {lim.max_inflight_messages}",
            f"max_queued_messages {lim.max_queued_messages}",
            # Asked first: the certificate's CN must be the username (else refused),
            # then dynamic-security checks the password and binds the client id.
            f"plugin {identity_plugin_path()}",
            f"plugin {dynsec_plugin_path()}",
            f"plugin_opt_config_file {d}/dynamic-security.json",
            "",
            f"listener {self._port} {self._host}",
            "protocol mqtt",
            f"certfile {d}/server.pem",
            f"keyfile {d}/server.key",
            f"cafile {d}/ca.pem",
            f"crlfile {d}/crl.pem",
            "require_certificate true",
            "use_identity_as_username false",
            "tls_version tlsv1.2",
            f"ciphers {TLS12_CIPHERS}",
        ]
        return "\n".join(lines) + "\n"

    def _log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in (self._dir / "mosquitto.stderr", self.log_path):
            try:
                text = path.read_bytes()[-8192:].decode("utf-8", "replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            if tail:
                parts.append(f"--- {path.name} ---\n{tail}")
        return "\n".join(parts) or "(no log output)"

    # -- internals: process ----------------------------------------------------------------
    def _spawn_and_wait(self) -> None:
        """Start Mosquitto and wait until it serves; with ingest sessions, restore them
        and then let units in, marking that hold in the log (:mod:`broker_log` counts
        certificates refused during it apart)."""
        if not self._ingest_sessions:
            self._spawn(then=None)
            return
        broker_log.mark(self.log_path, broker_log.HOLD_BEGINS)  # before Mosquitto logs
        end = broker_log.HOLD_ABORTED
        try:
            self._spawn(then=self._restore_and_release)
            end = broker_log.HOLD_ENDS
        finally:
            broker_log.mark(self.log_path, end)

    def _spawn(self, *, then: Callable[[], None] | None) -> None:
        with open(self._dir / "mosquitto.stderr", "ab") as err:
            proc = subprocess.Popen(
                [str(mosquitto_path()), "-c", str(self._dir / "mosquitto.conf")],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, close_fds=True,
            )
        self._proc = proc
        self._started_at = time.monotonic()
        try:
            self._wait_ready(proc)
            if then is not None:
                then()
        except BaseException:
            # Also when the restore failed: a broker that holds units back forever must
            # not look healthy; the supervisor restarts it with backoff.
            self._terminate(proc)
            raise

    def _restore_and_release(self) -> None:
        self._restore_ingest_sessions()
        self._release_units()

    def _restore_ingest_sessions(self) -> None:
        """Resume every ingest session and subscribe it to the shared ingest filters.

        Mosquitto 2.0.11 does not restore shared subscriptions from its persistence file
        (measured), so without this, units would get PUBACKs for messages that no
        subscription takes until each worker has reconnected and resubscribed. The
        session is resumed with ``clean_start=False`` and the workers' session expiry,
        nothing queued for it is acknowledged (:class:`_Session`), and it is left with a
        normal DISCONNECT: the session, its subscriptions and its queue persist, and the
        worker resumes it when it reconnects. A worker that takes the session over in
        the meantime (it connects with the same client id) cuts this connection; then
        the restore is retried.

        Raises:
            BrokerError: a session could not be restored in ``_RESTORE_ATTEMPTS`` tries.
        """
        identity = self.identity(INGEST)
        for client_id in self._ingest_sessions:
            for attempt in range(1, _RESTORE_ATTEMPTS + 1):
                session = _Session(identity, timeout=self._limits.control_timeout,
                                   client_id=client_id, session_expiry=INGEST_SESSION_EXPIRY)
                try:
                    session.connect()
                    session.subscribe(*INGEST_SUBSCRIPTIONS)
                except BrokerError as e:
                    if attempt == _RESTORE_ATTEMPTS:
                        raise BrokerError(
                            f"could not restore ingest session {client_id}: {e}"
                        ) from e
                    log.warning("restoring ingest session %s failed (%s); retrying",
                                client_id, e)
                    continue
                finally:
                    session.close()
                log.info("restored ingest session %s (%s)", client_id,
                         "resumed" if session.session_present else "new")
                break

    def _release_units(self) -> None:
        """Let units in: install the full CRL, reload it, and wait until it is loaded.

        Mosquitto only sets a flag in its SIGHUP handler and reloads at the end of the
        main-loop iteration that saw it. The signal is pending before ``kill`` returns,
        so it is handled before Mosquitto reads anything we send afterwards: the
        iteration that reads our CONNECT reloads at its end, and our second request
        (the SUBSCRIBE, sent after the CONNACK) is read in a later iteration. Its SUBACK
        therefore means the full CRL is in force.

        Raises:
            BrokerError: Mosquitto is gone or did not answer.
            PKIError: the CRL cannot be read or re-signed.
        """
        self._install_crl()
        self._reload()
        session = _Session(self.identity(ADMIN), timeout=self._limits.control_timeout)
        try:
            session.connect()
            session.subscribe(DYNSEC_RESPONSE_TOPIC)
        finally:
            session.close()
        log.info("units may connect (%d ingest session(s) restored)",
                 len(self._ingest_sessions))

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = self._started_at + self._limits.start_timeout
        admin = self.identity(ADMIN)
        while True:
            code = proc.poll()
            if code is not None:
                raise BrokerError(
                    f"mosquitto exited with code {code} at start\n{self._log_tail()}"
                )
            if self._probe(admin, deadline):
                log.info("broker ready on %s:%d (pid %d)", self._host, self._port, proc.pid)
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"mosquitto did not accept an mTLS connection on {self.connect_host}:"
                    f"{self._port} within {self._limits.start_timeout}s\n{self._log_tail()}"
                )
            time.sleep(0.02)  # polling interval while the broker binds its port

    @staticmethod
    def _probe(admin: MqttIdentity, deadline: float) -> bool:
        session = _Session(admin, timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        try:
            session.connect()
            return True
        except BrokerError:
            return False
        finally:
            session.close()

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self._limits.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("mosquitto (pid %d) ignored SIGTERM; killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def _reload(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGHUP)

    def _supervise(self) -> None:
        failures = 0
        next_crl_check = time.monotonic() + self._limits.crl_check_interval
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            if proc is None:
                return
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if time.monotonic() >= next_crl_check:
                    next_crl_check = time.monotonic() + self._limits.crl_check_interval
                    try:
                        self.refresh_crl()
                    except Exception:  # keep supervising whatever happens
                        log.exception("refreshing the broker CRL failed")
                continue
            with self._lock:
                if self._stopping.is_set() or self._proc is not proc:
                    continue  # stopped or restarted on purpose
                ran = time.monotonic() - self._started_at
                failures = 0 if ran > STABLE_AFTER else failures + 1
            delay = min(self._limits.restart_backoff_max,
                        self._limits.restart_backoff_initial * 2 ** max(0, failures - 1))
            log.warning("mosquitto (pid %d) exited with code %s after %.1fs; restarting in %.1fs",
                        proc.pid, proc.returncode, ran, delay)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set() or self._proc is not proc:
                    continue
                self._restarts += 1
                try:
                    self._prepare()
                    self._spawn_and_wait()
                except Exception:  # keep supervising; the next round backs off further
                    log.exception("restarting mosquitto failed")


def _load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """All CRLs in a PEM file (the pki writes both issuing CAs' CRLs into one)."""
    marker = b"-----BEGIN X509 CRL-----"
    blocks = [marker + part for part in data.split(marker)[1:]]
    return [x509.load_pem_x509_crl(block) for block in blocks]

