"""The unit's link to the broker: MQTT v5 over mutual TLS, with orderly reconnection.

Security (guidelines 5 and 6)
    TLS 1.2 or later only; the broker's certificate must chain to the unit's own trust
    anchor (``ca.pem``) and name the host the unit connects to (hostname check on). The unit
    proves itself with its certificate and key from the :class:`~.keystore.KeyStore`, and
    logs in with username = client id = its device id and its own random password (the
    broker binds all three together). The unit subscribes to its own command topic only.
    The password is never logged.

Reconnection (guideline 9)
    The link runs its own connect loop on one thread (paho's automatic reconnect is not
    used). After a failed or lost connection it waits ``uniform(0, min(cap, base * 2**n))``
    seconds - exponential backoff with *full jitter*, so a fleet that lost the broker at
    the same moment does not come back at the same moment - where ``n`` counts attempts
    since the last connection that stayed up ``stable_after`` seconds. Every attempt's
    time is recorded (:attr:`Link.connect_attempts`).

Delivery
    The link pulls messages from a source (the outbox) oldest first, publishes them with
    QoS 1 and keeps at most ``max_inflight`` unacknowledged (also no more than the broker's
    Receive Maximum). PUBACKs are handed back (``on_acked``) so the outbox can delete what
    the broker has; anything unacknowledged when a connection drops is published again, in
    order, on the next one (at-least-once: the cloud deduplicates by sequence number). A
    message the broker refuses (PUBACK with a failure reason, e.g. not authorised) is
    handed back too and counted in ``refused``: retrying it would block the queue forever.

    Commands arrive on the unit's command topic (QoS 1, persistent session of
    ``session_expiry`` seconds so commands sent during a short outage are not lost) and are
    passed to ``on_command`` on the link thread; the PUBACK goes to the broker only after
    ``on_command`` returns, so a command whose result is durably queued is acknowledged and
    one interrupted by a crash is redelivered. The broker is also told not to send packets
    larger than the protocol limit (MQTT v5 Maximum Packet Size).

Request/response channels
    :meth:`Link.add_subscription` adds one more of the unit's own topics (the update offer
    topic) with its handler, and :meth:`Link.send_now` publishes an ephemeral message
    (the update check) on the next loop turn without going through the outbox: such a
    request is only worth sending while connected, and is simply asked again if lost.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from hearth.device.keystore import KeyStore
from hearth.errors import DeviceError
from hearth.protocol import MAX_PAYLOAD_BYTES, command_topic

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_MAX_INFLIGHT",
    "Backoff",
    "Link",
    "Outgoing",
    "make_tls_context",
]

DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_CAP = 300.0
DEFAULT_MAX_INFLIGHT = 32
DEFAULT_KEEPALIVE = 30
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_STABLE_AFTER = 30.0
DEFAULT_SESSION_EXPIRY = 300
_MAX_ATTEMPT_RECORDS = 1_000
_PACKET_OVERHEAD = 1_024  # fixed header, topic, properties around a payload
_MAX_EXPONENT = 62

_log = logging.getLogger("hearth.device.link")


class Backoff:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))``.

    ``rng`` defaults to :class:`random.SystemRandom` (no shared seed across a fleet); tests
    pass a seeded :class:`random.Random`.
    """

    def __init__(
        self,
        *,
        base: float = DEFAULT_BACKOFF_BASE,
        cap: float = DEFAULT_BACKOFF_CAP,
        rng: random.Random | None = None,
    ) -> None:
        if not base > 0 or not cap >= base:
            raise ValueError("backoff needs base > 0 and cap >= base")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng if rng is not None else random.SystemRandom()

    def bound(self, attempt: int | None = None) -> float:
        """The upper limit of the delay for ``attempt`` (default: the next one)."""
        n = self.attempt if attempt is None else attempt
        return min(self.cap, self.base * 2.0 ** min(max(n, 0), _MAX_EXPONENT))

    def next_delay(self) -> float:
        """Draw the next delay and count the attempt."""
        delay = self._rng.uniform(0.0, self.bound())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class Outgoing(Protocol):
    """A message the link can publish (the outbox's :class:`~.outbox.Message`)."""

    @property
    def seq(self) -> int: ...

    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


def make_tls_context(ca_file: Path, keystore: KeyStore) -> ssl.SSLContext:
    """Client TLS context: TLS >= 1.2, broker verified against ``ca_file`` with hostname
    check, client certificate and key from ``keystore``. Raises :class:`DeviceError`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
        cert_file, key_file = keystore.tls_credentials()
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as e:
        raise DeviceError(f"cannot set up TLS credentials: {e}") from e
    return ctx


class Link:
    """MQTT v5 over mutual TLS with its own reconnect loop, on a thread of its own.

    ``fetch(n, after)`` returns up to ``n`` messages with ``seq > after``, oldest first;
    ``on_acked(seqs)`` is called with the sequence numbers the broker acknowledged (or
    refused); ``on_command(payload)`` with every message on the command topic;
    ``on_connected()`` after each successful connect. All callbacks run on the link thread
    and must not raise (a raise is logged and the connection is dropped).
    """

    def __init__(
        self,
        *,
        device_id: str,
        host: str,
        port: int,
        password: str,
        ca_file: Path,
        keystore: KeyStore,
        fetch: Callable[[int, int], Sequence[Outgoing]],
        on_acked: Callable[[list[int]], None],
        on_command: Callable[[bytes], None],
        on_connected: Callable[[], object] | None = None,
        backoff: Backoff | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        keepalive: int = DEFAULT_KEEPALIVE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        stable_after: float = DEFAULT_STABLE_AFTER,
        session_expiry: int = DEFAULT_SESSION_EXPIRY,
        poll_interval: float = 0.05,
    ) -> None:
        if not 1 <= max_inflight <= 65535:
            raise ValueError("max_inflight must be 1..65535")
        self.device_id = device_id
        self.host = host
        self.port = port
        self._password = password
        self._tls = make_tls_context(ca_file, keystore)
        self._fetch = fetch
        self._on_acked = on_acked
        self._on_command = on_command
        self._on_connected = on_connected
        self.backoff = backoff if backoff is not None else Backoff()
        self.max_inflight = max_inflight
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.stable_after = stable_after
        self.session_expiry = session_expiry
        self.poll_interval = poll_interval
        self._cmd_topic = command_topic(device_id)
        self._extra: dict[str, Callable[[bytes], None]] = {}
        self._direct: deque[tuple[str, bytes]] = deque(maxlen=16)

        self._stop = threading.Event()
        self._wake = threading.Event()
        self._wake.set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._attempts: deque[float] = deque(maxlen=_MAX_ATTEMPT_RECORDS)
        self._connected = threading.Event()
        # per-session state, touched by the link thread only
        self._session_state = "idle"
        self._inflight: dict[int, int] = {}
        self._last_sent = 0
        self._acked: list[int] = []
        self._window = max_inflight
        # counters
        self.published = 0
        self.refused = 0
        self.connects = 0
        self.commands_received = 0
        self.subscribed = False

    def __repr__(self) -> str:
        return f"Link({self.device_id}@{self.host}:{self.port})"

    # -- public ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="hearth-link", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly and end the link thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def notify(self) -> None:
        """Tell the link there is something new to publish."""
        self._wake.set()

    def add_subscription(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Also subscribe to ``topic`` (one of the unit's own; the broker's ACL decides) and
        pass its messages to ``handler`` on the link thread. Call before :meth:`start`."""
        if topic == self._cmd_topic or not topic.startswith(self._cmd_topic.rsplit("/", 1)[0]):
            raise ValueError("only another topic of this unit can be added")
        self._extra[topic] = handler

    def send_now(self, topic: str, payload: bytes) -> bool:
        """Publish ``payload`` on ``topic`` (QoS 1, not persisted) on the next loop turn.

        Returns ``False`` (nothing queued) when not connected. At most 16 wait at a time."""
        if not self.connected or len(payload) > MAX_PAYLOAD_BYTES:
            return False
        self._direct.append((topic, payload))
        self._wake.set()
        return True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connect_attempts(self) -> list[float]:
        """Monotonic times of the recent connection attempts, oldest first."""
        with self._lock:
            return list(self._attempts)

    # -- connect loop ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._attempts.append(time.monotonic())
            try:
                self._session()
            except Exception:  # noqa: BLE001 - the link must outlive any one connection
                _log.exception("link session failed")
            finally:
                self._connected.clear()
            if self._stop.is_set():
                break
            delay = self.backoff.next_delay()
            _log.info("reconnecting in %.2fs (attempt %d)", delay, self.backoff.attempt)
            self._stop.wait(delay)

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        client.username_pw_set(self.device_id, self._password)
        client.tls_set_context(self._tls)
        client.connect_timeout = self.connect_timeout
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        return client

    def _session(self) -> None:
        """One connection: connect, run until it drops or stop() is called, clean up."""
        self._session_state = "connecting"
        self._inflight.clear()
        self._acked.clear()
        self._last_sent = 0
        self._window = self.max_inflight
        self._wake.set()
        client = self._new_client()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry
        props.MaximumPacketSize = MAX_PAYLOAD_BYTES + _PACKET_OVERHEAD
        props.ReceiveMaximum = 16
        try:
            try:
                client.connect(
                    self.host, self.port, self.keepalive, clean_start=False, properties=props
                )
            except ssl.SSLError as e:
                _log.warning("TLS with %s:%d failed: %s", self.host, self.port, e.reason)
                return
            except (OSError, ValueError) as e:
                _log.warning("cannot reach %s:%d: %s", self.host, self.port, e)
                return
            deadline = time.monotonic() + self.connect_timeout
            while self._session_state == "connecting" and not self._stop.is_set():
                rc = client.loop(self.poll_interval)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or time.monotonic() > deadline:
                    _log.warning("no CONNACK from %s:%d (%s)", self.host, self.port, rc.name)
                    return
            if self._session_state != "connected":
                return
            self._connected_loop(client)
        finally:
            self._connected.clear()
            self._session_state = "idle"
            self._flush_acks()
            client._reset_sockets()  # close the socket and paho's wake-up socket pair now

    def _connected_loop(self, client: mqtt.Client) -> None:
        connected_at = time.monotonic()
        stable = False
        while not self._stop.is_set():
            rc = client.loop(self.poll_interval)
            self._flush_acks()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._session_state != "connected":
                _log.info("connection to %s:%d lost (%s)", self.host, self.port, rc.name)
                return
            if not stable and time.monotonic() - connected_at >= self.stable_after:
                stable = True
                self.backoff.reset()
            self._pump(client)
        # stop requested: say goodbye properly so the broker does not wait for keepalive
        client.disconnect()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self._flush_acks()

    def _pump(self, client: mqtt.Client) -> None:
        while self._direct:
            topic, payload = self._direct.popleft()
            try:
                client.publish(topic, payload, qos=1)  # its PUBACK is not tracked
            except ValueError:
                _log.error("dropping an unpublishable request")
        room = self._window - len(self._inflight)
        if room <= 0 or not self._wake.is_set():
            return
        self._wake.clear()
        batch = self._fetch(room, self._last_sent)
        for msg in batch:
            try:
                info = client.publish(msg.topic, msg.payload, qos=1)
            except ValueError:  # unpublishable (bad topic): drop it rather than loop on it
                _log.error("dropping unpublishable message seq=%d", msg.seq)
                self.refused += 1
                self._acked.append(msg.seq)
                self._last_sent = msg.seq
                continue
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._wake.set()
                return
            self._inflight[info.mid] = msg.seq
            self._last_sent = msg.seq
        if len(batch) >= room:
            self._wake.set()  # there may be more once the window opens

    def _flush_acks(self) -> None:
        if not self._acked:
            return
        acked, self._acked = self._acked, []
        try:
            self._on_acked(acked)
        except Exception:  # noqa: BLE001 - at worst a message is sent twice
            _log.exception("recording acknowledged messages failed")

    # -- paho callbacks (link thread) ---------------------------------------------------

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            _log.warning("broker %s:%d refused the connection: %s", self.host, self.port, reason)
            self._session_state = "refused"
            return
        self._session_state = "connected"
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        if isinstance(receive_max, int) and receive_max > 0:
            self._window = min(self.max_inflight, receive_max)
        client.subscribe([(self._cmd_topic, 1), *((t, 1) for t in self._extra)])
        self.connects += 1
        self._connected.set()
        _log.info("connected to %s:%d as %s", self.host, self.port, self.device_id)
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:  # noqa: BLE001
                _log.exception("on_connected handler failed")

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if self._session_state == "connected":
            self._session_state = "lost"
        self.subscribed = False
        _log.info("disconnected from %s:%d: %s", self.host, self.port, reason)

    def _handle_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        self.subscribed = not failed
        if failed:
            _log.warning("subscription to the command topic refused: %s", failed[0])

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return
        if reason.is_failure:
            self.refused += 1
            _log.warning("broker refused message seq=%d: %s", seq, reason)
        else:
            self.published += 1
        self._acked.append(seq)
        self._wake.set()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""
        extra = self._extra.get(topic)
        if extra is not None:
            try:
                extra(bytes(msg.payload))
            except Exception:  # noqa: BLE001 - a bad message must never take the link down
                _log.exception("handler for %s failed", topic)
            return
        if topic != self._cmd_topic:
            _log.warning("ignoring a message on an unexpected topic")
            return
        self.commands_received += 1
        try:
            self._on_command(bytes(msg.payload))
        except Exception:  # noqa: BLE001 - a bad command must never take the link down
            _log.exception("command handler failed")
