"""The MQTT side of the update channel: answers each unit's ``update/check``.

It connects as the broker identity ``hearth-updates``, whose role allows exactly two things
(``hearth.service.broker``): take the units' ``update/check`` messages through the shared
subscription ``$share/hearth-updates/hearth/v1/d/+/update/check`` and publish to the units'
``update/offer`` topics. A unit's own role lets it publish only its own ``update/check``
and receive only its own ``update/offer``, so the device id in the topic *is* the
broker-authenticated sender: a unit cannot ask for another unit's token, and cannot read
another unit's offer. (Neither the ingest identity, which never publishes, nor the command
identity, which never subscribes, gains a right it did not have.)

Every message is checked (:func:`hearth.protocol.parse_update_check`: size, schema, device
id = topic, timestamp) and each unit is limited to one check per ``min_interval`` seconds;
refusals are counted and never answered. Work happens on one worker thread fed by a bounded
queue, so a burst of checks (a fleet reconnecting) cannot grow memory without limit.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from hearth import protocol
from hearth.errors import HearthError, ValidationError
from hearth.service.mqtt import MqttIdentity, make_client

if TYPE_CHECKING:
    from hearth.service.updates.service import UpdateService

__all__ = ["SHARE_GROUP", "SUBSCRIPTION", "UpdateResponder"]

log = logging.getLogger("hearth.updates.responder")

SHARE_GROUP = "hearth-updates"
SUBSCRIPTION = f"$share/{SHARE_GROUP}/{protocol.TOPIC_PREFIX}/+/update/check"
MAX_QUEUE = 10_000


class UpdateResponder:
    """Subscribes to update checks and publishes the offers."""

    def __init__(self, identity: MqttIdentity, service: UpdateService, *,
                 min_interval: float = 1.0) -> None:
        self._identity = identity
        self._service = service
        self._min_interval = min_interval
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=MAX_QUEUE)
        self._client: Client | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._last: dict[str, float] = {}
        self.counts: Counter[str] = Counter()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def start(self) -> None:
        client = make_client(self._identity, client_id=f"{SHARE_GROUP}-0")
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        client.loop_start()  # connects in the network thread (and reconnects)
        self._thread = threading.Thread(target=self._run, name="hearth-update-responder",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # -- paho callbacks (network thread) -----------------------------------------------------
    def _on_connect(self, client: Client, _u: object, _f: ConnectFlags, reason: ReasonCode,
                    _p: Properties | None) -> None:
        if reason.is_failure:
            log.warning("update responder: the broker refused the connection: %s", reason)
            return
        client.subscribe(SUBSCRIPTION, qos=1)
        self._subscribed.set()

    def _on_disconnect(self, _c: Client, _u: object, _f: DisconnectFlags, reason: ReasonCode,
                       _p: Properties | None) -> None:
        self._subscribed.clear()
        if not self._stop.is_set():
            log.warning("update responder: disconnected (%s); reconnecting", reason)

    def _on_message(self, _c: Client, _u: object, message: MQTTMessage) -> None:
        try:
            self._queue.put_nowait((message.topic, bytes(message.payload)))
        except (queue.Full, UnicodeDecodeError):
            self.counts["dropped"] += 1

    # -- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                topic, raw = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle(topic, raw)
            except Exception:
                log.exception("update responder: a check failed")
                self.counts["error"] += 1

    def handle(self, topic: str, raw: bytes) -> protocol.UpdateOffer | None:
        """Check one request and publish the offer; returns it (``None`` if refused)."""
        try:
            device_id, kind = protocol.parse_topic(topic)
            if kind != "update/check":
                raise ValidationError(protocol.Reason.UNKNOWN_TOPIC, "not an update check")
            check = protocol.parse_update_check(raw, topic_device_id=device_id)
        except ValidationError as e:
            self.counts[e.reason] += 1
            return None
        now = time.monotonic()
        if now - self._last.get(device_id, -1e9) < self._min_interval:
            self.counts["rate_limited"] += 1
            return None
        if len(self._last) > 100_000:
            self._last.clear()
        self._last[device_id] = now
        try:
            offer = self._service.handle_check(check)
        except HearthError as e:
            log.warning("update responder: no answer for %s: %s", device_id, e)
            self.counts["error"] += 1
            return None
        client = self._client
        if client is not None:
            client.publish(protocol.update_topic(device_id, "update/offer"),
                           protocol.encode(offer), qos=1)
        self.counts["answered"] += 1
        return offer
