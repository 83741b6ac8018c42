"""Loading the device app from a verified slot, executing only bytes that match the manifest.

:meth:`hearth.device.slots.SlotManager.boot` verifies a slot's files at start. Between that
check and the import, a file could still change (a time-of-check/time-of-use gap), and
Python's normal import would also write ``__pycache__`` into the slot, which the next boot
would rightly call tampering. So the app is not imported from the file system: every
``.py`` file the manifest lists is read once, its SHA-256 and length checked against the
signed manifest (:meth:`SlotManager.verified_manifest`), and the modules are compiled from
those bytes by a meta-path finder that serves only this package. What runs is exactly what
was signed; nothing is written to the slot.

The bundle convention (:mod:`hearth.updates.reference`): ``app.py`` defines
``create_app(*, state=None, **options)``. It is imported as ``<package>.app`` of a package
private to this load, so a bundle's modules import each other relatively
(``from .thermostat import ThermostatApp``) and two versions can be loaded side by side
while the runtime switches from one to the other.

Example::

    loaded = load_app(slots, "b", options={"tick": 0.5})
    loaded.app.start()
    ...
    loaded.unload()
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import itertools
import sys
import threading
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth.device.apps import DeviceApp
from hearth.device.slots import SlotManager
from hearth.updates.errors import UpdateError, UpdateReason

__all__ = ["ENTRY_FUNCTION", "ENTRY_MODULE", "LoadedApp", "load_app"]

ENTRY_MODULE = "app"
ENTRY_FUNCTION = "create_app"
_counter = itertools.count(1)
_lock = threading.Lock()


class _VerifiedSource(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the modules of one package from verified in-memory sources."""

    def __init__(self, package: str, files: Mapping[str, bytes], origin: Path) -> None:
        self.package = package
        self.files = dict(files)
        self.origin = origin

    def _key(self, fullname: str) -> tuple[str, bool] | None:
        if fullname == self.package:
            return "__init__.py" if "__init__.py" in self.files else "", True
        if not fullname.startswith(self.package + "."):
            return None
        rel = fullname[len(self.package) + 1:].replace(".", "/")
        if f"{rel}/__init__.py" in self.files:
            return f"{rel}/__init__.py", True
        if f"{rel}.py" in self.files:
            return f"{rel}.py", False
        return None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        found = self._key(fullname)
        if found is None:
            return None
        key, is_package = found
        spec = importlib.machinery.ModuleSpec(
            fullname, self, origin=str(self.origin / key) if key else None,
            is_package=is_package,
        )
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        found = self._key(module.__name__)
        if found is None:  # pragma: no cover - find_spec answered for it
            raise ImportError(module.__name__)
        key, _is_package = found
        if not key:
            return  # the implicit package itself: nothing to run
        code = compile(self.files[key], str(self.origin / key), "exec", dont_inherit=True)
        exec(code, module.__dict__)  # noqa: S102 - the bytes are the signed, verified sources


@dataclass
class LoadedApp:
    """An app loaded from a slot: the object, and what is needed to unload its modules."""

    app: DeviceApp
    slot: str
    version: str
    package: str
    _finder: _VerifiedSource = field(repr=False)

    def unload(self) -> None:
        """Forget the app's modules (call after the app has stopped)."""
        with _lock:
            if self._finder in sys.meta_path:
                sys.meta_path.remove(self._finder)
            for name in [n for n in sys.modules
                         if n == self.package or n.startswith(self.package + ".")]:
                del sys.modules[name]


def _read_verified(slots: SlotManager, slot: str) -> tuple[str, dict[str, bytes]]:
    manifest = slots.verified_manifest(slot)
    if f"{ENTRY_MODULE}.py" not in manifest.files:
        raise UpdateError(UpdateReason.BAD_BUNDLE, f"the bundle has no {ENTRY_MODULE}.py")
    app_dir = slots.app_dir(slot)
    files: dict[str, bytes] = {}
    for rel, entry in manifest.files.items():
        if not rel.endswith(".py"):
            continue
        path = app_dir / rel
        try:
            with path.open("rb") as f:
                data = f.read(entry.length + 1)
        except OSError as e:
            raise UpdateError(UpdateReason.TAMPERED, f"{rel} cannot be read") from e
        if len(data) != entry.length or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise UpdateError(UpdateReason.TAMPERED, f"{rel} differs from the signed manifest")
        files[rel] = data
    return manifest.version, files


def load_app(
    slots: SlotManager,
    slot: str,
    *,
    options: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
) -> LoadedApp:
    """Load the app in ``slot`` (not started). Raises :class:`UpdateError`: ``tampered``
    (a file differs from the signed manifest), ``bad_bundle`` (no ``app.py``, no
    ``create_app``, an error while importing or building it, or an object that is not a
    device app of this unit's model)."""
    version, files = _read_verified(slots, slot)
    package = f"_hearth_app_{slot}_{version.replace('.', '_')}_{next(_counter)}"
    finder = _VerifiedSource(package, files, slots.app_dir(slot))
    with _lock:
        sys.meta_path.insert(0, finder)
    loaded = LoadedApp(app=None, slot=slot, version=version, package=package,  # type: ignore[arg-type]
                       _finder=finder)
    try:
        module = importlib.import_module(f"{package}.{ENTRY_MODULE}")
        factory = getattr(module, ENTRY_FUNCTION, None)
        if not callable(factory):
            raise UpdateError(UpdateReason.BAD_BUNDLE,
                              f"{ENTRY_MODULE}.py defines no {ENTRY_FUNCTION}()")
        app = factory(state=dict(state) if state else None, **dict(options or {}))
    except UpdateError:
        loaded.unload()
        raise
    except Exception as e:
        loaded.unload()
        raise UpdateError(UpdateReason.BAD_BUNDLE,
                          f"the app of slot {slot} failed to load: {type(e).__name__}") from e
    if not isinstance(app, DeviceApp) or getattr(app.model, "name", None) != slots.model:
        loaded.unload()
        raise UpdateError(UpdateReason.BAD_BUNDLE, f"slot {slot} holds no {slots.model} app")
    loaded.app = app
    return loaded
