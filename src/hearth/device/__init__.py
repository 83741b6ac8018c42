"""The runtime a maker ships inside a unit (Linux-class device).

* :mod:`~hearth.device.identity` - load and check the unit's identity from its directory;
* :mod:`~hearth.device.keystore` - the unit's private key behind a small interface;
* :mod:`~hearth.device.outbox` - persistent, bounded store-and-forward queue;
* :mod:`~hearth.device.link` - MQTT over mutual TLS with backoff and full jitter;
* :mod:`~hearth.device.agent` - wires app, outbox and link; validates commands;
* :mod:`~hearth.device.apps` - reference apps (thermostat, lock).

The device side shares only :mod:`hearth.protocol`, :mod:`hearth.errors` and
:mod:`hearth._fsutil` with the rest of Hearth; it never imports :mod:`hearth.service`.
"""

from hearth.device.agent import Agent, AgentStatus, run_device
from hearth.device.apps import APPS, CommandFailed, DeviceApp, LockApp, ThermostatApp
from hearth.device.identity import UnitIdentity
from hearth.device.keystore import FileKeyStore, KeyStore
from hearth.device.link import Backoff, Link
from hearth.device.outbox import Message, Outbox

__all__ = [
    "APPS",
    "Agent",
    "AgentStatus",
    "Backoff",
    "CommandFailed",
    "DeviceApp",
    "FileKeyStore",
    "KeyStore",
    "Link",
    "LockApp",
    "Message",
    "Outbox",
    "ThermostatApp",
    "UnitIdentity",
    "run_device",
]
