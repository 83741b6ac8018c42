"""Reference device applications and the interface the agent drives them through.

``APPS`` maps a model name (:data:`hearth.protocol.MODELS`) to the app class that
implements it; every app works locally with no network (guideline 9).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from hearth.device.apps._base import CommandFailed, ControlLoop, DeviceApp, Reading
from hearth.device.apps.lock import LockApp
from hearth.device.apps.thermostat import ThermostatApp

__all__ = [
    "APPS",
    "CommandFailed",
    "ControlLoop",
    "DeviceApp",
    "LockApp",
    "Reading",
    "ThermostatApp",
]

APPS: Mapping[str, Callable[..., DeviceApp]] = {
    "thermostat": ThermostatApp,
    "lock": LockApp,
}
