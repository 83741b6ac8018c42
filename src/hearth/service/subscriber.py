"""A lean MQTT v5 subscriber for the ingest: one persistent session, bulk reads, batched acks.

Why not paho here: paho reads a packet's fixed header one byte per ``recv`` call, builds a
``Properties`` object and an ``MQTTMessage`` per message and dispatches callbacks under
locks. On the ingest path that was half of a worker's CPU (``bench/ingest.py`` with
py-spy: 51 % of a worker process's samples in paho's network thread), on a machine whose
two cores the publishers, Mosquitto and the database share. This client does only what
the ingest needs - and checks it:

* connect over mutual TLS (the context of :func:`hearth.service.mqtt.tls_context`: TLS 1.2+,
  verified server name, client certificate), ``CONNECT`` with username and password,
  clean start or a resumed session with a session expiry interval, a Receive Maximum
  (how many unacknowledged QoS 1 messages the broker may have in flight to us) and a
  Maximum Packet Size;
* ``SUBSCRIBE`` to the given filters (shared subscriptions included) and check every
  ``SUBACK`` reason code;
* read whatever the socket has (non-blocking, until the TLS layer has nothing decrypted
  left), parse every complete ``PUBLISH`` in the bytes read and hand them over as one list
  per read burst;
* ``PUBACK`` on request - **only** when the owner says the messages are durable
  (:meth:`Subscriber.ack`), many packets in one TLS write, in the order received (MQTT v5
  4.6.0-2) - and only for the connection the messages came on: a PUBACK sent on a later
  connection would acknowledge whatever the broker gave that packet identifier since;
* keep the connection alive (``PINGREQ`` when we have sent nothing for half the keep
  alive, honouring a Server Keep Alive), notice a dead broker (no ``PINGRESP``), and
  reconnect with exponential backoff and full jitter.

Anything that breaks the MQTT framing (a length field past the packet, a remaining length
over the limit we announced, QoS 3, a packet type a broker must not send to a subscriber)
is a protocol error: the connection is dropped and counted, and the session resumes on
the next connection - unacknowledged messages are redelivered, nothing is lost. What is
inside a well-framed ``PUBLISH`` (topic bytes, payload) is not judged here: that is the
ingest's job, so a strange message is quarantined with a reason instead of looping.

Threads: :meth:`Subscriber.start` runs one network thread that owns the socket (the
``ssl`` module does not allow a read and a write on one TLS connection at the same time).
``on_messages`` and ``on_tick`` are called in that thread: the owner may do its work there
(the ingest classifies, writes and acknowledges in them - nothing is read meanwhile, and
the Receive Maximum bounds what waits at the broker) or hand the messages to a thread of
its own. :meth:`Subscriber.ack` may be called from any thread; from another one it wakes
the network thread through a socket pair.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from hearth.errors import ConfigError
from hearth.service.mqtt import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_KEEPALIVE,
    MAX_SESSION_EXPIRY,
    MqttIdentity,
    tls_context,
)

__all__ = [
    "DEFAULT_MAX_PACKET",
    "Message",
    "ProtocolError",
    "Subscriber",
    "connect_packet",
    "parse_packets",
    "puback_packets",
    "subscribe_packet",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_PACKET = 256 * 1024
"""Largest packet we accept (and announce as Maximum Packet Size): well above the broker's
own limit (``BrokerLimits.max_packet_size``), so the broker never discards a message for us."""
_READ_CHUNK = 64 * 1024
_MAX_BURST = 2048
"""Most messages handed over in one list (then the next read starts)."""
_WRITE_TIMEOUT = 10.0

# packet types (MQTT v5 2.1.2)
_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 8, 9, 12, 13, 14
_PINGREQ_PACKET = b"\xc0\x00"
_DISCONNECT_PACKET = b"\xe0\x00"  # normal disconnection, the session is kept
_PUBACK_PACKET = struct.Struct("!BBH").pack

# property identifiers we read or write (MQTT v5 2.2.2.2)
_SESSION_EXPIRY, _SERVER_KEEP_ALIVE, _REASON_STRING = 0x11, 0x13, 0x1F
_RECEIVE_MAXIMUM, _MAXIMUM_PACKET_SIZE, _TOPIC_ALIAS = 0x21, 0x27, 0x23
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _U32, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY, 0x0B: _VARINT,
    0x11: _U32, 0x12: _UTF8, 0x13: _U16, 0x15: _UTF8, 0x16: _BINARY, 0x17: _BYTE,
    0x18: _U32, 0x19: _BYTE, 0x1A: _UTF8, 0x1C: _UTF8, 0x1F: _UTF8, 0x21: _U16,
    0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}
_CONNACK_REASONS = {
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy",
    0x8A: "banned", 0x8C: "bad authentication method", 0x90: "topic name invalid",
    0x95: "packet too large", 0x97: "quota exceeded", 0x99: "payload format invalid",
    0x9A: "retain not supported", 0x9B: "QoS not supported", 0x9C: "use another server",
    0x9D: "server moved", 0x9F: "connection rate exceeded",
}


class ProtocolError(Exception):
    """The broker sent something MQTT v5 does not allow here; the connection is dropped."""


class ConnectRefused(Exception):
    """The broker answered CONNECT with a failure reason code."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"broker refused the connection: 0x{code:02x} "
                         f"({_CONNACK_REASONS.get(code, 'unknown reason')})")


class Message(NamedTuple):
    """One PUBLISH as received: raw topic and payload bytes, packet id (0 for QoS 0).
    (A named tuple: immutable, and built in C - one is made per message.)"""

    topic: bytes
    payload: bytes
    packet_id: int
    qos: int
    dup: bool = False


# --- encoding --------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    if not 0 <= n <= 268_435_455:
        raise ValueError("variable byte integer out of range")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF or "\x00" in text:
        raise ConfigError("MQTT strings are at most 65,535 bytes and contain no NUL")
    return struct.pack("!H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def connect_packet(*, client_id: str, username: str, password: str, clean_start: bool,
                   keepalive: int, session_expiry: int, receive_maximum: int,
                   max_packet: int) -> bytes:
    """The CONNECT packet (MQTT v5, username and password, no will)."""
    props = b""
    if session_expiry:
        props += bytes((_SESSION_EXPIRY,)) + struct.pack("!I", session_expiry)
    props += bytes((_RECEIVE_MAXIMUM,)) + struct.pack("!H", receive_maximum)
    props += bytes((_MAXIMUM_PACKET_SIZE,)) + struct.pack("!I", max_packet)
    flags = 0x80 | 0x40 | (0x02 if clean_start else 0)
    body = (_utf8("MQTT") + bytes((5, flags)) + struct.pack("!H", keepalive)
            + _varint(len(props)) + props
            + _utf8(client_id) + _utf8(username) + _utf8(password))
    return _packet(_CONNECT << 4, body)


def subscribe_packet(packet_id: int, filters: Sequence[str], qos: int) -> bytes:
    """SUBSCRIBE ``filters`` at ``qos`` (no properties, default options)."""
    body = struct.pack("!H", packet_id) + b"\x00"
    for f in filters:
        body += _utf8(f) + bytes((qos,))
    return _packet((_SUBSCRIBE << 4) | 0x02, body)


def puback_packets(packet_ids: Sequence[int]) -> bytes:
    """PUBACKs for ``packet_ids`` (reason code 0 omitted, MQTT v5 3.4.2.1), concatenated."""
    return b"".join([_PUBACK_PACKET(_PUBACK << 4, 2, pid) for pid in packet_ids])


# --- decoding --------------------------------------------------------------------------------

def _read_varint(data: bytes, i: int, end: int) -> tuple[int, int]:
    """(value, index after it); ProtocolError past ``end`` or over 4 bytes."""
    value = shift = 0
    for _ in range(4):
        if i >= end:
            raise ProtocolError("variable byte integer runs past the packet")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
    raise ProtocolError("variable byte integer longer than 4 bytes")


def _properties(data: bytes, i: int, end: int) -> tuple[dict[int, object], int]:
    """Parse a property list at ``i``; returns (id -> value, index after the list)."""
    length, i = _read_varint(data, i, end)
    stop = i + length
    if stop > end:
        raise ProtocolError("properties run past the packet")
    props: dict[int, object] = {}
    while i < stop:
        pid, i = _read_varint(data, i, stop)
        kind = _PROPERTY_TYPES.get(pid)
        value: object
        if kind is None:
            raise ProtocolError(f"unknown property 0x{pid:02x}")
        if kind == _BYTE:
            need = 1
        elif kind == _U16:
            need = 2
        elif kind == _U32:
            need = 4
        elif kind == _VARINT:
            value, i = _read_varint(data, i, stop)
            props[pid] = value
            continue
        else:
            parts = 2 if kind == _PAIR else 1
            start = i
            for _ in range(parts):
                if i + 2 > stop:
                    raise ProtocolError("property runs past the packet")
                i += 2 + int.from_bytes(data[i:i + 2], "big")
            if i > stop:
                raise ProtocolError("property runs past the packet")
            props[pid] = bytes(data[start:i])
            continue
        if i + need > stop:
            raise ProtocolError("property runs past the packet")
        props[pid] = int.from_bytes(data[i:i + need], "big")
        i += need
    return props, stop


def parse_packets(data: bytes, max_packet: int = DEFAULT_MAX_PACKET,
                  ) -> tuple[list[Message], list[tuple[int, int, bytes]], int]:
    """Split ``data`` into packets.

    Returns ``(publishes, others, used)``: the PUBLISH packets as :class:`Message`, every
    other packet as ``(type, flags, body)``, and how many bytes of ``data`` the complete
    packets took (the rest is the start of a packet still arriving).

    Raises:
        ProtocolError: the framing is broken (remaining length over ``max_packet`` or
            more than 4 bytes; a PUBLISH whose topic, packet id or properties run past
            its end; QoS 3; packet id 0 at QoS 1/2; a topic alias).
    """
    publishes: list[Message] = []
    others: list[tuple[int, int, bytes]] = []
    n = len(data)
    pos = 0
    append = publishes.append
    while pos + 2 <= n:
        first = data[pos]
        # remaining length: variable byte integer, 1..4 bytes
        b = data[pos + 1]
        length = b & 0x7F
        i = pos + 2
        if b >= 0x80:
            shift = 7
            while True:
                if i >= n:
                    return publishes, others, pos  # header still arriving
                b = data[i]
                i += 1
                length |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise ProtocolError("remaining length longer than 4 bytes")
        if length + (i - pos) > max_packet:
            raise ProtocolError(f"packet of {length + (i - pos)} bytes is over the "
                                f"announced maximum of {max_packet}")
        end = i + length
        if end > n:
            break
        ptype = first >> 4
        if ptype == _PUBLISH:
            qos = (first >> 1) & 0x03
            if qos == 3:
                raise ProtocolError("PUBLISH with QoS 3")
            if length < 2:
                raise ProtocolError("PUBLISH without a topic length")
            j = i + 2 + ((data[i] << 8) | data[i + 1])
            topic = data[i + 2:j]
            pid = 0
            if qos:
                if j + 2 > end:
                    raise ProtocolError("PUBLISH without a packet identifier")
                pid = (data[j] << 8) | data[j + 1]
                if pid == 0:
                    raise ProtocolError("PUBLISH with packet identifier 0")
                j += 2
            if j >= end:
                raise ProtocolError("PUBLISH without properties")
            plen = data[j]
            if plen == 0:
                j += 1
            else:
                props, j = _properties(data, j, end)
                if _TOPIC_ALIAS in props:
                    raise ProtocolError("topic alias sent though we allow none")
            if j > end:
                raise ProtocolError("PUBLISH header runs past the packet")
            append(Message(topic, data[j:end], pid, qos, bool(first & 0x08)))
        else:
            others.append((ptype, first & 0x0F, data[i:end]))
        pos = end
    return publishes, others, pos


# --- the client ------------------------------------------------------------------------------

OnMessages = Callable[[int, dt.datetime, list[Message]], None]
"""``(generation, received_at, messages)``: called in the network thread."""
OnTick = Callable[[int], float | None]
"""``(generation) -> seconds until it wants to run again, or None``: called in the network
thread after every read (and once more when stopping, before the last acks are sent), so
the owner can do its work - and call :meth:`Subscriber.ack` - without a thread of its own."""


class Subscriber:
    """One MQTT v5 session on ``subscriptions`` at QoS ``qos``, run by a network thread.

    ``generation`` counts successful connections; every list of messages carries the
    generation it arrived on and :meth:`ack` only acknowledges messages of the current one.
    """

    def __init__(
        self,
        identity: MqttIdentity,
        subscriptions: Sequence[str],
        on_messages: OnMessages,
        *,
        on_tick: OnTick | None = None,
        client_id: str | None = None,
        qos: int = 1,
        clean_start: bool = False,
        session_expiry: int = 3600,
        receive_maximum: int = 1000,
        keepalive: int = DEFAULT_KEEPALIVE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_packet: int = DEFAULT_MAX_PACKET,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        name: str = "hearth-subscriber",
    ) -> None:
        if not subscriptions:
            raise ConfigError("a subscriber needs at least one subscription")
        if qos not in (0, 1):
            raise ConfigError("the subscriber supports QoS 0 and 1")
        if not 0 <= session_expiry <= MAX_SESSION_EXPIRY:
            raise ConfigError(f"session_expiry must be 0..{MAX_SESSION_EXPIRY} seconds")
        if not 1 <= receive_maximum <= 0xFFFF:
            raise ConfigError("receive_maximum must be 1..65535")
        if not 0 < keepalive <= 0xFFFF or not connect_timeout > 0:
            raise ConfigError("keepalive must be 1..65535 s and connect_timeout positive")
        if not 128 <= max_packet <= 268_435_460:
            raise ConfigError("max_packet must be 128 bytes .. 256 MiB")
        if not 0 < min_backoff <= max_backoff:
            raise ConfigError("0 < min_backoff <= max_backoff")
        self._identity = identity
        self._client_id = client_id if client_id is not None else identity.client_id
        # checked (length, NUL) once, up front: a bad one is a configuration error
        self._connect = connect_packet(
            client_id=self._client_id, username=identity.username,
            password=identity.password, clean_start=clean_start, keepalive=keepalive,
            session_expiry=session_expiry, receive_maximum=receive_maximum,
            max_packet=max_packet)
        self._subscribe = subscribe_packet(1, list(subscriptions), qos)
        self._n_filters = len(subscriptions)
        self._qos = qos
        self._on_messages = on_messages
        self._on_tick = on_tick
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._max_packet = max_packet
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._name = name
        self._tls = tls_context(identity)
        self._lock = threading.Lock()
        self._acks: collections.deque[int] = collections.deque()
        self._generation = 0
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._thread: threading.Thread | None = None
        self._effective_keepalive = keepalive
        self._leftover = b""
        self.stats = collections.Counter[str]()
        self.last_error = ""

    # -- public ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("subscriber already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Send the acks already requested, disconnect normally (the session stays with
        the broker for its expiry interval), stop the thread."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # still finishing a write: it owns the sockets
                log.warning("%s: network thread still running after %.0fs", self._name,
                            timeout)
                return
        self._wake_r.close()
        self._wake_w.close()

    def ack(self, generation: int, packet_ids: Sequence[int]) -> int:
        """Queue PUBACKs for ``packet_ids`` received on connection ``generation``; returns
        how many were queued (0 when that connection is gone: the broker redelivers)."""
        if not packet_ids:
            return 0
        with self._lock:
            if generation != self._generation or not self._connected.is_set():
                self.stats["acks_skipped"] += len(packet_ids)
                return 0
            self._acks.extend(packet_ids)
            wake = not self._woken
            self._woken = True
        if wake and threading.current_thread() is not self._thread:
            self._wake()  # (the network thread itself sends them right after its tick)
        return len(packet_ids)

    # -- network thread -------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (stopping)
            pass

    def _run(self) -> None:
        backoff = self._min_backoff
        while not self._stop.is_set():
            sock: ssl.SSLSocket | None = None
            try:
                sock = self._open()
                self._serve(sock)
            except ConnectRefused as e:
                self._failed("refused", e)
            except ProtocolError as e:
                self._failed("protocol_errors", e)
            except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
                self._failed("connection_errors", e)
            except Exception as e:  # a bug here or in on_messages: never end the thread
                log.exception("%s: unexpected error; reconnecting", self._name)
                self._failed("internal_errors", e)
            finally:
                # back off anew only after a connection that worked (its SUBACK granted
                # everything): one refused at SUBACK, or dropped before it, keeps growing
                if self._subscribed.is_set():
                    backoff = self._min_backoff
                with self._lock:
                    self._connected.clear()
                    self._subscribed.clear()
                    self._acks.clear()  # for the old connection: the broker redelivers
                    self._woken = False  # or the next connection's first acks wait
                if sock is not None:
                    sock.close()
            if self._stop.is_set():
                break
            delay = random.uniform(0, backoff)  # full jitter  # noqa: S311 - not secret
            backoff = min(backoff * 2, self._max_backoff)
            self._stop.wait(delay)

    def _failed(self, counter: str, error: BaseException) -> None:
        self.stats[counter] += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if not self._stop.is_set():
            log.warning("%s: %s; reconnecting", self._name, self.last_error)

    def _open(self) -> ssl.SSLSocket:
        """TCP + TLS + CONNECT/CONNACK + SUBSCRIBE sent; a connected, non-blocking socket."""
        host, port = self._identity.host, self._identity.port
        self.stats["connect_attempts"] += 1
        raw = socket.create_connection((host, port), timeout=self._connect_timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._tls.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        try:
            sock.sendall(self._connect)
            buf = b""
            deadline = time.monotonic() + self._connect_timeout
            while True:
                publishes, others, _ = parse_packets(buf, self._max_packet)
                if publishes or others:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("no CONNACK within the connect timeout")
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(_READ_CHUNK)
                if not chunk:
                    raise ConnectionError("the broker closed the connection before CONNACK")
                buf += chunk
            # The first packet must be the CONNACK. What follows it in the same read (a
            # resumed session's queued messages) belongs to this connection: _serve takes it.
            ptype = buf[0] >> 4
            if ptype != _CONNACK or len(others[0][2]) < 2:
                raise ProtocolError(f"expected CONNACK, got packet type {ptype}")
            body = others[0][2]
            length, start = _read_varint(buf, 1, len(buf))
            if body[1] >= 0x80:
                raise ConnectRefused(body[1])
            props, _ = _properties(body, 2, len(body))
            # a Server Keep Alive replaces ours (0: none required; we still ping at ours)
            keepalive = props.get(_SERVER_KEEP_ALIVE)
            self._effective_keepalive = (
                keepalive if isinstance(keepalive, int) and keepalive > 0 else self._keepalive)
            self._leftover = buf[start + length:]
            sock.settimeout(_WRITE_TIMEOUT)
            sock.sendall(self._subscribe)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._generation += 1
            self._connected.set()
        self.stats["connects"] += 1
        return sock

    def _serve(self, sock: ssl.SSLSocket) -> None:
        rbuf = bytearray(_READ_CHUNK)
        view = memoryview(rbuf)
        pending = bytearray(self._leftover)
        read_cap = max(_READ_CHUNK * 4, self._max_packet)
        last_sent = time.monotonic()
        ping_sent = 0.0
        wake = self._wake_r
        with self._lock:
            generation = self._generation
        unparsed = bool(pending)  # bytes that came with the CONNACK: parse before waiting
        tick_at: float | None = None  # when on_tick asked to run again
        while not self._stop.is_set():
            now = time.monotonic()
            half = self._effective_keepalive / 2
            if ping_sent:
                if now - ping_sent > max(self._connect_timeout, half):
                    raise TimeoutError("no PINGRESP: the broker is not answering")
                timeout = max(0.0, ping_sent + max(self._connect_timeout, half) - now)
            elif now - last_sent >= half:
                self._write(sock, _PINGREQ_PACKET)
                last_sent = ping_sent = now
                self.stats["pings"] += 1
                continue
            else:
                timeout = last_sent + half - now
            if tick_at is not None:
                timeout = max(0.0, min(timeout, tick_at - now))
            if sock.pending() == 0 and not unparsed:  # nothing decrypted waiting in TLS
                select.select((sock, wake), (), (), timeout)
            unparsed = False
            # read everything the TLS layer can give without blocking
            closed = False
            while len(pending) < read_cap:
                try:
                    n = sock.recv_into(view)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                if n == 0:
                    closed = True
                    break
                pending += view[:n]
            if pending:
                data = bytes(pending)
                publishes, others, used = parse_packets(data, self._max_packet)
                del pending[:used]
                if others:
                    ping_sent = self._control(others, ping_sent)
                if publishes:
                    if any(m.qos > self._qos for m in publishes):
                        raise ProtocolError(f"PUBLISH above the granted QoS {self._qos}")
                    received_at = dt.datetime.now(dt.UTC)
                    self.stats["received"] += len(publishes)
                    for k in range(0, len(publishes), _MAX_BURST):
                        self._on_messages(generation, received_at, publishes[k:k + _MAX_BURST])
            if closed:
                raise ConnectionError("the broker closed the connection")
            if self._on_tick is not None:
                wait = self._on_tick(generation)
                tick_at = None if wait is None else time.monotonic() + wait
            try:
                while wake.recv(4096):
                    pass
            except BlockingIOError:
                pass
            with self._lock:
                acks = list(self._acks)
                self._acks.clear()
                self._woken = False
            if acks:
                self._write(sock, puback_packets(acks))
                self.stats["acked"] += len(acks)
                last_sent = time.monotonic()
        # stopping: the owner's last tick, what was acknowledged, then a normal DISCONNECT
        if self._on_tick is not None:
            self._on_tick(generation)
        with self._lock:
            acks = list(self._acks)
            self._acks.clear()
        try:
            self._write(sock, puback_packets(acks) + _DISCONNECT_PACKET)
            self.stats["acked"] += len(acks)
        except OSError:
            pass

    def _control(self, packets: list[tuple[int, int, bytes]], ping_sent: float) -> float:
        for ptype, _flags, body in packets:
            if ptype == _PINGRESP:
                ping_sent = 0.0
            elif ptype == _SUBACK:
                if len(body) < 3 or int.from_bytes(body[:2], "big") != 1:
                    raise ProtocolError("SUBACK for a subscription we did not send")
                _, i = _properties(body, 2, len(body))
                codes = body[i:]
                if len(codes) != self._n_filters:
                    raise ProtocolError("SUBACK with the wrong number of reason codes")
                if any(c >= 0x80 for c in codes):
                    raise ProtocolError(
                        "the broker refused a subscription: "
                        + ", ".join(f"0x{c:02x}" for c in codes))
                self._subscribed.set()
            elif ptype == _DISCONNECT:
                code = body[0] if body else 0
                props = _properties(body, 1, len(body))[0] if len(body) > 1 else {}
                reason = props.get(_REASON_STRING, b"")
                text = reason[2:].decode("utf-8", "replace") if isinstance(reason, bytes) else ""
                raise ConnectionError(f"the broker disconnected us: 0x{code:02x} {text}".strip())
            else:
                raise ProtocolError(f"unexpected packet type {ptype} from the broker")
        return ping_sent

    def _write(self, sock: ssl.SSLSocket, data: bytes) -> None:
        sock.settimeout(_WRITE_TIMEOUT)
        try:
            sock.sendall(data)
        finally:
            sock.setblocking(False)
