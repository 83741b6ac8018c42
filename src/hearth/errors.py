"""One exception tree for all of Hearth.

::

    HearthError
    ├── ConfigError          configuration is missing or invalid (checked at start)
    ├── ValidationError      untrusted input failed a check; carries a stable ``reason`` code
    ├── PKIError             a certificate or key could not be made, loaded or verified
    ├── BrokerError          the MQTT broker could not be configured, started or controlled
    ├── DeviceError          the device runtime could not load its identity or run
    └── NotFoundError        a named resource does not exist (or the caller may not see it)

Foreign exceptions are converted at the boundary with ``raise ... from e`` so callers
only ever need to catch :class:`HearthError`.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "DeviceError",
    "HearthError",
    "NotFoundError",
    "PKIError",
    "ValidationError",
]


class HearthError(Exception):
    """Base class of every error Hearth raises on purpose."""


class ConfigError(HearthError):
    """Configuration is missing or invalid."""


class ValidationError(HearthError):
    """Untrusted input was refused.

    ``reason`` is a stable, machine-readable code (see :mod:`hearth.protocol` ``Reason``);
    ``detail`` is a short human-readable explanation that never echoes secrets.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class PKIError(HearthError):
    """A certificate or key could not be created, loaded or verified."""


class BrokerError(HearthError):
    """The MQTT broker could not be configured, started or controlled."""


class DeviceError(HearthError):
    """The device runtime could not load its identity or run."""


class NotFoundError(HearthError):
    """A named resource does not exist, or the caller may not see it."""
