"""Signed software updates (guidelines 3 and 7), on The Update Framework (python-tuf).

* :mod:`hearth.updates.bundle` - the application bundle and its manifest, the release info a
  bundle is signed with, and the delivery record a unit keeps (the shared update contract);
* :mod:`hearth.updates.keys` - offline root keys (threshold) and the service's online keys;
* :mod:`hearth.updates.repository` - the TUF repository on the Metadata API (publish,
  automatic timestamp re-signing, root rotation, consistent snapshots);
* :mod:`hearth.updates.support` - published support periods per model;
* :mod:`hearth.updates.errors` - :class:`UpdateError` and its stable reason codes.

The unit's side lives in :mod:`hearth.device.updater` (ngclient) and
:mod:`hearth.device.slots` (A/B install, boot-time integrity). See ``docs/updates.md``.
"""

from hearth.updates.errors import UpdateError, UpdateReason

__all__ = ["UpdateError", "UpdateReason"]
