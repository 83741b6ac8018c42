"""The unit's runtime: boot-time integrity, the app from its verified slot, updates in the
background (guidelines 3 and 7). ``hearth device run`` runs this.

At every start, before any application code::

    boot = SlotManager.boot()        verify the active slot; fall back / safe mode / trial
    app  = load_app(slot)            only bytes that match the signed manifest are executed
    agent.start()                    link, outbox, telemetry, commands (hearth.device.agent)

What the boot decided sets the unit's *mode*:

=============  ===============================================================================
``normal``     the committed version runs; updates are checked on every connect, every
               ``check_interval`` and on the ``check_updates`` command (sooner, with
               backoff, after a check that got no answer or failed)
``trial``      a new version's first start: it must connect and get a telemetry report
               acknowledged by the broker within ``health_timeout`` (the health check), then
               it is committed (``update_installed``); otherwise the unit rolls back and
               switches to the committed version (``update_rolled_back``)
``quarantined`` the active slot failed verification and the unit fell back to the other,
               verified one: the app runs (a thermostat keeps heating) but the unit sends
               nothing but ``integrity_alert`` events (every ``alert_interval``), refuses every
               command but ``acknowledge_alert``, and does not update, until an operator
               acknowledges the alert
``safe_mode``  no slot verifies: no application code runs at all; the unit keeps alerting
=============  ===============================================================================

Updates run on a background thread (:meth:`UnitRuntime.check_for_update`): the unit asks the
service for an update token over its MQTT link (``update/check`` -> ``update/offer``, see
:mod:`hearth.protocol`), and when the offer names a release for it, downloads, verifies and
installs it into the inactive slot with :class:`~hearth.device.updater.UnitUpdater` while the
app keeps running. The "restart into the new slot" happens in-process: ``boot()`` is run
again (it counts the trial start and verifies the slot), the new app is loaded from the slot
*before* anything stops, and then :meth:`AppHost.swap` stops the old app and starts the new
one, handing over the device state (``readings()``) - the only pause in the device's job.
The link, the outbox and local control stay up throughout; a command that arrives during the
swap waits for it (milliseconds). A crash at any point is covered by the slot layer: the next
process start runs ``boot()``, which counts trial starts and reverts after three.

Events sent (``Event.kind``): ``update_available``, ``update_installed``, ``update_failed``,
``update_rolled_back`` (detail: ``"<version> <reason>"``) and ``integrity_alert``.

Example::

    runtime = UnitRuntime(unit_dir)
    runtime.start()                  # boot, load, agent, update thread
    runtime.host.call(lambda app: app.set_target_locally(21.0))   # the knob
    runtime.stop()
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from hearth._fsutil import atomic_write
from hearth.device.agent import DEFAULT_TELEMETRY_INTERVAL, Agent, run_device
from hearth.device.appload import LoadedApp, load_app
from hearth.device.apps import CommandFailed, DeviceApp, Reading
from hearth.device.identity import UnitIdentity
from hearth.device.link import Backoff
from hearth.device.slots import BootResult, SlotManager
from hearth.device.updater import HttpsFetcher, UnitUpdater
from hearth.errors import DeviceError, ValidationError
from hearth.protocol import (
    ModelSpec,
    UpdateCheck,
    UpdateOffer,
    encode,
    parse_update_offer,
    update_topic,
)
from hearth.updates.bundle import parse_target_name
from hearth.updates.errors import UpdateError, UpdateReason

if TYPE_CHECKING:
    from hearth.device.localapi import LocalApiConfig

__all__ = [
    "DEFAULT_ALERT_INTERVAL",
    "DEFAULT_CHECK_INTERVAL",
    "DEFAULT_HEALTH_TIMEOUT",
    "RUNTIME_COMMANDS",
    "AppHost",
    "UnitRuntime",
    "run_unit",
]

DEFAULT_CHECK_INTERVAL = 6 * 3600.0
DEFAULT_HEALTH_TIMEOUT = 120.0
DEFAULT_ALERT_INTERVAL = 300.0
OFFER_TIMEOUT = 15.0
MIN_CHECK_SPACING = 2.0
"""Seconds between two update checks (the service answers at most one per second)."""
CHECK_RETRY_BASE = 30.0
"""After a check that got no answer (the update service was away) or whose update failed,
the next one comes after ``uniform(0, min(check_interval, 30 s x 2**n))`` - exponential
backoff with full jitter, like the link's reconnects - instead of a whole
``check_interval`` later, so a fleet whose checks went unanswered catches up soon and not
in lock-step."""
_RETRY_OUTCOMES = frozenset({"no_answer", "failed"})
TOKEN_MARGIN = dt.timedelta(seconds=60)
"""A token closer than this to its expiry is not used for a new request."""
RUNTIME_COMMANDS = frozenset({"acknowledge_alert", "check_updates"})
"""System commands the runtime itself handles (see :data:`hearth.protocol.SYSTEM_COMMANDS`)."""
SUPPORT_FILE = "support.json"

Mode = Literal["normal", "trial", "quarantined", "safe_mode"]
T = TypeVar("T")

_log = logging.getLogger("hearth.device.runtime")


class AppHost:
    """The :class:`~hearth.device.apps.DeviceApp` the agent drives: it forwards to the app
    loaded from the running slot and lets the runtime swap that app for another in place.

    Every call holds one lock, so a remote command, a local one (:meth:`call`) and a swap
    never interleave: a command arriving during a swap runs on the new app once it started.
    While ``restricted`` (quarantine, safe mode) app commands are refused with
    :class:`CommandFailed`; the runtime's own commands (:data:`RUNTIME_COMMANDS`) go to
    ``on_system``.
    """

    def __init__(
        self,
        model: ModelSpec,
        app: DeviceApp | None,
        *,
        on_system: Callable[[str], None],
    ) -> None:
        self.model = model
        self._app = app
        self._on_system = on_system
        self._lock = threading.RLock()
        self._running = False
        self.restricted: str | None = None
        self.swaps: list[float] = []
        """How long each swap held the device (seconds): old app stopped -> new started."""

    @property
    def current(self) -> DeviceApp | None:
        with self._lock:
            return self._app

    def readings(self) -> dict[str, Reading]:
        with self._lock:
            return dict(self._app.readings()) if self._app is not None else {}

    def execute(self, name: str, params: Mapping[str, object]) -> None:
        if name in RUNTIME_COMMANDS:
            self._on_system(name)
            return
        with self._lock:
            if self.restricted is not None:
                raise CommandFailed(self.restricted,
                                    "the unit runs only its alerting path until an operator "
                                    "acknowledges its integrity alert")
            if self._app is None:
                raise CommandFailed("no_app", "no verified software is running")
            self._app.execute(name, params)

    def call(self, fn: Callable[[DeviceApp], T]) -> T:
        """Run a local operation (the knob, the button) on the current app."""
        with self._lock:
            if self._app is None:
                raise CommandFailed("no_app", "no verified software is running")
            return fn(self._app)

    def start(self) -> None:
        with self._lock:
            self._running = True
            if self._app is not None:
                self._app.start()

    def stop(self) -> None:
        with self._lock:
            self._running = False
            if self._app is not None:
                self._app.stop()

    def swap(self, new: DeviceApp | None) -> DeviceApp | None:
        """Stop the current app and start ``new`` in its place; returns the old one."""
        with self._lock:
            started = time.monotonic()
            old = self._app
            if old is not None and self._running:
                old.stop()
            self._app = new
            if new is not None and self._running:
                new.start()
            self.swaps.append(time.monotonic() - started)
            return old


@dataclass
class _Waiter:
    event: threading.Event
    offer: UpdateOffer | None = None


class UnitRuntime:
    """Runs one unit from its slots: boot, app, agent, update and alert thread."""

    def __init__(
        self,
        directory: Path,
        *,
        identity: UnitIdentity | None = None,
        app_options: Mapping[str, Any] | None = None,
        telemetry_interval: float = DEFAULT_TELEMETRY_INTERVAL,
        mqtt_host: str | None = None,
        mqtt_port: int | None = None,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
        alert_interval: float = DEFAULT_ALERT_INTERVAL,
        update_url: str | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        local_api: LocalApiConfig | None = None,
    ) -> None:
        if not 1.0 <= check_interval <= 30 * 86400:
            raise ValueError("check_interval must be 1 s .. 30 days")
        if not 0.5 <= health_timeout <= 3600 or not 0.5 <= alert_interval <= 86400:
            raise ValueError("health_timeout and alert_interval out of range")
        self.directory = directory
        self.identity = identity or UnitIdentity.load(directory)
        self.slots = SlotManager(directory, model=self.identity.model.name)
        self.app_options = dict(app_options or {})
        self._agent_options: dict[str, Any] = {
            "telemetry_interval": telemetry_interval, "mqtt_host": mqtt_host,
            "mqtt_port": mqtt_port, "backoff_base": backoff_base, "backoff_cap": backoff_cap,
            "clock": clock,
        }
        if local_api is not None:  # the local API drives the AppHost too (swap-safe)
            self._agent_options["local_api"] = local_api
        self.check_interval = check_interval
        self.health_timeout = health_timeout
        self.alert_interval = alert_interval
        base = (update_url or self.identity.http_url).rstrip("/")
        self.metadata_url = f"{base}/updates/metadata/"
        self.targets_url = f"{base}/updates/targets/"
        self._clock = clock
        self.mode: Mode = "normal"
        self.boot_result: BootResult | None = None
        self.host = AppHost(self.identity.model, None, on_system=self._system_command)
        self.agent: Agent | None = None
        self._loaded: LoadedApp | None = None
        self._stop = threading.Event()
        self._check_now = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._waiters_lock = threading.Lock()
        self._offer: UpdateOffer | None = None
        self._announced: str | None = None
        self._update_lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        """Events this runtime queued, ``(kind, detail)`` (tests, the local API)."""

    def __repr__(self) -> str:
        return f"UnitRuntime({self.identity.device_id}, {self.mode})"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> BootResult:
        """Boot (verify the slot), load its app, start the agent and the update thread."""
        boot = self.slots.boot()  # before any application code
        loaded: LoadedApp | None = None
        if not boot.safe_mode:
            boot, loaded = self._load_booted(boot)
        self.boot_result = boot
        if loaded is None:
            self.mode = "safe_mode"
        elif boot.tampered or boot.quarantined:
            self.mode = "quarantined"
        elif boot.trial:
            self.mode = "trial"
        self._loaded = loaded
        self.host.swap(loaded.app if loaded is not None else None)
        agent = Agent(self.identity, self.host, **self._agent_options)
        self.agent = agent
        self._restrict(self.mode in ("quarantined", "safe_mode"))
        agent.link.add_subscription(update_topic(agent.device_id, "update/offer"),
                                    self._on_offer)
        agent.start()
        _log.info("unit %s started in %s mode (slot %s, version %s)", agent.device_id,
                  self.mode, boot.slot, boot.version)
        self._thread = threading.Thread(target=self._run, name="hearth-runtime", daemon=True)
        self._thread.start()
        return boot

    def _load_booted(self, boot: BootResult) -> tuple[BootResult, LoadedApp | None]:
        """Load the app boot chose; a trial version that cannot load is rolled back."""
        while boot.slot is not None:
            try:
                return boot, load_app(self.slots, boot.slot, options=self.app_options)
            except UpdateError as e:
                _log.error("the app in slot %s did not load: %s", boot.slot, e)
                if not boot.trial:
                    return boot, None
                self.slots.rollback("load_failed")
                boot = self.slots.boot()
        return boot, None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self.agent is not None:
            self.agent.stop()
        if self._loaded is not None:
            self._loaded.unload()

    def request_stop(self) -> None:
        self._stop.set()
        if self.agent is not None:
            self.agent.request_stop()

    @property
    def loaded_version(self) -> str | None:
        return self._loaded.version if self._loaded is not None else None

    def support(self) -> dict[str, Any] | None:
        """The support period the service last told this unit (``update/support.json``)."""
        try:
            data = json.loads((self.directory / "update" / SUPPORT_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _restrict(self, restricted: bool) -> None:
        assert self.agent is not None
        self.agent.quiet = restricted
        self.host.restricted = self.mode if restricted else None

    # -- the runtime thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._announce_boot()
            if self.mode == "trial":
                self._finish_trial()
            self._loop()
        except Exception:  # noqa: BLE001 - the thread must never die silently
            _log.exception("the update thread failed")

    def _announce_boot(self) -> None:
        boot = self.boot_result
        assert boot is not None
        if boot.rolled_back:
            last = self.slots.state().last_result or {}
            self._event("update_rolled_back", f"{last.get('version', '?')} {boot.rolled_back}")
        if self.mode in ("quarantined", "safe_mode"):
            self._alert()

    def _loop(self) -> None:
        assert self.agent is not None
        link = self.agent.link
        seen_connects = 0
        next_check = time.monotonic()
        last_check = -MIN_CHECK_SPACING
        retry = Backoff(base=min(CHECK_RETRY_BASE, self.check_interval), cap=self.check_interval)
        next_alert = time.monotonic() + self.alert_interval
        while not self._stop.wait(0.2):
            now = time.monotonic()
            if self.mode in ("quarantined", "safe_mode"):
                if now >= next_alert:
                    self._alert()
                    next_alert = now + self.alert_interval
                continue
            due = self._check_now.is_set() or now >= next_check
            if link.connects != seen_connects and link.connected:
                seen_connects = link.connects  # check on every (re)connect: offline catch-up
                due = True
            if due and link.connected and now - last_check >= MIN_CHECK_SPACING:
                self._check_now.clear()
                outcome = self.check_for_update()
                last_check = time.monotonic()
                if outcome in _RETRY_OUTCOMES:
                    next_check = last_check + retry.next_delay()
                else:
                    retry.reset()
                    next_check = last_check + self.check_interval
            elif due:
                self._check_now.set()  # keep it for the next turn

    def _event(self, kind: str, detail: str) -> None:
        assert self.agent is not None
        self.events.append((kind, detail))
        self.agent.enqueue_event(kind, detail)
        _log.info("event %s: %s", kind, detail)

    def _alert(self) -> None:
        state = self.slots.state() if self.slots.state_path.exists() else None
        boot = self.boot_result
        if self.mode == "safe_mode":
            slots = ",".join(boot.tampered) if boot else "a,b"
            detail = f"safe_mode: no slot verifies ({slots}); nothing runs"
        else:
            alert = (state.alert or {}) if state is not None else {}
            problems = alert.get("problems") or {}
            first: list[str] = list(next(iter(problems.values()), []))
            detail = (f"{alert.get('kind', 'tampered')}: slot(s) "
                      f"{','.join(alert.get('slots', []))} failed verification "
                      f"({', '.join(first[:3])}); running slot {self.host_slot()} "
                      f"{self.loaded_version}")
        self._event("integrity_alert", detail)

    def host_slot(self) -> str | None:
        return self._loaded.slot if self._loaded is not None else None

    # -- commands ----------------------------------------------------------------------------
    def _system_command(self, name: str) -> None:
        """``acknowledge_alert`` and ``check_updates`` (called on the link thread)."""
        if name == "acknowledge_alert":
            if self.mode == "safe_mode":
                raise CommandFailed("safe_mode", "no verified software to run: the unit "
                                    "needs a repair")
            if self.mode == "quarantined":
                self.slots.acknowledge_alert()
                self.mode = "normal"
                self._restrict(False)
                self._check_now.set()
                _log.warning("integrity alert acknowledged by an operator; quarantine lifted")
            return
        if name == "check_updates":
            if self.mode in ("quarantined", "safe_mode"):
                raise CommandFailed(self.mode, "no updates until the alert is acknowledged")
            self._check_now.set()
            return
        raise CommandFailed("unknown_command", name)  # pragma: no cover - RUNTIME_COMMANDS

    # -- update channel ----------------------------------------------------------------------
    def _on_offer(self, raw: bytes) -> None:
        assert self.agent is not None
        try:
            offer = parse_update_offer(raw, device_id=self.agent.device_id)
        except ValidationError as e:
            _log.warning("refused an update offer: %s", e.reason)
            return
        with self._waiters_lock:
            waiter = self._waiters.get(offer.request_id)
        if waiter is not None:
            waiter.offer = offer
            waiter.event.set()

    def request_offer(self, timeout: float = OFFER_TIMEOUT) -> UpdateOffer | None:
        """Ask the service (over MQTT) for a token and this unit's release; ``None`` if no
        answer came within ``timeout`` or the unit may not talk to the update service."""
        if self.mode in ("quarantined", "safe_mode") or self.agent is None:
            return None
        rid = secrets.token_hex(16)
        check = UpdateCheck(
            device_id=self.agent.device_id, request_id=rid, ts=self._clock(),
            version=self.slots.installed_version(), running=self.loaded_version,
            mode=self.mode,
        )
        waiter = _Waiter(threading.Event())
        with self._waiters_lock:
            self._waiters[rid] = waiter
        try:
            if not self.agent.link.send_now(update_topic(self.agent.device_id, "update/check"),
                                            encode(check)):
                return None
            deadline = time.monotonic() + timeout
            while not waiter.event.wait(0.1):
                if self._stop.is_set() or time.monotonic() > deadline:
                    break
        finally:
            with self._waiters_lock:
                self._waiters.pop(rid, None)
        if waiter.offer is not None:
            self._offer = waiter.offer
            self._record_support(waiter.offer)
        return waiter.offer

    def _token(self) -> str:
        offer = self._offer
        now = self._clock()
        if (offer is None or not offer.token or offer.token_expires_at is None
                or offer.token_expires_at - TOKEN_MARGIN <= now):
            offer = self.request_offer()
        if offer is None or not offer.token:
            raise UpdateError(UpdateReason.DOWNLOAD_FAILED, "no update token from the service")
        return offer.token

    def _record_support(self, offer: UpdateOffer) -> None:
        doc = {
            "model": self.identity.model.name,
            "end_date": offer.support_end.isoformat() if offer.support_end else None,
            "status": offer.support_status,
            "received_at": offer.ts.isoformat(),
        }
        path = self.directory / "update" / SUPPORT_FILE
        if self.support() != doc:
            try:
                atomic_write(path, json.dumps(doc, sort_keys=True).encode())
            except OSError:
                _log.warning("could not record the support period")

    # -- updating ----------------------------------------------------------------------------
    def check_for_update(self) -> str:
        """Ask for an offer and install what it names. Returns what happened: ``no_answer``,
        ``up_to_date``, ``failed``, ``installed`` (committed) or ``rolled_back``."""
        with self._update_lock:
            offer = self.request_offer()
            if offer is None:
                return "no_answer"
            if offer.refused:
                _log.info("the service refused an update token: %s", offer.refused)
                return "up_to_date"
            if offer.available and offer.available != self._announced:
                self._announced = offer.available
                if offer.available != self.slots.installed_version():
                    self._event("update_available", offer.available)
            if offer.target is None:
                return "up_to_date"
            return self._update_to(offer.target)

    def _updater(self) -> UnitUpdater:
        return UnitUpdater(self.directory, metadata_url=self.metadata_url,
                           target_base_url=self.targets_url, token=self._token,
                           ca_file=self.identity.ca_file, slots=self.slots)

    def _update_to(self, target: str) -> str:
        try:
            _model, version = parse_target_name(target)
        except UpdateError:
            version = "?"
        updater = self._updater()
        try:
            result = updater.update(target)
        except UpdateError as e:
            if e.reason is UpdateReason.NOT_NEWER and version == self.slots.installed_version():
                return "up_to_date"
            self._event("update_failed", f"{version} {e.reason.value}: {e.detail}")
            return "failed"
        finally:
            if isinstance(updater.fetcher, HttpsFetcher):
                updater.fetcher.close()
        if result.status != "installed":
            return "up_to_date"
        return self._switch_to_installed()

    def _switch_to_installed(self) -> str:
        """The in-process restart into the new slot (the only pause), then its health check."""
        boot = self.slots.boot()  # counts this trial start and verifies the new slot
        self.boot_result = boot
        if boot.tampered:  # the slot we just installed does not verify: fell back
            self.mode = "quarantined"
            self._restrict(True)
            self._alert()
            return "failed"
        if boot.slot is None or boot.slot == self.host_slot():
            return "up_to_date"
        try:
            loaded = load_app(self.slots, boot.slot, options=self.app_options,
                              state=self.host.readings())
        except UpdateError as e:
            version = boot.version
            self.slots.rollback("load_failed")
            self.slots.boot()
            self._event("update_rolled_back", f"{version} load_failed: {e.detail}")
            return "rolled_back"
        self._replace(loaded)
        self.mode = "trial"
        return self._finish_trial()

    def _replace(self, loaded: LoadedApp) -> None:
        old = self._loaded
        self.host.swap(loaded.app)
        self._loaded = loaded
        if old is not None:
            old.unload()

    def _finish_trial(self) -> str:
        loaded = self._loaded
        assert loaded is not None
        slot = self.slots.finish_trial(self._healthy)
        if slot == loaded.slot:
            self.mode = "normal"
            self._event("update_installed", loaded.version)
            return "installed"
        boot = self.slots.boot()  # the committed slot, verified again
        self.boot_result = boot
        if boot.slot is not None:
            try:
                self._replace(load_app(self.slots, boot.slot, options=self.app_options,
                                       state=self.host.readings()))
            except UpdateError:
                _log.exception("the committed version did not load after a rollback")
        self.mode = "normal"
        self._event("update_rolled_back", f"{loaded.version} health_check")
        return "rolled_back"

    def _healthy(self) -> bool:
        """The new version connects and gets a telemetry report to the broker in time."""
        agent = self.agent
        assert agent is not None
        deadline = time.monotonic() + self.health_timeout
        while not agent.link.connected:
            if self._stop.wait(0.05) or time.monotonic() > deadline:
                return False
        seq = agent.enqueue_telemetry()
        if seq is None:
            return False
        while time.monotonic() < deadline:
            pending = agent.outbox.peek(1, after=seq - 1)
            if not pending or pending[0].seq != seq:
                current = self.host.current
                return current is not None and bool(getattr(current, "running", True))
            if self._stop.wait(0.05):
                return False
        return False


# --- entry point --------------------------------------------------------------------------
def run_unit(
    directory: Path,
    *,
    telemetry_interval: float = DEFAULT_TELEMETRY_INTERVAL,
    mqtt_host: str | None = None,
    mqtt_port: int | None = None,
    backoff_base: float = 1.0,
    backoff_cap: float = 60.0,
    app_options: Mapping[str, Any] | None = None,
    check_interval: float = DEFAULT_CHECK_INTERVAL,
    health_timeout: float = DEFAULT_HEALTH_TIMEOUT,
    ready: Callable[[UnitRuntime], None] | None = None,
    local_api: LocalApiConfig | None = None,
) -> int:
    """Run the unit in ``directory`` until SIGINT/SIGTERM; returns the exit code (0).

    A unit minted without an update repository (no ``slots/state.json``) has no signed
    software: it runs the built-in reference app (:func:`hearth.device.agent.run_device`)
    and says so in the log. Raises :class:`DeviceError` for a broken unit.
    """
    if not (directory / "slots" / "state.json").exists() and not (
        directory / "update" / "trusted_root.json"
    ).exists():
        _log.warning("unit %s has no signed software (minted without an update repository): "
                     "running the built-in app", directory.name)
        return run_device(directory, telemetry_interval=telemetry_interval,
                          mqtt_host=mqtt_host, mqtt_port=mqtt_port, backoff_base=backoff_base,
                          backoff_cap=backoff_cap, app_options=app_options,
                          local_api=local_api)
    try:
        runtime = UnitRuntime(
            directory, app_options=app_options, telemetry_interval=telemetry_interval,
            mqtt_host=mqtt_host, mqtt_port=mqtt_port, backoff_base=backoff_base,
            backoff_cap=backoff_cap, check_interval=check_interval,
            health_timeout=health_timeout, local_api=local_api,
        )
    except UpdateError as e:
        raise DeviceError(f"cannot run the unit: {e}") from e
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        runtime.start()
        if ready is not None:
            ready(runtime)
        while not stop.wait(0.5):
            pass
    finally:
        runtime.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
