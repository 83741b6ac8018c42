"""Signed software updates (guidelines 3 and 7), on The Update Framework (python-tuf).

* :mod:`hearth.updates.bundle` - the application bundle and its manifest, the release info a
  bundle is signed with, and the delivery record a unit keeps (the shared update contract);
* :mod:`hearth.updates.keys` - offline root keys (threshold) and the service's online keys;
* :mod:`hearth.updates.repository` - the TUF repository on the Metadata API (publish,
  automatic timestamp re-signing, root rotation, consistent snapshots);
* :mod:`hearth.updates.support` - published support periods per model;
* :mod:`hearth.updates.reference` - the reference apps as bundles (entry ``app.py``);
* :mod:`hearth.updates.quickstart` - :func:`bootstrap`: root keys, repository and factory
  releases in one call (demo, tests, a first evaluation);
* :mod:`hearth.updates.errors` - :class:`UpdateError` and its stable reason codes.

The unit's side lives in :mod:`hearth.device.updater` (ngclient) and
:mod:`hearth.device.slots` (A/B install, boot-time integrity). See ``docs/updates.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hearth.updates.errors import UpdateError, UpdateReason

if TYPE_CHECKING:
    from hearth.updates.quickstart import bootstrap

__all__ = ["UpdateError", "UpdateReason", "bootstrap"]


def __getattr__(name: str) -> Any:
    # Lazy: the unit imports this package (errors) and must never load the repository code.
    if name == "bootstrap":
        from hearth.updates.quickstart import bootstrap

        return bootstrap
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
