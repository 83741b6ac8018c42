"""The lean MQTT v5 subscriber of the ingest (:mod:`hearth.service.subscriber`).

Without a broker: the packets it writes, checked byte by byte against the MQTT v5 layout,
and its parser on whole, cut, long, malformed and random buffers (test helpers encode
PUBLISH packets independently of the module under test).

Against a real Mosquitto over mutual TLS (the ``hearth-ingest`` identity, the ingest's
shared subscriptions, units publishing with paho): delivery, acknowledgements only on the
connection the messages came on, redelivery of what was not acknowledged, refused
credentials, certificates and subscriptions, a broker restart, keepalive and a broker that
stops answering.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hearth.errors import ConfigError
from hearth.pki import MakerPKI, cert_to_pem, generate_key, key_from_pem, key_to_pem
from hearth.service import subscriber as subscriber_module
from hearth.service.broker import Broker
from hearth.service.ingest import SUBSCRIPTIONS
from hearth.service.mqtt import MqttIdentity
from hearth.service.subscriber import (
    DEFAULT_MAX_PACKET,
    Message,
    ProtocolError,
    Subscriber,
    connect_packet,
    parse_packets,
    puback_packets,
    subscribe_packet,
)
from tests.broker.conftest import Peer, Unit
from tests.helpers import wait_until
from tests.service import messages as m
from tests.service.conftest import Fleet

if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
    pytest.fail("Mosquitto is not installed (apt-get install mosquitto)", pytrace=False)


# --- an independent encoder for the parser tests -----------------------------------------------

def vbi(n: int) -> bytes:
    """MQTT variable byte integer (written here again, not taken from the module)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def publish(topic: bytes, payload: bytes, *, qos: int = 0, pid: int = 0, dup: bool = False,
            props: bytes = b"") -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1)
    body = u16(len(topic)) + topic + (u16(pid) if qos else b"") + vbi(len(props)) + props
    return bytes((first,)) + vbi(len(body) + len(payload)) + body + payload


def raw(first: int, body: bytes) -> bytes:
    """A packet with a hand-made (possibly broken) body."""
    return bytes((first,)) + vbi(len(body)) + body


PINGRESP = b"\xd0\x00"
SUBACK_OK = b"\x90\x06\x00\x01\x00\x01\x01\x01"  # packet id 1, no properties, 3 x QoS 1


# --- encoders ----------------------------------------------------------------------------------

def test_connect_packet_layout() -> None:
    packet = connect_packet(client_id="c1", username="u", password="pw", clean_start=True,
                            keepalive=60, session_expiry=3600, receive_maximum=100,
                            max_packet=262_144)
    assert packet == (
        b"\x10\x23"                      # CONNECT, remaining length 35
        b"\x00\x04MQTT\x05"              # protocol name, version 5
        b"\xc2"                          # user name + password + clean start
        b"\x00\x3c"                      # keep alive 60 s
        b"\x0d"                          # properties: 13 bytes
        b"\x11\x00\x00\x0e\x10"          # session expiry interval 3600
        b"\x21\x00\x64"                  # receive maximum 100
        b"\x27\x00\x04\x00\x00"          # maximum packet size 262144
        b"\x00\x02c1"                    # client identifier
        b"\x00\x01u"                     # user name
        b"\x00\x02pw"                    # password
    )


def test_connect_packet_resumed_session_without_expiry_and_a_long_password() -> None:
    packet = connect_packet(client_id="c1", username="u", password="p" * 200,
                            clean_start=False, keepalive=65535, session_expiry=0,
                            receive_maximum=65535, max_packet=128)
    # 228 bytes of remaining length: two bytes (0xe4 0x01)
    assert packet[:3] == b"\x10\xe4\x01"
    assert packet[3:13] == b"\x00\x04MQTT\x05\xc0\xff\xff"   # no clean start
    assert packet[13:22] == b"\x08\x21\xff\xff\x27\x00\x00\x00\x80"  # no session expiry
    assert packet[22:] == b"\x00\x02c1\x00\x01u\x00\xc8" + b"p" * 200
    assert len(packet) == 3 + 228


@pytest.mark.parametrize("client_id", ["nul\x00inside", "x" * 65_536])
def test_connect_packet_refuses_strings_mqtt_cannot_carry(client_id: str) -> None:
    with pytest.raises(ConfigError):
        connect_packet(client_id=client_id, username="u", password="p", clean_start=True,
                       keepalive=60, session_expiry=0, receive_maximum=10, max_packet=1024)


def test_subscribe_packet_layout() -> None:
    assert subscribe_packet(1, ["a/b", "$share/g/+/c"], 1) == (
        b"\x82\x18"                      # SUBSCRIBE (flags 0b0010), remaining length 24
        b"\x00\x01"                      # packet identifier 1
        b"\x00"                          # no properties
        b"\x00\x03a/b\x01"               # filter, options: QoS 1
        b"\x00\x0c$share/g/+/c\x01"
    )
    assert subscribe_packet(0x1234, ["t"], 0) == b"\x82\x07\x12\x34\x00\x00\x01t\x00"


def test_puback_packets_layout() -> None:
    assert puback_packets([1, 0x1234, 0xFFFF]) == (
        b"\x40\x02\x00\x01" b"\x40\x02\x12\x34" b"\x40\x02\xff\xff")
    assert puback_packets([]) == b""


def test_subscriber_validates_its_settings(tmp_path: Path) -> None:
    ident = MqttIdentity(host="127.0.0.1", port=1, username="u", password="p",
                         client_id="c", certfile=tmp_path / "none.pem",
                         keyfile=tmp_path / "none.key", cafile=tmp_path / "none-ca.pem")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"qos": 2}, "QoS 0 and 1"), ({"session_expiry": -1}, "session_expiry"),
        ({"session_expiry": 2**32}, "session_expiry"), ({"receive_maximum": 0}, "receive_max"),
        ({"receive_maximum": 65_536}, "receive_max"), ({"keepalive": 0}, "keepalive"),
        ({"keepalive": 65_536}, "keepalive"), ({"connect_timeout": 0}, "connect_timeout"),
        ({"max_packet": 127}, "max_packet"), ({"min_backoff": 0}, "min_backoff"),
        ({"min_backoff": 2.0, "max_backoff": 1.0}, "min_backoff"),
        ({"client_id": "nul\x00"}, "NUL"),
    ]
    # (the TLS files are missing: a check that let a bad setting through would end at
    # "TLS files" instead, and not match)
    for kwargs, reason in bad:
        with pytest.raises(ConfigError, match=reason):
            Subscriber(ident, SUBSCRIPTIONS, lambda *_: None, **kwargs)
    with pytest.raises(ConfigError, match="at least one subscription"):
        Subscriber(ident, [], lambda *_: None)
    with pytest.raises(ConfigError, match="TLS files"):  # valid settings, missing files
        Subscriber(ident, SUBSCRIPTIONS, lambda *_: None)


# --- the parser: what it accepts --------------------------------------------------------------

def test_publish_helper_matches_the_mqtt_layout() -> None:
    # the parser tests below rely on this helper: check it against hand-written bytes
    assert publish(b"a/b", b"hi", qos=1, pid=0x1234) == b"\x32\x0a\x00\x03a/b\x12\x34\x00hi"
    assert publish(b"t", b"", dup=True, props=b"\x01\x01") == b"\x38\x06\x00\x01t\x02\x01\x01"


USER_PROPERTY = b"\x26" + u16(1) + b"k" + u16(2) + b"vv"
MANY_PROPERTIES = (
    b"\x01\x01"                          # payload format indicator: UTF-8
    + b"\x02\x00\x00\x00\x3c"            # message expiry interval 60 s
    + b"\x03" + u16(16) + b"application/json"  # content type
    + b"\x08" + u16(5) + b"reply"        # response topic
    + b"\x09" + u16(3) + b"\x00\x01\x02"  # correlation data
    + b"\x0b\xff\xff\xff\x7f"            # subscription identifier, 4-byte varint
    + USER_PROPERTY
)


def stream() -> tuple[bytes, list[Message], list[tuple[int, int, bytes]], list[int]]:
    """Several packets in one buffer: the bytes, the messages and other packets in them,
    and the offset after every packet."""
    packets = [
        (publish(b"hearth/v1/d/a/telemetry", b'{"seq":1}', qos=1, pid=1),
         Message(b"hearth/v1/d/a/telemetry", b'{"seq":1}', 1, 1, False)),
        (publish(b"q0", b"fire and forget"), Message(b"q0", b"fire and forget", 0, 0, False)),
        (PINGRESP, None),
        (publish(b"hearth/v1/d/b/event", b"x" * 300, qos=1, pid=0xFFFF, dup=True,
                 props=MANY_PROPERTIES),
         Message(b"hearth/v1/d/b/event", b"x" * 300, 0xFFFF, 1, True)),
        (publish(b"", b"", qos=0), Message(b"", b"", 0, 0, False)),  # empty topic and payload
        (SUBACK_OK, None),
        (publish(b"t", b"\x00\xff" * 70, qos=1, pid=2, props=USER_PROPERTY),
         Message(b"t", b"\x00\xff" * 70, 2, 1, False)),
    ]
    data = b"".join(p for p, _ in packets)
    messages = [msg for _, msg in packets if msg is not None]
    others = [(13, 0, b""), (9, 0, SUBACK_OK[2:])]
    ends, pos = [0], 0
    for p, _ in packets:
        pos += len(p)
        ends.append(pos)
    return data, messages, others, ends


def test_parse_several_packets_in_one_buffer() -> None:
    data, messages, others, _ = stream()
    publishes, got_others, used = parse_packets(data)
    assert publishes == messages
    assert got_others == others
    assert used == len(data)
    assert all(type(msg.topic) is bytes and type(msg.payload) is bytes for msg in publishes)


def test_parse_a_buffer_cut_at_every_offset() -> None:
    data, messages, others, ends = stream()
    for cut in range(len(data) + 1):
        first, first_others, used = parse_packets(data[:cut])
        assert used == max(e for e in ends if e <= cut), f"cut at {cut}"
        assert len(first) + len(first_others) == ends.index(used)
        # the unconsumed tail is the start of the next packet: fed again with the rest
        # of the stream, it yields exactly the messages that were missing
        rest, rest_others, rest_used = parse_packets(data[used:])
        assert rest_used == len(data) - used
        assert first + rest == messages, f"cut at {cut}"
        assert first_others + rest_others == others


@pytest.mark.parametrize(("length", "encoded"), [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
    (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
])
def test_remaining_length_of_one_to_four_bytes(length: int, encoded: bytes) -> None:
    if length == 0:  # a PINGRESP: the smallest packet
        packet = b"\xd0" + encoded
        assert parse_packets(packet) == ([], [(13, 0, b"")], 2)
        return
    topic = b"hearth/v1/d/a/telemetry"
    payload = bytes(i % 251 for i in range(length - 2 - len(topic) - 1))
    packet = publish(topic, payload)
    assert packet[1:1 + len(encoded)] == encoded
    size = len(packet)
    assert parse_packets(packet, size) == ([Message(topic, payload, 0, 0)], [], size)
    # every prefix is a packet still arriving, never an error
    for cut in (1, 2, len(encoded), 1 + len(encoded), size - 1):
        assert parse_packets(packet[:cut], size) == ([], [], 0)
    with pytest.raises(ProtocolError, match="over the announced maximum"):
        parse_packets(packet, size - 1)


def test_the_largest_remaining_length_is_a_packet_still_arriving() -> None:
    assert parse_packets(b"\x30\xff\xff\xff\x7f", 268_435_460) == ([], [], 0)


def test_a_packet_over_the_maximum_is_refused_before_its_body_arrives() -> None:
    # 128 bytes of remaining length + 3 of header = 131
    assert parse_packets(b"\x30\x80\x01", max_packet=131) == ([], [], 0)
    with pytest.raises(ProtocolError, match="131 bytes is over the announced maximum of 130"):
        parse_packets(b"\x30\x80\x01", max_packet=130)
    # the default maximum
    big = b"\x30" + vbi(DEFAULT_MAX_PACKET)
    with pytest.raises(ProtocolError, match="over the announced maximum"):
        parse_packets(big)


# --- the parser: what it refuses ---------------------------------------------------------------

GOOD = publish(b"hearth/v1/d/a/telemetry", b"{}", qos=1, pid=9)
TAIL = PINGRESP + GOOD  # after a broken packet: a bound past the packet would read these


def with_props(props: bytes, first: int = 0x30) -> bytes:
    """A PUBLISH on topic ``t`` whose property section (length included) is ``props``."""
    return raw(first, u16(1) + b"t" + props)


BROKEN: list[tuple[str, bytes, str]] = [  # (id, bytes, reason)
    ("5-byte-length", b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
    ("5-byte-length-cut", b"\x30\x80\x80\x80\x80", "longer than 4 bytes"),
    ("5-byte-length-other", b"\xd0\x80\x80\x80\x80\x01", "longer than 4 bytes"),
    ("qos-3", raw(0x36, u16(1) + b"t" + u16(1) + b"\x00"), "QoS 3"),
    ("pid-0", publish(b"t", b"x", qos=1, pid=0), "packet identifier 0"),
    ("qos1-without-pid", with_props(b"\x00", 0x32) + TAIL, "without a packet identifier"),
    ("no-topic-length", raw(0x30, b"\x00") + TAIL, "without a topic length"),
    ("topic-past-packet-qos0", raw(0x30, u16(40) + b"short") + TAIL, "without properties"),
    ("topic-past-packet-qos1", raw(0x32, u16(40) + b"short") + TAIL,
     "without a packet identifier"),
    ("no-properties", with_props(b"") + TAIL, "without properties"),
    ("properties-past-packet", with_props(b"\x0a\x01\x01") + TAIL,
     "properties run past the packet"),
    ("u32-property-past-list", with_props(b"\x03\x02\x00\x00") + TAIL,
     "property runs past the packet"),
    ("string-property-past-list", with_props(b"\x04\x03\x00\x10a") + TAIL,
     "property runs past the packet"),
    ("user-property-value-past-list", with_props(b"\x07\x26\x00\x01k\x00\x09v") + TAIL,
     "property runs past the packet"),
    ("user-property-cut", with_props(b"\x03\x26\x00\x01") + TAIL,
     "property runs past the packet"),
    ("varint-property-too-long", with_props(b"\x06\x0b\x80\x80\x80\x80\x01") + TAIL,
     "longer than 4 bytes"),
    ("varint-property-cut", with_props(b"\x02\x0b\x80") + TAIL, "runs past the packet"),
    ("unknown-property", with_props(b"\x02\x7f\x00"), "unknown property 0x7f"),
    ("unassigned-property", with_props(b"\x02\x14\x00"), "unknown property 0x14"),
    ("topic-alias", with_props(b"\x03\x23\x00\x01"), "topic alias"),
    ("topic-alias-after-a-good-packet", GOOD + with_props(b"\x03\x23\x00\x01"),
     "topic alias"),
]


@pytest.mark.parametrize(("data", "reason"),
                         [pytest.param(d, r, id=i) for i, d, r in BROKEN])
def test_broken_framing_is_a_protocol_error(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_packets(data)


def test_random_and_mutated_buffers_parse_or_raise_protocol_error() -> None:
    """A few thousand seeded random and mutated buffers: the parser returns or raises
    ProtocolError - never another exception - and ``used`` is always a packet boundary
    inside the buffer."""
    rng = random.Random(0x4EA27)
    data0, _, _, _ = stream()
    seeds = [data0, GOOD * 3, TAIL, *(d for _, d, _ in BROKEN)]
    outcomes: Counter[str] = Counter()
    for n in range(6000):
        how = n % 5
        if how == 0:
            data = rng.randbytes(rng.randrange(0, 80))
        else:
            buf = bytearray(rng.choice(seeds))
            if how in (1, 2):  # change a few bytes (the header bytes most of the time)
                for _ in range(rng.randrange(1, 4)):
                    if buf:
                        k = rng.randrange(min(len(buf), 12 if rng.random() < 0.7 else len(buf)))
                        buf[k] = rng.randrange(256)
            elif how == 3:  # cut and splice
                a = rng.randrange(len(buf) + 1)
                buf = buf[:a] + bytearray(rng.randbytes(rng.randrange(0, 6))) + buf[a:]
                buf = buf[:rng.randrange(len(buf) + 1)]
            else:  # set a length field (topic, properties) to something odd
                if len(buf) > 4:
                    k = rng.randrange(2, len(buf) - 1)
                    buf[k:k + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x80\x80", b"\x7f\x00"])
            data = bytes(buf)
        max_packet = rng.choice([128, 1024, DEFAULT_MAX_PACKET])
        try:
            publishes, others, used = parse_packets(data, max_packet)
        except ProtocolError:
            outcomes["refused"] += 1
            continue
        outcomes["parsed"] += 1
        assert 0 <= used <= len(data)
        assert used > 0 or not (publishes or others)
        # ``used`` is a packet boundary: the consumed part parses the same on its own, and
        # the rest is the start of one packet still arriving
        assert parse_packets(data[:used], max_packet) == (publishes, others, used)
        assert parse_packets(data[used:], max_packet) == ([], [], 0)
        for msg in publishes:
            assert msg.qos in (0, 1, 2)
            assert (msg.packet_id == 0) == (msg.qos == 0)
            assert len(msg.topic) + len(msg.payload) <= used
    # both paths were exercised a good deal (a generator that never hits one tests little)
    assert outcomes["refused"] > 1000 and outcomes["parsed"] > 1000, outcomes


# --- live: a real Mosquitto --------------------------------------------------------------------

class Inbox:
    """``on_messages`` of a test subscriber: keeps every burst with its generation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bursts: list[tuple[int, list[Message]]] = []

    def __call__(self, generation: int, _received_at: object, messages: list[Message]) -> None:
        with self._lock:
            self.bursts.append((generation, list(messages)))

    def messages(self, generation: int | None = None) -> list[Message]:
        with self._lock:
            return [msg for g, burst in self.bursts for msg in burst
                    if generation is None or g == generation]

    def payloads(self, generation: int | None = None) -> list[bytes]:
        return [msg.payload for msg in self.messages(generation)]

    def find(self, payload: bytes, generation: int | None = None) -> Message | None:
        return next((msg for msg in self.messages(generation) if msg.payload == payload), None)


SubscriberFactory = Callable[..., Subscriber]
PublisherFactory = Callable[[str], Peer]


@pytest.fixture
def ingest(broker: Broker) -> MqttIdentity:
    return broker.identity("hearth-ingest")


@pytest.fixture
def subscribers(broker: Broker) -> Iterator[SubscriberFactory]:
    """``subscribers(identity, inbox, subscriptions=SUBSCRIPTIONS, **kw)``: a started
    subscriber with quick reconnects; all are stopped at the end."""
    made: list[Subscriber] = []

    def make(identity: MqttIdentity, inbox: Inbox,
             subscriptions: tuple[str, ...] | list[str] = SUBSCRIPTIONS,
             **kwargs: Any) -> Subscriber:
        kwargs.setdefault("min_backoff", 0.05)
        kwargs.setdefault("max_backoff", 0.3)
        kwargs.setdefault("connect_timeout", 3.0)
        sub = Subscriber(identity, subscriptions, inbox, **kwargs)
        made.append(sub)
        sub.start()
        return sub

    yield make
    for sub in made:
        sub.stop()


@pytest.fixture
def publishers(broker: Broker, minted: Fleet) -> Iterator[PublisherFactory]:
    """``publishers(device_id)``: a connected paho client of that unit."""
    made: list[Peer] = []

    def connect(device_id: str) -> Peer:
        peer = Peer(Unit(device_id, minted.directory / device_id).identity(broker))
        made.append(peer)
        assert peer.connect(), f"unit {device_id} was refused: {peer.connack}"
        return peer

    yield connect
    for peer in made:
        peer.close()


def send(unit: Peer, kind: str, payload: bytes) -> None:
    rc = unit.publish(m.topic(unit.identity.username, kind), payload)
    assert rc.value == 0, f"PUBACK {rc}"  # 0x10 would be "no matching subscribers"


def subscribed(sub: Subscriber, generation: int = 1) -> None:
    wait_until(lambda: sub.subscribed and sub.generation == generation, timeout=10,
               what=f"SUBACK on connection {generation} ({sub.last_error or 'no error'})")


@pytest.mark.broker
def test_messages_published_by_a_unit_arrive(
    ingest: MqttIdentity, subscribers: SubscriberFactory, publishers: PublisherFactory,
    minted: Fleet,
) -> None:
    inbox = Inbox()
    sub = subscribers(ingest, inbox, client_id="hearth-ingest-live1", session_expiry=0)
    subscribed(sub)
    assert sub.connected
    dev = minted.thermostats[0]
    unit = publishers(dev)
    big = random.Random(1).randbytes(12_000)  # several TLS records, 2-byte remaining length
    sent = [("telemetry", m.telemetry(dev, 1)), ("event", m.event(dev, 2)),
            ("cmd/result", b"not even json"), ("telemetry", big)]
    for kind, payload in sent:
        send(unit, kind, payload)
    wait_until(lambda: len(inbox.messages()) >= len(sent), what="all messages")
    got = inbox.messages()
    assert [(msg.topic, msg.payload) for msg in got] == [
        (m.topic(dev, kind).encode(), payload) for kind, payload in sent]
    assert all(msg.qos == 1 and 0 < msg.packet_id <= 0xFFFF and not msg.dup for msg in got)
    assert len({msg.packet_id for msg in got}) == len(sent)
    assert {g for g, _ in inbox.bursts} == {1}
    assert sub.stats["received"] == len(sent)
    assert sub.stats["acked"] == 0  # nothing is acknowledged unless the owner says so
    assert sub.ack(1, [msg.packet_id for msg in got]) == len(sent)
    wait_until(lambda: sub.stats["acked"] == len(sent), what="PUBACKs written")
    assert sub.stats["connects"] == 1 and sub.stats["protocol_errors"] == 0


@pytest.mark.broker
def test_unacknowledged_messages_are_redelivered_to_the_resumed_session(
    ingest: MqttIdentity, subscribers: SubscriberFactory, publishers: PublisherFactory,
    minted: Fleet,
) -> None:
    inbox = Inbox()
    sub = subscribers(ingest, inbox, client_id="hearth-ingest-live2", session_expiry=60)
    subscribed(sub)
    unit = publishers(minted.thermostats[0])
    for k in range(1, 5):
        send(unit, "telemetry", b"m%d" % k)
    wait_until(lambda: len(inbox.messages()) == 4, what="four messages")
    first = {msg.payload: msg.packet_id for msg in inbox.messages()}
    assert sub.ack(1, [first[b"m1"], first[b"m2"]]) == 2
    wait_until(lambda: sub.stats["acked"] == 2, what="two PUBACKs written")
    sub.stop()
    assert not sub.connected

    again = Inbox()
    resumed = subscribers(ingest, again, client_id="hearth-ingest-live2", session_expiry=60)
    subscribed(resumed)
    send(unit, "telemetry", b"m5")  # after the resumed session's backlog
    wait_until(lambda: again.find(b"m5"), what="the message sent after resuming")
    assert again.payloads() == [b"m3", b"m4", b"m5"]
    redelivered = again.messages()[:2]
    assert [msg.packet_id for msg in redelivered] == [first[b"m3"], first[b"m4"]]
    assert all(msg.dup for msg in redelivered)
    assert not again.messages()[2].dup
    assert resumed.ack(1, [msg.packet_id for msg in again.messages()]) == 3
    wait_until(lambda: resumed.stats["acked"] == 3, what="PUBACKs written")


@pytest.mark.broker
def test_a_failing_callback_does_not_end_the_subscriber(
    ingest: MqttIdentity, subscribers: SubscriberFactory, publishers: PublisherFactory,
    minted: Fleet,
) -> None:
    """A bug in ``on_messages`` is logged and counted; the subscriber reconnects and the
    message (never acknowledged) comes again on the resumed session."""
    inbox = Inbox()
    calls = {"n": 0}

    def flaky(generation: int, received_at: object, messages: list[Message]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("bug in the owner's callback")
        inbox(generation, received_at, messages)

    sub = subscribers(ingest, flaky, client_id="hearth-ingest-flaky", session_expiry=60)
    subscribed(sub)
    send(publishers(minted.thermostats[0]), "telemetry", b"again")
    wait_until(lambda: inbox.find(b"again"), what="the message redelivered after the bug")
    assert sub.stats["internal_errors"] == 1
    assert "bug in the owner's callback" in sub.last_error
    msg = inbox.find(b"again")
    assert msg is not None and msg.dup and inbox.bursts[0][0] == 2


@pytest.mark.broker
def test_the_owner_ticks_in_the_network_thread_and_acks_there(
    ingest: MqttIdentity, subscribers: SubscriberFactory, publishers: PublisherFactory,
    minted: Fleet,
) -> None:
    """``on_tick`` runs when it asked to (not only when bytes arrive: the keepalive here
    is 60 s), acks it queues from the network thread are written, and a tick runs at
    ``stop()`` before the final acks and DISCONNECT: what it acknowledges then is not
    redelivered."""
    inbox = Inbox()
    ticks: list[float] = []
    state = {"taken": 0, "ack": True}  # messages taken from the inbox; ack them at once?
    held: list[int] = []
    box: dict[str, Subscriber] = {}

    def tick(generation: int) -> float | None:
        ticks.append(time.monotonic())
        messages = inbox.messages()
        held.extend(msg.packet_id for msg in messages[state["taken"]:])
        state["taken"] = len(messages)
        if state["ack"] and held:
            box["sub"].ack(generation, held)
            held.clear()
        return 0.05

    sub = box["sub"] = subscribers(ingest, inbox, on_tick=tick,
                                   client_id="hearth-ingest-tick", session_expiry=60)
    subscribed(sub)
    n = len(ticks)
    wait_until(lambda: len(ticks) >= n + 10, timeout=5, what="ticks on an idle connection")
    unit = publishers(minted.thermostats[0])
    send(unit, "telemetry", b"acked-by-a-tick")
    wait_until(lambda: sub.stats["acked"] == 1, what="the PUBACK queued by a tick")
    state["ack"] = False
    send(unit, "telemetry", b"acked-at-stop")
    wait_until(lambda: len(held) == 1, what="the second message held by the owner")
    assert sub.stats["acked"] == 1
    state["ack"] = True  # the owner acknowledges it when it is told to stop
    sub.stop()
    assert sub.stats["acked"] == 2  # the last tick's ack went out before DISCONNECT

    again = Inbox()
    resumed = subscribers(ingest, again, client_id="hearth-ingest-tick", session_expiry=60)
    subscribed(resumed)
    send(unit, "telemetry", b"marker")
    wait_until(lambda: again.find(b"marker"), what="the marker")
    assert again.payloads() == [b"marker"]  # nothing acknowledged was redelivered


@pytest.mark.broker
def test_an_ack_for_an_earlier_connection_is_not_sent(
    broker: Broker, ingest: MqttIdentity, subscribers: SubscriberFactory,
    publishers: PublisherFactory, minted: Fleet,
) -> None:
    inbox = Inbox()
    sub = subscribers(ingest, inbox, client_id="hearth-ingest-live3", session_expiry=60)
    subscribed(sub)
    send(publishers(minted.thermostats[1]), "telemetry", b"s1")
    old = wait_until(lambda: inbox.find(b"s1", generation=1), what="s1 on connection 1")
    assert old is not None
    broker.restart()
    subscribed(sub, generation=2)
    # the broker redelivers s1 on the new connection; the ack for connection 1 is dropped
    wait_until(lambda: inbox.find(b"s1", generation=2), what="s1 redelivered")
    assert sub.ack(1, [old.packet_id]) == 0
    assert sub.stats["acks_skipped"] == 1
    sub.stop()
    assert sub.stats["acked"] == 0
    # not acknowledged, so the session still holds it
    again = Inbox()
    resumed = subscribers(ingest, again, client_id="hearth-ingest-live3", session_expiry=60)
    subscribed(resumed)
    send(publishers(minted.thermostats[1]), "telemetry", b"s2")
    wait_until(lambda: again.find(b"s2"), what="s2")
    assert again.payloads() == [b"s1", b"s2"]


@pytest.mark.broker
def test_wrong_password_is_refused(
    ingest: MqttIdentity, subscribers: SubscriberFactory,
) -> None:
    sub = subscribers(replace(ingest, password="not-the-password"), Inbox(),
                      client_id="hearth-ingest-live4")
    wait_until(lambda: sub.stats["refused"] >= 2, what="two refused CONNECTs")
    assert ("bad user name or password" in sub.last_error
            or "not authorized" in sub.last_error), sub.last_error
    assert "ConnectRefused" in sub.last_error
    assert sub.generation == 0 and sub.stats["connects"] == 0 and not sub.connected
    assert sub.stats["connection_errors"] == 0


@pytest.mark.broker
def test_certificates_of_another_ca_are_refused(
    session_pki: MakerPKI, ingest: MqttIdentity, subscribers: SubscriberFactory,
    tmp_path: Path,
) -> None:
    key = key_from_pem(ingest.keyfile.read_bytes())
    other = MakerPKI.create(tmp_path / "other-maker")
    foreign = tmp_path / "foreign.pem"
    foreign.write_bytes(cert_to_pem(other.issue_service_client_cert("hearth-ingest",
                                                                     key.public_key())))
    (tmp_path / "other-root.pem").write_bytes(other.root_pem())
    client_cert = subscribers(replace(ingest, certfile=foreign), Inbox(),
                              client_id="hearth-ingest-live5a")
    server_cert = subscribers(replace(ingest, cafile=tmp_path / "other-root.pem"), Inbox(),
                              client_id="hearth-ingest-live5b")
    for sub in (client_cert, server_cert):
        wait_until(lambda: sub.stats["connection_errors"] >= 2,  # noqa: B023 - called now
                   what="two failed TLS handshakes")
        assert sub.generation == 0 and sub.stats["connects"] == 0 and not sub.connected
        assert sub.stats["refused"] == 0
    assert "SSL" in client_cert.last_error or "closed" in client_cert.last_error, \
        client_cert.last_error
    assert "CERTIFICATE_VERIFY_FAILED" in server_cert.last_error, server_cert.last_error
    # control: the same key and password with a certificate of our CA get in
    ours = tmp_path / "ours.pem"
    ours.write_bytes(cert_to_pem(session_pki.issue_service_client_cert("hearth-ingest",
                                                                       key.public_key())))
    good = subscribers(replace(ingest, certfile=ours), Inbox(), client_id="hearth-ingest-live5c",
                       session_expiry=0)
    subscribed(good)


REFUSED_SUBSCRIPTIONS = [
    pytest.param("hearth-ingest", [*SUBSCRIPTIONS, "hearth/v1/d/+/cmd"],
                 "0x01, 0x01, 0x01, 0x87", id="ingest-one-topic-too-many"),
    pytest.param("unit", list(SUBSCRIPTIONS), "0x87, 0x87, 0x87", id="unit-ingest-filters"),
]


@pytest.mark.broker
@pytest.mark.parametrize(("who", "filters", "codes"), REFUSED_SUBSCRIPTIONS)
def test_a_refused_subscription_is_detected(
    broker: Broker, ingest: MqttIdentity, subscribers: SubscriberFactory, minted: Fleet,
    who: str, filters: list[str], codes: str,
) -> None:
    if who == "unit":
        dev = minted.thermostats[2]
        identity = Unit(dev, minted.directory / dev).identity(broker)
    else:
        identity = replace(ingest, client_id="hearth-ingest-live6")
    sub = subscribers(identity, Inbox(), filters, session_expiry=0)
    seen: list[bool] = []

    def two_refusals() -> bool:
        seen.append(sub.subscribed)
        return sub.stats["protocol_errors"] >= 2

    wait_until(two_refusals, interval=0.005, what="two refused SUBACKs")
    assert not any(seen)
    assert sub.stats["connects"] >= 2  # connected each time; the SUBACK is what failed
    assert sub.last_error == f"ProtocolError: the broker refused a subscription: {codes}"


@pytest.mark.broker
def test_a_refused_subscription_backs_off(
    ingest: MqttIdentity, subscribers: SubscriberFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection whose SUBACK fails is not a success: the backoff keeps growing."""
    bounds: list[float] = []

    class Jitter:
        @staticmethod
        def uniform(low: float, high: float) -> float:
            bounds.append(high)
            return 0.0  # reconnect at once: the bounds are what this test looks at

    monkeypatch.setattr(subscriber_module, "random", Jitter)
    sub = subscribers(replace(ingest, client_id="hearth-ingest-live7"), Inbox(),
                      ["hearth/v1/d/+/cmd"], min_backoff=0.05, max_backoff=0.4,
                      session_expiry=0)
    wait_until(lambda: len(bounds) >= 5, what="five reconnects")
    sub.stop()
    assert sub.stats["protocol_errors"] >= 5
    assert bounds[:5] == [0.05, 0.1, 0.2, 0.4, 0.4]


@pytest.mark.broker
def test_reconnects_by_itself_after_a_broker_restart(
    broker: Broker, ingest: MqttIdentity, subscribers: SubscriberFactory,
    publishers: PublisherFactory, minted: Fleet,
) -> None:
    inbox = Inbox()
    sub = subscribers(ingest, inbox, client_id="hearth-ingest-live8", session_expiry=60)
    subscribed(sub)
    dev = minted.locks[0]
    send(publishers(dev), "event", b"before")
    wait_until(lambda: inbox.find(b"before", generation=1), what="before the restart")
    broker.restart()
    subscribed(sub, generation=2)
    assert sub.stats["connection_errors"] >= 1 and sub.stats["connects"] == 2
    send(publishers(dev), "event", b"after")  # the unit reconnects too
    wait_until(lambda: inbox.find(b"after", generation=2), what="after the restart")
    assert inbox.find(b"after", generation=1) is None
    assert sub.ack(2, [msg.packet_id for msg in inbox.messages(2)]) == len(inbox.messages(2))


@pytest.mark.broker
def test_keepalive_pings_keep_an_idle_connection_up(
    ingest: MqttIdentity, subscribers: SubscriberFactory,
) -> None:
    # Mosquitto drops a client that sends nothing for 1.5 x keepalive (3 s): four pings
    # (about 4 s) on one connection show the pings and their PINGRESPs work.
    sub = subscribers(ingest, Inbox(), client_id="hearth-ingest-live9", keepalive=2,
                      session_expiry=0)
    subscribed(sub)
    wait_until(lambda: sub.stats["pings"] >= 4, timeout=10, what="four pings")
    assert sub.connected and sub.generation == 1 and sub.stats["connects"] == 1
    assert sub.stats["connection_errors"] == 0 and sub.stats["protocol_errors"] == 0, \
        sub.last_error


@pytest.mark.broker
def test_a_broker_that_stops_answering_is_noticed(
    broker: Broker, ingest: MqttIdentity, subscribers: SubscriberFactory,
    publishers: PublisherFactory, minted: Fleet, caplog: pytest.LogCaptureFixture,
) -> None:
    """A frozen Mosquitto (SIGSTOP: the TCP connection stays open) sends no PINGRESP: the
    subscriber gives the connection up and reconnects once the broker is back."""
    inbox = Inbox()
    sub = subscribers(ingest, inbox, client_id="hearth-ingest-live10", keepalive=2,
                      connect_timeout=1.0, session_expiry=60)
    subscribed(sub)
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: sub.stats["connection_errors"] >= 1, timeout=10,
                   what="the silent broker noticed")
        assert not sub.connected
    finally:
        os.kill(pid, signal.SIGCONT)
    failures = [r.getMessage() for r in caplog.records if r.name == subscriber_module.__name__]
    assert failures and "TimeoutError: no PINGRESP" in failures[0], failures
    assert sub.stats["pings"] >= 1
    wait_until(lambda: sub.subscribed and sub.generation >= 2, timeout=10,
               what="reconnected after thawing")
    send(publishers(minted.locks[1]), "telemetry", b"back")
    back = wait_until(lambda: inbox.find(b"back"), what="a message after thawing")
    assert back is not None and back.qos == 1
    assert inbox.find(b"back", generation=1) is None


# --- a scripted broker: byte streams Mosquitto does not produce on demand ----------------------

def read_packet(conn: ssl.SSLSocket) -> bytes:
    """One whole MQTT packet from ``conn`` (blocking)."""
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError("peer closed")
            out += chunk
        return out

    head = exactly(2)
    length, shift, last = head[1] & 0x7F, 7, head[1]
    while last & 0x80:
        last = exactly(1)[0]
        head += bytes((last,))
        length |= (last & 0x7F) << shift
        shift += 7
    return head + exactly(length)


class ScriptedBroker:
    """A scripted MQTT server on real TLS (certificates of the maker PKI) for what
    Mosquitto will not do: ``script(conn, received)`` runs in a thread on the first
    connection; OSErrors are kept in ``failures`` for the test thread."""

    def __init__(self, pki: MakerPKI, tmp_path: Path,
                 script: Callable[[ssl.SSLSocket, list[bytes]], None]) -> None:
        server_key, client_key = generate_key(), generate_key()
        (tmp_path / "server.pem").write_bytes(
            cert_to_pem(pki.issue_server_cert(server_key.public_key(), ["127.0.0.1"]))
            + cert_to_pem(pki.service_ca.cert))
        (tmp_path / "server.key").write_bytes(key_to_pem(server_key))
        (tmp_path / "client.pem").write_bytes(
            cert_to_pem(pki.issue_service_client_cert("hearth-ingest",
                                                      client_key.public_key())))
        (tmp_path / "client.key").write_bytes(key_to_pem(client_key))
        (tmp_path / "root.pem").write_bytes(pki.root_pem())
        (tmp_path / "chain.pem").write_bytes(pki.chain_pem())
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
        self._ctx.load_verify_locations(tmp_path / "chain.pem")
        self._ctx.verify_mode = ssl.CERT_REQUIRED
        self._script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.received: list[bytes] = []
        self.failures: list[OSError] = []
        self.identity = MqttIdentity(
            host="127.0.0.1", port=self.listener.getsockname()[1], username="hearth-ingest",
            password=secrets.token_urlsafe(16),  # the scripted server does not check it
            client_id="hearth-ingest", certfile=tmp_path / "client.pem",
            keyfile=tmp_path / "client.key", cafile=tmp_path / "root.pem")
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            raw_conn, _ = self.listener.accept()
            with self._ctx.wrap_socket(raw_conn, server_side=True) as conn:
                conn.settimeout(10)
                self._script(conn, self.received)
        except OSError as e:  # reported by the test thread
            self.failures.append(e)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def test_messages_in_the_same_read_as_the_connack_are_delivered(
    session_pki: MakerPKI, tmp_path: Path,
) -> None:
    """A resumed session's queued messages may follow the CONNACK in the same TLS record
    (Mosquitto writes them as separate records, a TLS-terminating proxy may coalesce
    them): they are messages of the new connection, delivered at once - not a "PUBLISH
    before CONNACK" protocol error, and not held back until more bytes arrive. The
    server sends the SUBACK only after the PUBACK, so nothing else wakes the subscriber."""

    def script(conn: ssl.SSLSocket, received: list[bytes]) -> None:
        received.append(read_packet(conn))  # CONNECT
        conn.sendall(b"\x20\x03\x01\x00\x00"  # CONNACK: session present, success
                     + publish(b"hearth/v1/d/a/telemetry", b"queued", qos=1, pid=7))
        received.append(read_packet(conn))  # SUBSCRIBE
        received.append(read_packet(conn))  # the PUBACK, once the test acks
        conn.sendall(SUBACK_OK)
        received.append(read_packet(conn))  # DISCONNECT at stop()

    server = ScriptedBroker(session_pki, tmp_path, script)
    failures = server.failures
    inbox = Inbox()
    sub = Subscriber(server.identity, SUBSCRIPTIONS, inbox, keepalive=60, min_backoff=0.05,
                     max_backoff=0.1, connect_timeout=2.0)
    sub.start()
    try:
        wait_until(lambda: inbox.messages() or sub.stats["protocol_errors"] or failures,
                   timeout=5, what="the message sent with the CONNACK")
        assert sub.stats["protocol_errors"] == 0, sub.last_error
        assert inbox.bursts == [(1, [Message(b"hearth/v1/d/a/telemetry", b"queued", 7, 1)])]
        assert sub.ack(1, [7]) == 1
        wait_until(lambda: sub.subscribed or failures, what="SUBACK after the PUBACK")
        assert not failures, failures
    finally:
        sub.stop()
        server.close()
    assert not failures, failures
    connect, subscribe, puback, disconnect = server.received
    assert connect[0] == 0x10 and subscribe[0] == 0x82
    assert puback == b"\x40\x02\x00\x07"
    assert disconnect == b"\xe0\x00"


def test_a_publish_above_the_granted_qos_is_a_protocol_error(
    session_pki: MakerPKI, tmp_path: Path,
) -> None:
    """Subscribed at QoS 1, a QoS 2 PUBLISH (which would wait for a PUBREC we never send)
    drops the connection as a protocol error; nothing of that read is delivered."""

    def script(conn: ssl.SSLSocket, received: list[bytes]) -> None:
        received.append(read_packet(conn))  # CONNECT
        conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK
        received.append(read_packet(conn))  # SUBSCRIBE
        conn.sendall(SUBACK_OK + publish(b"hearth/v1/d/a/telemetry", b"ok", qos=1, pid=1)
                     + publish(b"hearth/v1/d/a/telemetry", b"qos2", qos=2, pid=2))
        received.append(conn.recv(1) or b"")  # b"": the subscriber hung up

    server = ScriptedBroker(session_pki, tmp_path, script)
    inbox = Inbox()
    sub = Subscriber(server.identity, SUBSCRIPTIONS, inbox, keepalive=60, min_backoff=5,
                     max_backoff=5, connect_timeout=2.0)
    sub.start()
    try:
        wait_until(lambda: sub.stats["protocol_errors"] or server.failures,
                   what="the QoS 2 PUBLISH refused")
        assert not server.failures, server.failures
        assert "above the granted QoS 1" in sub.last_error
        wait_until(lambda: len(server.received) == 3, what="the connection closed")
        assert server.received[2] == b""
        assert inbox.messages() == []  # not even the QoS 1 message of the same read
    finally:
        sub.stop()
        server.close()
