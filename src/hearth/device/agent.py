"""The device agent: wires a unit's app, outbox and link together.

Three threads, none of which waits for another::

    app control loop   (the app's own thread)      does the device's job, network or not
    telemetry timer    every telemetry_interval     app.readings() -> Telemetry -> outbox
    link               connect/backoff, publish     outbox -> broker (QoS 1, in order,
                                                     deleted on PUBACK); commands in

A command goes through :meth:`Agent.handle_command`, which never raises:

1. :func:`hearth.protocol.parse_command` checks size, JSON, schema, device id, expiry, the
   command name and parameter ranges. A refusal is counted by its :class:`Reason` and
   answered with a ``rejected`` :class:`CommandResult` carrying the reason (or, when the
   payload has no usable command id, a ``command_rejected`` event).
2. A command id executed before (QoS 1 redelivery) is not run again and gets no second
   result (``commands_duplicate``).
3. The app executes it; the result - ``succeeded``, ``rejected`` (the app refused the
   parameters) or ``failed`` (:class:`CommandFailed` or an unexpected error) - with the
   app's readings afterwards is enqueued in the same transaction that records the command
   id as executed.

When the outbox has had to drop messages, the next successful connection enqueues an
``outbox_dropped`` event with the count, so the cloud can explain the gap in sequence
numbers. Logs never contain the broker password or key material.

Example::

    identity = UnitIdentity.load(unit_dir)
    agent = Agent(identity, ThermostatApp(), telemetry_interval=60)
    agent.run_forever()             # until request_stop() (SIGINT/SIGTERM in run_device)
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

from hearth.device.apps import APPS, CommandFailed, DeviceApp, Reading
from hearth.device.identity import UnitIdentity
from hearth.device.link import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_KEEPALIVE,
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_STABLE_AFTER,
    Backoff,
    Link,
)
from hearth.device.localapi import LocalApi, LocalApiConfig
from hearth.device.outbox import DEFAULT_MAX_MESSAGES, Kind, Outbox
from hearth.device.owner import RESET_EVENT, OwnerStore
from hearth.device.owner import factory_reset as _factory_reset
from hearth.errors import DeviceError, ValidationError
from hearth.protocol import (
    MAX_PAYLOAD_BYTES,
    CommandResult,
    Event,
    Telemetry,
    device_topic,
    encode,
    parse_command,
    validate_values,
)

__all__ = ["DEFAULT_TELEMETRY_INTERVAL", "Agent", "AgentStatus", "run_device"]

DEFAULT_TELEMETRY_INTERVAL = 60.0
_COMMAND_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_DETAIL_MAX = 256

_log = logging.getLogger("hearth.device.agent")

Status = Literal["succeeded", "rejected", "failed"]


@dataclass(frozen=True)
class AgentStatus:
    """A snapshot of what the agent has done (for tests, the local API and monitoring)."""

    connected: bool
    queued: int
    next_seq: int
    published: int
    refused_by_broker: int
    dropped: int
    dropped_by_kind: dict[str, int]
    telemetry_enqueued: int
    telemetry_invalid: int
    commands_executed: int
    commands_failed: int
    commands_duplicate: int
    commands_rejected: dict[str, int] = field(default_factory=dict)
    connect_attempts: list[float] = field(default_factory=list)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _command_id_of(raw: bytes) -> str | None:
    """The command id in a refused payload, if it has a well-formed one."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    cid = data.get("command_id") if isinstance(data, dict) else None
    return cid if isinstance(cid, str) and _COMMAND_ID_RE.match(cid) else None


class Agent:
    """Runs one unit: its app, its outbox and its link to the broker.

    ``mqtt_host``/``mqtt_port`` override the endpoint written in ``unit.json`` (tests, a
    broker on another port). ``outbox`` defaults to ``DIR/state/outbox.db``; ``rng`` seeds
    the reconnect jitter (default: the OS CSPRNG); ``clock`` is the UTC wall clock used to
    stamp messages and check command expiry. Raises :class:`DeviceError` if the app does
    not implement the unit's model or the TLS credentials cannot be loaded.
    """

    def __init__(
        self,
        identity: UnitIdentity,
        app: DeviceApp,
        *,
        telemetry_interval: float = DEFAULT_TELEMETRY_INTERVAL,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        stable_after: float = DEFAULT_STABLE_AFTER,
        mqtt_host: str | None = None,
        mqtt_port: int | None = None,
        outbox: Outbox | None = None,
        max_outbox: int = DEFAULT_MAX_MESSAGES,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        keepalive: int = DEFAULT_KEEPALIVE,
        rng: random.Random | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        local_api: LocalApiConfig | None = None,
    ) -> None:
        if app.model.name != identity.model.name:
            raise DeviceError(
                f"the app implements {app.model.name!r} but this unit is a "
                f"{identity.model.name!r}"
            )
        if not 0.01 <= telemetry_interval <= 86_400:
            raise ValueError("telemetry_interval must be 0.01..86400 seconds")
        self.identity = identity
        self.app = app
        self.device_id = identity.device_id
        self.telemetry_interval = telemetry_interval
        self._clock = clock
        self.link = Link(
            device_id=identity.device_id,
            host=mqtt_host if mqtt_host is not None else identity.mqtt_host,
            port=mqtt_port if mqtt_port is not None else identity.mqtt_port,
            password=identity.mqtt_password,
            ca_file=identity.ca_file,
            keystore=identity.keystore,
            fetch=lambda n, after: self.outbox.peek(n, after=after),
            on_acked=self._acked,
            on_command=self._on_command,
            on_connected=self.report_drops,
            backoff=Backoff(base=backoff_base, cap=backoff_cap, rng=rng),
            max_inflight=max_inflight,
            keepalive=keepalive,
            stable_after=stable_after,
        )
        self.outbox = outbox if outbox is not None else Outbox.for_unit(
            identity.directory, max_messages=max_outbox
        )
        self._topics: dict[Kind, str] = {
            k: device_topic(identity.device_id, k) for k in ("telemetry", "event", "cmd/result")
        }
        self._cmd_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._rejected: Counter[str] = Counter()
        self._executed = 0
        self._failed = 0
        self._duplicate = 0
        self._telemetry = 0
        self._telemetry_invalid = 0
        self._stopping = threading.Event()
        self._timer: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._unit_lock: IO[bytes] | None = None
        self.owner = OwnerStore(identity.directory)
        """The owner binding (``bind_owner``/``unbind_owner``/``factory_reset`` commands)."""
        self.local_api = LocalApi(identity, owner=self.owner, app=app, config=local_api) if (
            local_api is not None) else None
        """The unit's only listening socket (HTTPS, owner credential or setup code)."""
        self.quiet = False
        """While true no telemetry is queued: a unit quarantined after a failed integrity
        check talks only to the alerting path (set by :mod:`hearth.device.runtime`)."""

    def __repr__(self) -> str:
        return f"Agent({self.device_id}, {self.identity.model.name})"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the app's control loop, the telemetry timer and the link."""
        if self._closed:
            raise DeviceError("the agent was stopped; make a new one")
        if self._started:
            return
        self._lock_unit()
        self._started = True
        self._stopping.clear()
        self.app.start()
        self._timer = threading.Thread(
            target=self._telemetry_loop, name="hearth-telemetry", daemon=True
        )
        self._timer.start()
        self.link.start()
        if self.local_api is not None:
            self.local_api.start()
        _log.info("agent started for %s (%s)", self.device_id, self.identity.model.name)

    def _lock_unit(self) -> None:
        """One running agent per unit: two would fight over the unit's MQTT session."""
        path = self.identity.directory / "state" / "agent.lock"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        f = path.open("ab")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            raise DeviceError(f"another agent is already running unit {self.device_id}") from e
        self._unit_lock = f

    def request_stop(self) -> None:
        """Ask :meth:`run_forever` to return (safe from a signal handler)."""
        self._stopping.set()

    def stop(self) -> None:
        """Stop everything and close the outbox. Idempotent."""
        self._stopping.set()
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.join(timeout=10)
        if self.local_api is not None:
            self.local_api.stop()
        self.link.stop()
        self.app.stop()
        self.outbox.close()
        if self._unit_lock is not None:
            self._unit_lock.close()  # releases the flock
            self._unit_lock = None
        _log.info("agent stopped for %s", self.device_id)

    def run_forever(self) -> None:
        """Start and run until :meth:`request_stop` (or :meth:`stop`), then stop cleanly."""
        self.start()
        try:
            while not self._stopping.wait(1.0):
                pass
        finally:
            self.stop()

    # -- status ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def connect_attempts(self) -> list[float]:
        return self.link.connect_attempts

    def status(self) -> AgentStatus:
        with self._stats_lock:
            rejected = dict(self._rejected)
            executed, failed, duplicate = self._executed, self._failed, self._duplicate
            telemetry, invalid = self._telemetry, self._telemetry_invalid
        return AgentStatus(
            connected=self.link.connected,
            queued=len(self.outbox),
            next_seq=self.outbox.next_seq,
            published=self.link.published,
            refused_by_broker=self.link.refused,
            dropped=self.outbox.dropped,
            dropped_by_kind=self.outbox.dropped_by_kind,
            telemetry_enqueued=telemetry,
            telemetry_invalid=invalid,
            commands_executed=executed,
            commands_failed=failed,
            commands_duplicate=duplicate,
            commands_rejected=rejected,
            connect_attempts=self.link.connect_attempts,
        )

    # -- outgoing ----------------------------------------------------------------------

    def _enqueue(
        self, kind: Kind, build: Callable[[int], bytes], *, command_id: str | None = None
    ) -> int | None:
        seq = self.outbox.put(kind, self._topics[kind], build, command_id=command_id)
        self.link.notify()
        return seq

    def _valid_readings(self) -> dict[str, Reading] | None:
        readings = self.app.readings()
        try:
            validate_values(readings, self.identity.model.readings)
        except ValidationError as e:
            _log.error("the app produced invalid readings (%s); not sending them", e.reason)
            with self._stats_lock:
                self._telemetry_invalid += 1
            return None
        return readings

    def enqueue_telemetry(self) -> int | None:
        """Queue one telemetry report of the app's current readings; returns its seq.

        Readings outside the model's ranges are not sent (counted in ``telemetry_invalid``).
        Nothing is queued while :attr:`quiet`.
        """
        if self.quiet:
            return None
        readings = self._valid_readings()
        if readings is None:
            return None
        ts = self._clock()

        def build(seq: int) -> bytes:
            return encode(
                Telemetry(device_id=self.device_id, seq=seq, ts=ts, readings=readings)
            )

        seq = self._enqueue("telemetry", build)
        with self._stats_lock:
            self._telemetry += 1
        return seq

    def enqueue_event(self, kind: str, detail: str = "") -> int | None:
        ts = self._clock()
        detail = detail[:_DETAIL_MAX]

        def build(seq: int) -> bytes:
            return encode(
                Event(device_id=self.device_id, seq=seq, ts=ts, kind=kind, detail=detail)
            )

        return self._enqueue("event", build)

    def _telemetry_loop(self) -> None:
        next_at = time.monotonic()
        while not self._stopping.is_set():
            try:
                self.enqueue_telemetry()
            except Exception:  # noqa: BLE001 - a full disk must not stop the timer
                _log.exception("could not queue telemetry")
            next_at += self.telemetry_interval
            now = time.monotonic()
            if next_at < now:  # we fell behind (suspend, slow disk): skip, do not burst
                next_at = now + self.telemetry_interval
            if self._stopping.wait(next_at - now):
                return

    def report_drops(self) -> int | None:
        """Queue an ``outbox_dropped`` event if the outbox dropped messages since the last
        report (the link calls this on every successful connect); returns its seq."""
        ts = self._clock()

        def build(seq: int, count: int) -> bytes:
            detail = f"{count} queued messages were dropped while the outbox was full"
            return encode(
                Event(
                    device_id=self.device_id, seq=seq, ts=ts, kind="outbox_dropped",
                    detail=detail,
                )
            )

        seq = self.outbox.put_drop_report(self._topics["event"], build)
        if seq is not None:
            self.link.notify()
        return seq

    def _acked(self, seqs: list[int]) -> None:
        self.outbox.ack(seqs)

    # -- commands ----------------------------------------------------------------------

    def _on_command(self, raw: bytes) -> None:
        self.handle_command(raw)

    def handle_command(self, raw: bytes) -> CommandResult | None:
        """Validate, deduplicate and execute one raw command; never raises.

        Returns the :class:`CommandResult` that was queued, or ``None`` when nothing was
        (a duplicate, or a refused payload without a usable command id, which is reported
        as a ``command_rejected`` event instead).
        """
        try:
            with self._cmd_lock:
                return self._handle_command(raw)
        except Exception:  # noqa: BLE001 - never let one command take the agent down
            _log.exception("command handling failed")
            return None

    def _handle_command(self, raw: bytes) -> CommandResult | None:
        try:
            cmd = parse_command(
                raw, device_id=self.device_id, model=self.identity.model, now=self._clock()
            )
        except ValidationError as e:
            cid = _command_id_of(raw)
            if cid is not None and self.outbox.command_seen(cid):
                self._duplicate_seen()
                return None
            self._count_rejected(e.reason)
            _log.warning("refused a command: %s (%s)", e.reason, e.detail)
            if cid is None:
                self.enqueue_event("command_rejected", e.reason)
                return None
            return self._result(cid, "rejected", e.reason, e.detail, record=False)

        if self.outbox.command_seen(cmd.command_id):
            self._duplicate_seen()
            return None
        try:
            self._execute(cmd.name, cmd.params)
        except ValidationError as e:
            self._count_rejected(e.reason)
            _log.warning("the app refused command %s: %s", cmd.name, e.reason)
            return self._result(cmd.command_id, "rejected", e.reason, e.detail, record=False)
        except CommandFailed as e:
            with self._stats_lock:
                self._failed += 1
            _log.warning("command %s failed: %s", cmd.name, e.reason)
            return self._result(cmd.command_id, "failed", e.reason, e.detail, record=True)
        except Exception:  # noqa: BLE001 - an app bug is reported, not fatal
            _log.exception("command %s raised", cmd.name)
            with self._stats_lock:
                self._failed += 1
            return self._result(
                cmd.command_id, "failed", "internal_error",
                "the device could not carry out the command", record=True,
            )
        with self._stats_lock:
            self._executed += 1
        _log.info("executed command %s", cmd.name)
        return self._result(cmd.command_id, "succeeded", "", "", record=True)

    def _execute(self, name: str, params: Mapping[str, object]) -> None:
        """System commands (owner binding, reset) here; the model's commands in the app."""
        if name == "bind_owner":
            self.owner.bind(str(params["owner"]), str(params["verifier"]), now=self._clock())
        elif name == "unbind_owner":
            self.owner.unbind(str(params["owner"]))
        elif name == "factory_reset":
            self.factory_reset()
        else:
            self.app.execute(name, params)

    def factory_reset(self) -> str:
        """Erase the owner binding, local user data and queued messages; keep the unit's
        identity. Queues a ``factory_reset`` event naming the owner reference erased (so
        the service ends that binding) and returns it."""
        erased = _factory_reset(self.identity.directory, owner=self.owner,
                                purge_outbox=self.outbox.purge, app=self.app)
        _log.info("factory reset done")
        self.enqueue_event(RESET_EVENT, erased)
        return erased

    def _duplicate_seen(self) -> None:
        with self._stats_lock:
            self._duplicate += 1
        _log.info("ignored a redelivered command")

    def _count_rejected(self, reason: str) -> None:
        with self._stats_lock:
            self._rejected[reason] += 1

    def _result(
        self, command_id: str, status: Status, reason: str, detail: str, *, record: bool
    ) -> CommandResult | None:
        state = self._valid_readings() or {}
        ts = self._clock()
        made: list[CommandResult] = []

        def build(seq: int) -> bytes:
            result = CommandResult(
                command_id=command_id, device_id=self.device_id, seq=seq, ts=ts,
                status=status, reason=reason[:64], detail=detail[:_DETAIL_MAX], state=state,
            )
            made.append(result)
            return encode(result)

        self._enqueue("cmd/result", build, command_id=command_id if record else None)
        return made[-1] if made else None


# --- entry point ------------------------------------------------------------------------


def run_device(
    directory: Path,
    *,
    telemetry_interval: float = DEFAULT_TELEMETRY_INTERVAL,
    mqtt_host: str | None = None,
    mqtt_port: int | None = None,
    backoff_base: float = DEFAULT_BACKOFF_BASE,
    backoff_cap: float = DEFAULT_BACKOFF_CAP,
    app_options: Mapping[str, Any] | None = None,
    ready: Callable[[Agent], None] | None = None,
    local_api: LocalApiConfig | None = None,
) -> int:
    """Run the unit in ``directory`` until SIGINT/SIGTERM; returns the exit code (0).

    Loads and checks the unit (raises :class:`DeviceError` if it cannot - the CLI maps
    that to an exit code), starts the app for its model, and runs the agent. ``ready`` is
    called with the started agent (tests, embedding). Signal handlers are installed only
    when called from the main thread and are restored on return.
    """
    identity = UnitIdentity.load(directory)
    app_factory = APPS.get(identity.model.name)
    if app_factory is None:
        raise DeviceError(f"no app for model {identity.model.name!r}")
    app = app_factory(**dict(app_options or {}))
    agent = Agent(
        identity, app, telemetry_interval=telemetry_interval, mqtt_host=mqtt_host,
        mqtt_port=mqtt_port, backoff_base=backoff_base, backoff_cap=backoff_cap,
        local_api=local_api,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        agent.request_stop()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        agent.start()
        if ready is not None:
            ready(agent)
        agent.run_forever()
    finally:
        agent.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
