"""What a device application is to the agent, and the control-loop thread apps share."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from hearth.errors import DeviceError, ValidationError
from hearth.protocol import ModelSpec, Reason, validate_values

__all__ = ["CommandFailed", "ControlLoop", "DeviceApp", "Reading", "check_command"]

Reading = bool | float | str
"""A reading value as the protocol carries it."""

_log = logging.getLogger("hearth.device.apps")


class CommandFailed(DeviceError):
    """A valid command could not be carried out (door open, battery empty...).

    ``reason`` is a short stable code the agent puts into the command result.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@runtime_checkable
class DeviceApp(Protocol):
    """A product's application: it does the device's job with or without a network.

    ``execute`` is called by the agent (remote command) from the network thread and must
    return quickly; it raises :class:`~hearth.errors.ValidationError` for parameters the
    model does not allow and :class:`CommandFailed` when the device cannot do it now.
    ``start``/``stop`` run the app's own control loop on its own thread.
    """

    @property
    def model(self) -> ModelSpec: ...

    def readings(self) -> dict[str, Reading]: ...

    def execute(self, name: str, params: Mapping[str, object]) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def check_command(model: ModelSpec, name: str, params: Mapping[str, object]) -> None:
    """Defence in depth: the app re-checks a command against its model's spec."""
    spec = model.commands.get(name)
    if spec is None:
        raise ValidationError(Reason.UNKNOWN_COMMAND, f"{model.name} has no command {name!r}")
    validate_values(params, spec.params, what="parameter")
    missing = set(spec.params) - set(params)
    if missing:
        raise ValidationError(Reason.INVALID_SCHEMA, f"missing parameter {sorted(missing)[0]!r}")


class ControlLoop:
    """Calls :meth:`step` every ``tick`` seconds on a thread of its own.

    The loop never depends on the network and never dies of an exception in ``step`` (it is
    logged and counted). ``last_tick`` (monotonic seconds), ``ticks`` and ``max_gap`` (the
    longest interval between two steps) let tests and monitoring show that the device kept
    doing its job, for example during a network outage.
    """

    def __init__(self, *, tick: float, name: str) -> None:
        if not 0.001 <= tick <= 60.0:
            raise ValueError("tick must be between 0.001 and 60 seconds")
        self.tick = tick
        self._name = name
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_tick: float | None = None
        self.ticks = 0
        self.max_gap = 0.0
        self.step_errors = 0

    def step(self, dt: float) -> None:
        """Advance the device by ``dt`` seconds (override)."""
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        prev = time.monotonic()
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            gap = now - prev
            prev = now
            try:
                self.step(gap)
            except Exception:  # noqa: BLE001 - the control loop must outlive a bad step
                _log.exception("%s: control step failed", self._name)
                with self._lock:
                    self.step_errors += 1
            with self._lock:
                self.ticks += 1
                self.last_tick = now
                self.max_gap = max(self.max_gap, gap)
