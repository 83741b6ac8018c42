"""Reference door lock: a simulated bolt, a door sensor and a slowly draining battery.

The bolt is thrown or withdrawn by a remote command (``lock``/``unlock``) or by the button
on the unit (:meth:`LockApp.operate_locally`), which works with no network at all.

Decision: the lock refuses to throw the bolt while the door sensor reports the door open
(:class:`CommandFailed` ``door_open``). A bolt thrown into an open door would stop the door
from closing and report "locked" for a door that is not - a state the owner would trust
wrongly. With an empty battery every operation fails (``battery_empty``) instead of
reporting a state the motor could not reach.

The control loop drains the battery over time (``drain_per_hour``); every operation costs a
little more (``operation_cost``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from hearth.device.apps._base import CommandFailed, ControlLoop, Reading, check_command
from hearth.protocol import MODELS, ModelSpec

__all__ = ["LockApp"]

_SPEC = MODELS["lock"]

Action = Literal["lock", "unlock"]
DoorState = Literal["open", "closed"]


class LockApp(ControlLoop):
    """A simulated smart lock (model ``lock``)."""

    model: ModelSpec = _SPEC

    def __init__(
        self,
        *,
        tick: float = 1.0,
        time_scale: float = 1.0,
        battery: float = 100.0,
        drain_per_hour: float = 0.01,
        operation_cost: float = 0.005,
        locked: bool = True,
        door: DoorState = "closed",
    ) -> None:
        super().__init__(tick=tick, name="lock-control")
        if not 0.0 <= battery <= 100.0:
            raise ValueError("battery must be 0..100 %")
        if door not in ("open", "closed"):
            raise ValueError("door must be open or closed")
        if time_scale <= 0 or drain_per_hour < 0 or operation_cost < 0:
            raise ValueError("time_scale must be positive and costs non-negative")
        self.time_scale = time_scale
        self.drain_per_hour = drain_per_hour
        self.operation_cost = operation_cost
        self._battery = float(battery)
        self._locked = locked
        self._door: DoorState = door
        self.operations: dict[str, int] = {"local": 0, "remote": 0}

    def step(self, dt: float) -> None:
        with self._lock:
            drain = self.drain_per_hour * max(0.0, dt) * self.time_scale / 3600.0
            self._battery = max(0.0, self._battery - drain)

    def _operate(self, action: Action, source: str) -> None:
        with self._lock:
            if self._battery <= 0.0:
                raise CommandFailed("battery_empty", "the battery is empty")
            if action == "lock" and self._door == "open":
                raise CommandFailed("door_open", "the door is open; close it before locking")
            self._locked = action == "lock"
            self._battery = max(0.0, self._battery - self.operation_cost)
            self.operations[source] += 1

    # -- DeviceApp --------------------------------------------------------------------

    def readings(self) -> dict[str, Reading]:
        with self._lock:
            return {
                "lock": "locked" if self._locked else "unlocked",
                "door": self._door,
                "battery": round(self._battery, 3),
            }

    def execute(self, name: str, params: Mapping[str, object]) -> None:
        """Run a remote command: ``lock`` or ``unlock`` (no parameters)."""
        check_command(self.model, name, params)
        self._operate("lock" if name == "lock" else "unlock", "remote")

    # -- local hardware ---------------------------------------------------------------

    def operate_locally(self, action: Action) -> None:
        """The button on the unit: works with no network at all."""
        if action not in ("lock", "unlock"):
            raise ValueError("action must be lock or unlock")
        self._operate(action, "local")

    def set_door(self, state: DoorState) -> None:
        """Simulated door sensor."""
        if state not in ("open", "closed"):
            raise ValueError("door must be open or closed")
        with self._lock:
            self._door = state

    @property
    def locked(self) -> bool:
        with self._lock:
            return self._locked

    @property
    def battery(self) -> float:
        with self._lock:
            return self._battery
