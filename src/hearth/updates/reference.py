"""The reference device applications as bundles: what the factory image and updates carry.

A bundle's entry point is its ``app.py`` (:data:`ENTRY_MODULE`), which defines::

    def create_app(*, state: Mapping[str, Any] | None = None, **options: Any) -> DeviceApp

The unit's runtime (:mod:`hearth.device.runtime`) imports ``app.py`` from the verified slot
as the package's ``app`` module (so ``from .thermostat import ...`` works), calls
``create_app`` and drives the returned object through the :class:`~hearth.device.apps.DeviceApp`
interface. ``state`` is the previous version's ``readings()`` when the runtime switches
versions in place, so the device carries on from where it was (the room temperature and
target of a thermostat, the bolt, door and battery of a lock). The runtime, the protocol
(``hearth.protocol``) and the control-loop base class (``hearth.device.apps._base``) are
the platform the bundle runs on; they are not part of it.

:func:`write_reference_app` writes the source tree of a model's reference app - its module
copied verbatim from :mod:`hearth.device.apps` plus an ``app.py`` - and
:func:`build_reference_bundle` packs it (``hearth release bundle --reference``).

Example::

    build_reference_bundle("thermostat", "1.1.0", out=Path("thermostat-1.1.0.tar"),
                           min_from_version="1.0.0")
"""

from __future__ import annotations

import importlib.resources
import tempfile
from pathlib import Path

from hearth.protocol import MODELS
from hearth.updates.bundle import Manifest, build_bundle
from hearth.updates.errors import UpdateError, UpdateReason

__all__ = [
    "ENTRY_FUNCTION",
    "ENTRY_MODULE",
    "build_reference_bundle",
    "write_reference_app",
]

ENTRY_MODULE = "app.py"
"""The file in a bundle the runtime imports."""
ENTRY_FUNCTION = "create_app"
"""The function in :data:`ENTRY_MODULE` that builds the app."""

_APP_CLASS = {"thermostat": "ThermostatApp", "lock": "LockApp"}

_RESTORE = {
    "thermostat": '''    if state:
        for key in ("temperature", "target"):
            value = state.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                options.setdefault(key, float(value))
''',
    "lock": '''    if state:
        if state.get("lock") in ("locked", "unlocked"):
            options.setdefault("locked", state["lock"] == "locked")
        if state.get("door") in ("open", "closed"):
            options.setdefault("door", state["door"])
        battery = state.get("battery")
        if isinstance(battery, int | float) and not isinstance(battery, bool):
            options.setdefault("battery", float(battery))
''',
}

_ENTRY = '''"""Entry module of the reference {model} application, version {version}.

Bundle convention: ``create_app(*, state=None, **options)`` returns the device app; ``state``
is the previous version's readings when the unit switches versions in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .{model} import {cls}

VERSION = "{version}"


def create_app(*, state: Mapping[str, Any] | None = None, **options: Any) -> {cls}:
{restore}    return {cls}(**options)
'''


def write_reference_app(model: str, dest: Path, *, version: str) -> Path:
    """Write the reference app of ``model`` (``app.py`` + ``<model>.py``) into ``dest``."""
    if model not in MODELS or model not in _APP_CLASS:
        raise UpdateError(UpdateReason.WRONG_MODEL, f"no reference app for model {model!r}")
    source = importlib.resources.files("hearth.device.apps").joinpath(f"{model}.py")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{model}.py").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    (dest / ENTRY_MODULE).write_text(
        _ENTRY.format(model=model, version=version, cls=_APP_CLASS[model],
                      restore=_RESTORE[model]),
        encoding="utf-8",
    )
    return dest


def build_reference_bundle(
    model: str, version: str, *, out: Path, min_from_version: str = "0.0.0"
) -> Manifest:
    """Build the bundle of ``model``'s reference app at ``version`` into ``out``."""
    with tempfile.TemporaryDirectory(prefix="hearth-bundle-") as tmp:
        src = write_reference_app(model, Path(tmp) / "app", version=version)
        return build_bundle(src, model=model, version=version,
                            min_from_version=min_from_version, out=out)
