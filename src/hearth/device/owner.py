"""The unit's owner binding, its setup code check, and factory reset (guidelines 1 and 11).

A unit is *unclaimed* until the service sends ``bind_owner`` (after its buyer claimed it):
then it stores, in ``state/owner.json`` (0600), an opaque owner reference and the
*verifier* of the owner's local-access credential (:func:`hearth.protocol.owner_verifier`)
- never the credential itself. Who may use the unit's local API follows from that:

* unclaimed: only the unit's own setup code, checked against ``setup.hash`` (the scrypt
  hash the factory wrote; the unit never holds the code itself);
* claimed: only the owner's credential; the setup code no longer opens anything.

A binding file that cannot be read is treated as claimed by nobody reachable (fail
closed: neither the setup code nor any credential works) until a factory reset.

:func:`factory_reset` (the owner's ``factory_reset`` command, the reset button, or
``hearth device reset --dir DIR``) erases the binding, the local user data
(``state/user/``, and the app's settings through ``reset_user_data()``) and the queued
messages (personal data: telemetry, events, results), and keeps everything that makes the
unit itself: its key, certificate, broker secret, setup hash, software slots and sequence
counter. It queues a ``factory_reset`` event naming the owner reference it erased, so the
service ends that binding. Afterwards the unit is unclaimed again: claimable and usable
locally only with its own setup code - never with a shared default.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hearth._fsutil import write_secret
from hearth.errors import DeviceError, ValidationError
from hearth.protocol import Event, device_topic, encode, owner_verifier

__all__ = [
    "OWNER_FILE",
    "RESET_EVENT",
    "USER_DATA_DIR",
    "OwnerBinding",
    "OwnerStore",
    "factory_reset",
    "reset_unit_directory",
]

OWNER_FILE = Path("state") / "owner.json"
USER_DATA_DIR = Path("state") / "user"
SETUP_HASH_FILE = "setup.hash"
RESET_EVENT = "factory_reset"
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{16,32}\Z")
_MAX_FILE = 4096


@dataclass(frozen=True)
class OwnerBinding:
    owner: str
    verifier: str
    bound_at: str


class _Corrupt:
    """Marker: the binding file exists but cannot be trusted."""


class OwnerStore:
    """The owner binding of the unit in ``directory`` (thread-safe)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._path = directory / OWNER_FILE
        self._lock = threading.Lock()

    def _load(self) -> OwnerBinding | _Corrupt | None:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return _Corrupt()
        try:
            data = json.loads(raw[:_MAX_FILE])
            owner, verifier, at = data["owner"], data["verifier"], data["bound_at"]
        except (ValueError, KeyError, TypeError):
            return _Corrupt()
        if not all(isinstance(v, str) for v in (owner, verifier, at)) or not (
                _TOKEN_RE.match(owner) and _TOKEN_RE.match(verifier)):
            return _Corrupt()
        return OwnerBinding(owner, verifier, at)

    def binding(self) -> OwnerBinding | None:
        """The current binding (``None`` when unclaimed or unreadable)."""
        with self._lock:
            b = self._load()
        return b if isinstance(b, OwnerBinding) else None

    @property
    def claimed(self) -> bool:
        """True when bound - or when the binding file is unreadable (fail closed)."""
        with self._lock:
            return self._load() is not None

    def bind(self, owner: str, verifier: str, *, now: dt.datetime | None = None) -> None:
        """Store a binding (replacing any other: the service serialises owners)."""
        if not _TOKEN_RE.match(owner) or not _TOKEN_RE.match(verifier):
            raise ValidationError("wrong_type", "owner and verifier must be tokens")
        at = (now or dt.datetime.now(dt.UTC)).isoformat()
        with self._lock:
            write_secret(self._path, json.dumps(
                {"owner": owner, "verifier": verifier, "bound_at": at}).encode())

    def unbind(self, owner: str | None = None) -> str:
        """Forget the binding (only ``owner``'s, if given); returns the reference erased
        (``""`` when there was none or it was another owner's)."""
        with self._lock:
            current = self._load()
            if current is None:
                return ""
            if owner is not None and (
                    not isinstance(current, OwnerBinding) or current.owner != owner):
                return ""
            self._path.unlink(missing_ok=True)
            return current.owner if isinstance(current, OwnerBinding) else ""

    def check_owner_credential(self, credential: str) -> bool:
        """Whether ``credential`` is the bound owner's (constant-time compare)."""
        b = self.binding()
        if b is None or not isinstance(credential, str) or len(credential) > 128:
            return False
        return hmac.compare_digest(owner_verifier(credential).encode(), b.verifier.encode())

    def check_setup_code(self, code: str) -> bool:
        """Whether ``code`` is this unit's setup code - only while it is unclaimed."""
        if self.claimed:
            return False
        return check_setup_code(self.directory, code)


def check_setup_code(directory: Path, code: str) -> bool:
    """Check ``code`` against the unit's ``setup.hash`` (scrypt), whatever its binding."""
    from hearth.factory import scrypt_verify
    from hearth.setupcode import normalize

    try:
        canonical = normalize(code)
    except ValidationError:
        return False
    try:
        stored = json.loads((directory / SETUP_HASH_FILE).read_bytes()[:_MAX_FILE])
    except (OSError, ValueError):
        return False
    return isinstance(stored, dict) and scrypt_verify(canonical, stored)


def _erase_user_data(directory: Path) -> None:
    user = directory / USER_DATA_DIR
    if user.exists():
        shutil.rmtree(user)
    user.mkdir(mode=0o700, parents=True, exist_ok=True)


def factory_reset(directory: Path, *, owner: OwnerStore, purge_outbox: Callable[[], int],
                  app: Any = None) -> str:
    """Erase the binding, user data and queued messages; returns the owner reference
    erased (``""`` if none). The caller queues the ``factory_reset`` event afterwards."""
    erased = owner.unbind()
    if not erased and (directory / OWNER_FILE).exists():  # an unreadable binding
        (directory / OWNER_FILE).unlink(missing_ok=True)
    _erase_user_data(directory)
    reset = getattr(app, "reset_user_data", None)
    if callable(reset):
        reset()
    purge_outbox()
    return erased


def reset_unit_directory(directory: Path) -> str:
    """``hearth device reset``: factory-reset the unit in ``directory`` while its agent is
    not running (refuses otherwise). Returns the owner reference erased."""
    import fcntl

    from hearth.device.identity import UnitIdentity
    from hearth.device.outbox import Outbox

    identity = UnitIdentity.load(directory)  # refuses a damaged unit with a clear error
    lock_path = directory / "state" / "agent.lock"
    lock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with lock_path.open("ab") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise DeviceError("the unit is running; stop it before a factory reset") from e
        with Outbox.for_unit(directory) as outbox:
            erased = factory_reset(directory, owner=OwnerStore(directory),
                                   purge_outbox=outbox.purge)
            topic = device_topic(identity.device_id, "event")
            ts = dt.datetime.now(dt.UTC)

            def build(seq: int) -> bytes:
                return encode(Event(device_id=identity.device_id, seq=seq, ts=ts,
                                    kind=RESET_EVENT, detail=erased))

            outbox.put("event", topic, build)
    os.sync()
    return erased
