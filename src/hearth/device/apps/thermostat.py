"""Reference thermostat: a simulated room, a heater relay and a hysteresis controller.

The room loses heat towards the outside temperature (first-order, time constant
``time_constant`` seconds) and the heater adds ``heater_power`` °C per second while on. The
controller switches the heater on below ``target - hysteresis`` and off above
``target + hysteresis``; between the two it keeps the relay as it is, so the relay does not
chatter. The control loop runs on its own thread (:class:`ControlLoop`) and keeps
regulating whatever the network does; the target can be set remotely (``set_target``
command) or locally (:meth:`ThermostatApp.set_target_locally`, the knob).

:meth:`ThermostatApp.step` advances the simulation deterministically, so tests drive the
physics without threads or clocks.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from hearth.device.apps._base import ControlLoop, Reading, check_command
from hearth.protocol import MODELS, ModelSpec

__all__ = ["ThermostatApp"]

_SPEC = MODELS["thermostat"]
_MAX_STEP = 10.0  # seconds of simulated time per Euler step


def _clamp(value: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, value))


class ThermostatApp(ControlLoop):
    """A simulated room thermostat (model ``thermostat``)."""

    model: ModelSpec = _SPEC

    def __init__(
        self,
        *,
        tick: float = 0.5,
        time_scale: float = 1.0,
        outside: float = 10.0,
        temperature: float = 18.0,
        target: float = 20.0,
        hysteresis: float = 0.5,
        time_constant: float = 1800.0,
        heater_power: float = 0.01,
        seed: int | None = None,
    ) -> None:
        super().__init__(tick=tick, name="thermostat-control")
        check_command(_SPEC, "set_target", {"target": target})
        if not 0.0 < hysteresis <= 5.0:
            raise ValueError("hysteresis must be in (0, 5] °C")
        if time_scale <= 0 or time_constant <= 0 or heater_power < 0:
            raise ValueError("time_scale and time_constant must be positive")
        self.time_scale = time_scale
        self.outside = outside
        self.hysteresis = hysteresis
        self.time_constant = time_constant
        self.heater_power = heater_power
        self._temperature = _clamp(temperature, -40.0, 85.0)
        self._target = float(target)
        self._factory_target = float(target)
        self._heater = False
        self._humidity = 45.0
        self._rng = random.Random(seed)  # noqa: S311 - simulation noise, not security
        self.heater_switches = 0

    # -- simulation and control -------------------------------------------------------

    def step(self, dt: float) -> None:
        """Advance the room and the controller by ``dt`` real seconds (× ``time_scale``)."""
        remaining = max(0.0, dt) * self.time_scale
        with self._lock:
            while remaining > 0:
                h = min(remaining, _MAX_STEP)
                remaining -= h
                self._control()
                heat = self.heater_power * h if self._heater else 0.0
                loss = (self.outside - self._temperature) * h / self.time_constant
                self._temperature = _clamp(self._temperature + loss + heat, -40.0, 85.0)
            self._control()
            noise = self._rng.gauss(0.0, 0.3)
            self._humidity = _clamp(45.0 + (20.0 - self._temperature) * 1.5 + noise, 0.0, 100.0)

    def _control(self) -> None:
        low = self._target - self.hysteresis
        high = self._target + self.hysteresis
        if self._temperature < low and not self._heater:
            self._heater = True
            self.heater_switches += 1
        elif self._temperature > high and self._heater:
            self._heater = False
            self.heater_switches += 1

    # -- DeviceApp --------------------------------------------------------------------

    def readings(self) -> dict[str, Reading]:
        with self._lock:
            return {
                "temperature": round(self._temperature, 2),
                "humidity": round(self._humidity, 1),
                "heater": self._heater,
                "target": self._target,
            }

    def execute(self, name: str, params: Mapping[str, object]) -> None:
        """Run a remote command; raises ``ValidationError`` for anything the model refuses."""
        check_command(self.model, name, params)
        target = params["target"]
        assert isinstance(target, int | float)  # checked by check_command
        with self._lock:
            self._target = float(target)
            self._control()

    def reset_user_data(self) -> None:
        """Factory reset: the owner's setting (the target) goes back to the factory value."""
        with self._lock:
            self._target = self._factory_target
            self._control()

    def set_target_locally(self, target: float) -> None:
        """The knob on the unit: works with no network at all."""
        self.execute("set_target", {"target": target})

    @property
    def temperature(self) -> float:
        with self._lock:
            return self._temperature

    @property
    def heater(self) -> bool:
        with self._lock:
            return self._heater

    @property
    def target(self) -> float:
        with self._lock:
            return self._target
