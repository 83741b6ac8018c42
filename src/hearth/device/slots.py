"""A/B application slots and boot-time integrity (guidelines 3 and 7).

A unit holds two copies of its application, in ``slots/a`` and ``slots/b``. One is
*committed* (known good); a new bundle is always installed into the other one, so the unit can
never be left without a version that boots::

    UNIT/slots/state.json        {"committed", "pending", "versions", "boot_attempts", ...}
    UNIT/slots/a/app/...         the application's files
    UNIT/slots/a/manifest.json   the bundle's manifest (exact bytes)
    UNIT/slots/a/delivery.json   the signed TUF targets metadata that delivered the bundle
    UNIT/slots/.b.staging/       a bundle being extracted (never booted; removed at start)
    UNIT/update/trusted_root.json  the TUF root installed at minting (the trust anchor)
    UNIT/update/metadata/root_history/N.root.json  newer roots, each verified by the previous

Install (:meth:`SlotManager.install`)::

    forget the inactive slot (state) -> remove it -> extract into staging, verifying each file
    -> rename staging to the slot -> verify the slot from disk -> switch: state.pending = slot

The state file is replaced atomically (temp file, fsync, rename, fsync directory), so a crash
or ``kill -9`` at any point leaves the old state or the new one - and the old state always
points at the committed slot. The switch is the single commit point.

Boot (:meth:`SlotManager.boot`) runs at every start, before any application code:

1. A pending slot is on trial: its boot attempt is counted (durably) *before* it runs. After
   ``max_boot_attempts`` trial boots without a :meth:`commit`, the unit reverts by itself.
2. The slot to run is verified against its signed manifest: root (from the anchor, through
   the root history) -> targets signature -> manifest SHA-256 in the signed custom metadata
   -> each file's SHA-256 and length; and no file may be added, missing, or a symlink.
   Expiry is deliberately not checked: the software stays valid after the metadata expires.
3. If it does not verify it is not run: the unit falls back to the other slot if that one
   verifies, records an alert (kept until an operator acknowledges it: while it stands the
   unit is *quarantined* and talks only to the alerting endpoint) and, if neither verifies,
   reports ``safe_mode``.

After a trial boot the agent runs its health check (it connects and reports) and calls
:meth:`commit`; if the check fails or times out it calls :meth:`rollback` and restarts.

Example::

    slots = SlotManager(unit_dir)
    result = slots.boot()
    if result.safe_mode: ...            # run nothing; alert only
    run_app(result.app_dir)
    if result.trial and health_check(): slots.commit()
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError

from hearth._fsutil import Step, atomic_write, fsync_dir
from hearth.updates._fs import os_error
from hearth.updates.bundle import (
    DEFAULT_LIMITS,
    BundleLimits,
    Delivery,
    Manifest,
    ReleaseInfo,
    extract_bundle,
    parse_version,
    target_name_for,
)
from hearth.updates.errors import UpdateError, UpdateReason

__all__ = [
    "MAX_BOOT_ATTEMPTS",
    "SLOTS",
    "BootResult",
    "SlotCheck",
    "SlotManager",
    "SlotState",
    "boot",
    "provision_factory_image",
    "verify_active",
]

SLOTS = ("a", "b")
MAX_BOOT_ATTEMPTS = 3
STATE_FORMAT = 1
UPDATE_DIR = "update"
TRUSTED_ROOT = "trusted_root.json"
_MAX_ROOT_BYTES = 512 * 1024
_CHUNK = 64 * 1024



def _noop(_step: str) -> None:
    return None


def _other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def _utcnow() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


# --- state ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotState:
    """What ``slots/state.json`` says. ``active`` is the slot the unit boots next."""

    committed: str
    pending: str | None = None
    versions: Mapping[str, str | None] = field(default_factory=lambda: {"a": None, "b": None})
    boot_attempts: int = 0
    alert: Mapping[str, Any] | None = None
    last_result: Mapping[str, Any] | None = None

    @property
    def active(self) -> str:
        return self.pending or self.committed

    @property
    def needs_repair(self) -> bool:
        """The committed slot failed verification (an unacknowledged tamper alert names it):
        re-installing the *same* version is then allowed, to repair it."""
        return self.alert is not None and self.committed in self.alert.get("slots", ())

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "active": self.active,
            "committed": self.committed,
            "pending": self.pending,
            "versions": dict(self.versions),
            "boot_attempts": self.boot_attempts,
            "alert": dict(self.alert) if self.alert is not None else None,
            "last_result": dict(self.last_result) if self.last_result is not None else None,
        }

    @classmethod
    def parse(cls, raw: bytes) -> SlotState:
        """Strict parse; raises ``ValueError`` on anything unexpected."""
        obj = json.loads(raw)
        if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
            raise ValueError("not a slot state")
        committed, pending, versions = obj["committed"], obj["pending"], obj["versions"]
        attempts, alert, last = obj["boot_attempts"], obj["alert"], obj["last_result"]
        if committed not in SLOTS or (pending is not None and pending not in (_other(committed),)):
            raise ValueError("bad slots")
        if not isinstance(versions, dict) or set(versions) != set(SLOTS):
            raise ValueError("bad versions")
        for v in versions.values():
            if v is not None:
                parse_version(v)
        if versions[committed] is None or (pending is not None and versions[pending] is None):
            raise ValueError("a committed or pending slot must have a version")
        if not isinstance(attempts, int) or isinstance(attempts, bool) or not 0 <= attempts < 1000:
            raise ValueError("bad boot_attempts")
        if alert is not None and not isinstance(alert, dict):
            raise ValueError("bad alert")
        if last is not None and not isinstance(last, dict):
            raise ValueError("bad last_result")
        return cls(committed, pending, versions, attempts, alert, last)


@dataclass(frozen=True)
class SlotCheck:
    """The result of verifying one slot against its signed manifest."""

    slot: str
    ok: bool
    version: str | None = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class BootResult:
    """What :meth:`SlotManager.boot` decided.

    ``slot``/``app_dir`` is what to run (``None`` in safe mode). ``trial`` means a new version
    runs for the first time(s): commit after the health check, or roll back. ``tampered``
    lists slots whose files did not verify (``problems`` says which files). ``quarantined`` is
    true while a tamper alert waits for an operator: the unit talks only to the alerting
    endpoint. ``rolled_back`` is the reason a pending update was abandoned at this boot.
    """

    slot: str | None
    version: str | None
    app_dir: Path | None
    trial: bool = False
    safe_mode: bool = False
    tampered: tuple[str, ...] = ()
    problems: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    rolled_back: str | None = None
    quarantined: bool = False


# --- the manager ---------------------------------------------------------------------------------
class SlotManager:
    """The A/B slots of one unit directory. One process (the agent) uses it at a time;
    mutating methods also take an exclusive lock on ``slots/.lock``."""

    def __init__(
        self,
        unit_dir: Path,
        *,
        model: str | None = None,
        max_boot_attempts: int = MAX_BOOT_ATTEMPTS,
        limits: BundleLimits = DEFAULT_LIMITS,
    ) -> None:
        self.unit_dir = unit_dir
        self.dir = unit_dir / "slots"
        self.state_path = self.dir / "state.json"
        self.model = model if model is not None else _unit_model(unit_dir)
        if not 1 <= max_boot_attempts <= 100:
            raise ValueError("max_boot_attempts must be 1..100")
        self.max_boot_attempts = max_boot_attempts
        self.limits = limits
        self._roots: dict[int, Root] = {}

    def __repr__(self) -> str:
        return f"SlotManager({str(self.unit_dir)!r})"

    def app_dir(self, slot: str) -> Path:
        return self.dir / slot / "app"

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> SlotState:
        """The current state. Raises ``not_provisioned`` if there is none, ``io_error`` if it
        cannot be parsed (:meth:`boot` recovers from that)."""
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            raise UpdateError(UpdateReason.NOT_PROVISIONED, "no slot state") from None
        except OSError as e:
            raise os_error(e, "reading the slot state") from e
        try:
            return SlotState.parse(raw)
        except (ValueError, KeyError, TypeError, UpdateError):
            raise UpdateError(UpdateReason.IO_ERROR, "slot state is unreadable") from None

    def installed_version(self) -> str:
        """The committed (known-good) version: what updates are compared against."""
        st = self.state()
        version = st.versions[st.committed]
        assert version is not None
        return version

    def _write_state(self, st: SlotState, on_step: Step, step: str) -> None:
        data = (json.dumps(st.to_json(), indent=1, sort_keys=True) + "\n").encode()
        try:
            atomic_write(self.state_path, data, on_step=on_step, step=step)
        except OSError as e:
            raise os_error(e, "writing the slot state") from e
        on_step(step)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- provisioning and install --------------------------------------------------------------
    def provision_factory_image(self, bundle: Path, delivery: Delivery) -> str:
        """Install the factory image into slot ``a`` and commit it (at minting, once)."""
        with self._lock():
            if self.state_path.exists():
                raise UpdateError(UpdateReason.CONFLICT, "the unit already has a slot state")
            release, target = self._verify_delivery(delivery)
            _check_bundle_file(bundle, target)
            self._fill_slot("a", bundle, delivery, release, target, _noop)
            st = SlotState(committed="a", versions={"a": release.version, "b": None},
                           last_result={"version": release.version, "result": "factory",
                                        "at": _utcnow()})
            self._write_state(st, _noop, "provision")
            return "a"

    def install(self, bundle: Path, delivery: Delivery, *, on_step: Step | None = None) -> str:
        """Install a downloaded bundle into the inactive slot and make it pending.

        ``delivery`` is the signed targets metadata that listed the bundle (from the updater).
        Checks, before writing anything: the signature chain, the bundle's hash and length
        against the signed target, the model, that the version is newer than the committed
        one (or the same, to repair a committed slot that failed verification: see
        :attr:`SlotState.needs_repair`) and that the committed one is at least the bundle's
        ``min_from_version``.
        Idempotent: after a crash just call it again. ``on_step(name)`` is called after each
        durable step. Returns the slot. Raises :class:`UpdateError`.
        """
        step = on_step or _noop
        with self._lock():
            st = self.state()
            release, target = self._verify_delivery(delivery)
            installed = st.versions[st.committed]
            assert installed is not None
            if st.pending is not None:
                if st.versions[st.pending] == release.version:
                    return st.pending  # already installed and switched: nothing to do
                raise UpdateError(UpdateReason.SLOT_BUSY, "another update awaits its health check")
            offered, current = parse_version(release.version), parse_version(installed)
            if offered < current or (offered == current and not st.needs_repair):
                raise UpdateError(
                    UpdateReason.NOT_NEWER, f"{release.version} is not newer than {installed}"
                )
            if parse_version(installed) < parse_version(release.min_from_version):
                raise UpdateError(
                    UpdateReason.MIN_FROM_VERSION,
                    f"{release.version} needs at least {release.min_from_version}",
                )
            _check_bundle_file(bundle, target)
            slot = _other(st.committed)
            if st.versions[slot] is not None:
                st = replace(st, versions={**st.versions, slot: None})
                self._write_state(st, step, "forget")
            self._fill_slot(slot, bundle, delivery, release, target, step)
            check = self.verify_slot(slot)
            if not check.ok:
                raise UpdateError(UpdateReason.TAMPERED, f"slot {slot} did not verify: "
                                  + ", ".join(check.problems[:3]))
            st = replace(st, pending=slot, versions={**st.versions, slot: release.version},
                         boot_attempts=0)
            self._write_state(st, step, "switch")
            return slot

    def _fill_slot(
        self,
        slot: str,
        bundle: Path,
        delivery: Delivery,
        release: ReleaseInfo,
        target: TargetFile,
        step: Step,
    ) -> None:
        """Replace ``slot``'s contents with the verified bundle (staging dir, then rename)."""
        final = self.dir / slot
        staging = self.dir / f".{slot}.staging"
        try:
            _rmtree(staging)
            _rmtree(final)  # free its space first: the state no longer lists it
            manifest, raw = extract_bundle(
                bundle,
                staging / "app",
                expected_manifest_sha256=release.manifest_sha256,
                limits=self.limits,
                on_file=lambda path: step(f"extract:{path}"),
            )
            if (manifest.model, manifest.version, manifest.min_from_version) != (
                release.model, release.version, release.min_from_version
            ):
                raise UpdateError(UpdateReason.WRONG_MODEL if manifest.model != release.model
                                  else UpdateReason.BAD_BUNDLE,
                                  "the manifest does not match the signed release")
            atomic_write(staging / "manifest.json", raw)
            atomic_write(staging / "delivery.json", delivery.to_bytes())
            fsync_dir(staging)
            step("extracted")
            os.rename(staging, final)
            fsync_dir(self.dir)
            step("slot-replaced")
        except OSError as e:
            _rmtree_quiet(staging)
            raise os_error(e, f"installing into slot {slot}") from e
        except BaseException:
            _rmtree_quiet(staging)
            raise

    # -- trial, commit, rollback -----------------------------------------------------------------
    def commit(self, *, on_step: Step | None = None) -> str:
        """The pending slot passed its health check: it becomes the committed one."""
        with self._lock():
            st = self.state()
            if st.pending is None:
                return st.committed
            version = st.versions[st.pending]
            st = replace(st, committed=st.pending, pending=None, boot_attempts=0,
                         last_result={"version": version, "result": "committed",
                                      "at": _utcnow()})
            self._write_state(st, on_step or _noop, "commit")
            return st.committed

    def rollback(self, reason: str = "health_check", *, on_step: Step | None = None) -> str:
        """Abandon the pending slot; the committed one boots next. Returns that slot."""
        with self._lock():
            st = self._revert(self.state(), reason)
            self._write_state(st, on_step or _noop, "rollback")
            return st.committed

    def finish_trial(self, healthy: Callable[[], bool]) -> str:
        """After a trial boot: run the health check ``healthy()`` (the agent's "connected and
        reported", with its own timeout) and commit on ``True``; roll back on ``False`` or any
        exception. Returns the slot to run: if it is not the one running, restart."""
        st = self.state()
        if st.pending is None:
            return st.committed
        try:
            ok = bool(healthy())
        except Exception:  # noqa: BLE001 - any failure of the new version is a failed check
            ok = False
        return self.commit() if ok else self.rollback("health_check")

    def _revert(self, st: SlotState, reason: str) -> SlotState:
        if st.pending is None:
            return st
        failed = st.versions[st.pending]
        return replace(
            st, pending=None, boot_attempts=0,
            versions={**st.versions, st.pending: None},
            last_result={"version": failed, "result": "rolled_back", "reason": reason[:64],
                         "at": _utcnow()},
        )

    def acknowledge_alert(self) -> None:
        """An operator has acted on a tamper alert: lift the quarantine."""
        with self._lock():
            st = self.state()
            if st.alert is not None:
                self._write_state(replace(st, alert=None), _noop, "acknowledge")

    # -- boot -----------------------------------------------------------------------------------
    def boot(self, *, on_step: Step | None = None) -> BootResult:
        """Decide what to run at this start (see the module docstring). Never raises for a
        tampered or half-installed slot; raises ``not_provisioned`` for a unit with no slots."""
        step = on_step or _noop
        with self._lock():
            for slot in SLOTS:
                _rmtree_quiet(self.dir / f".{slot}.staging")
            try:
                st = self.state()
            except UpdateError as e:
                if e.reason is UpdateReason.NOT_PROVISIONED:
                    raise
                return self._recover(step)
            rolled_back = None
            if st.pending is not None:
                if st.boot_attempts + 1 > self.max_boot_attempts:
                    st = self._revert(st, "boot_attempts")
                    rolled_back = "boot_attempts"
                else:
                    st = replace(st, boot_attempts=st.boot_attempts + 1)
                self._write_state(st, step, "boot-attempt")
            candidate = st.active
            check = self.verify_slot(candidate)
            if check.ok:
                return self._result(st, candidate, rolled_back=rolled_back)
            tampered = [candidate]
            problems = {candidate: check.problems}
            if candidate == st.pending:
                st = self._revert(st, "tampered")
                rolled_back = "tampered"
            other = _other(candidate)
            fallback = self.verify_slot(other) if st.versions[other] is not None else None
            alert = {"kind": "tampered", "slots": list(tampered), "at": _utcnow(),
                     "problems": {k: list(v[:20]) for k, v in problems.items()}}
            if fallback is not None and fallback.ok:
                st = replace(st, committed=other, pending=None, boot_attempts=0, alert=alert,
                             versions={**st.versions, candidate: None})
                self._write_state(st, step, "fallback")
                return self._result(st, other, tampered=tampered, problems=problems,
                                    rolled_back=rolled_back)
            if fallback is not None:
                tampered.append(other)
                problems[other] = fallback.problems
                alert["slots"] = list(tampered)
                alert["problems"] = {k: list(v[:20]) for k, v in problems.items()}
            st = replace(st, alert=alert)
            self._write_state(st, step, "safe-mode")
            return BootResult(slot=None, version=None, app_dir=None, safe_mode=True,
                              tampered=tuple(tampered), problems=problems,
                              rolled_back=rolled_back, quarantined=True)

    def _result(
        self,
        st: SlotState,
        slot: str,
        *,
        tampered: list[str] | None = None,
        problems: dict[str, tuple[str, ...]] | None = None,
        rolled_back: str | None = None,
    ) -> BootResult:
        return BootResult(
            slot=slot,
            version=st.versions[slot],
            app_dir=self.app_dir(slot),
            trial=st.pending == slot,
            tampered=tuple(tampered or ()),
            problems=problems or {},
            rolled_back=rolled_back,
            quarantined=st.alert is not None,
        )

    def _recover(self, step: Step) -> BootResult:
        """The state file is unreadable: run the newest slot that verifies, and alert."""
        checks = [self.verify_slot(s) for s in SLOTS]
        good = sorted((c for c in checks if c.ok and c.version),
                      key=lambda c: parse_version(c.version or "0.0.0"))
        alert = {"kind": "state_unreadable", "slots": [c.slot for c in checks if not c.ok],
                 "at": _utcnow()}
        if not good:
            return BootResult(slot=None, version=None, app_dir=None, safe_mode=True,
                              tampered=tuple(SLOTS),
                              problems={c.slot: c.problems for c in checks}, quarantined=True)
        best = good[-1]
        versions = {c.slot: c.version if c.ok else None for c in checks}
        st = SlotState(committed=best.slot, versions=versions, alert=alert)
        self._write_state(st, step, "recover")
        return self._result(st, best.slot,
                            tampered=[c.slot for c in checks if not c.ok],
                            problems={c.slot: c.problems for c in checks if not c.ok})

    # -- verification ---------------------------------------------------------------------------
    def verify_slot(self, slot: str) -> SlotCheck:
        """Check ``slot`` against the signed manifest it holds. Never raises."""
        base = self.dir / slot
        try:
            delivery = Delivery.parse(_read_small(base / "delivery.json", 8 * 1024 * 1024))
            release, _target = self._verify_delivery(delivery)
            raw = _read_small(base / "manifest.json", self.limits.max_manifest_bytes)
            if hashlib.sha256(raw).hexdigest() != release.manifest_sha256:
                return SlotCheck(slot, False, None, ("manifest.json",))
            manifest = Manifest.parse(raw, limits=self.limits)
            if manifest.version != release.version or manifest.model != self.model:
                return SlotCheck(slot, False, None, ("manifest.json",))
        except UpdateError as e:
            return SlotCheck(slot, False, None, (f"delivery.json ({e.reason.value})",))
        except OSError:
            return SlotCheck(slot, False, None, ("delivery.json (missing)",))
        problems = _check_files(self.app_dir(slot), manifest)
        return SlotCheck(slot, not problems, manifest.version, tuple(problems))

    def verified_manifest(self, slot: str) -> Manifest:
        """The manifest of ``slot``, checked against the signed delivery it holds (root
        chain, targets signature, manifest hash, model) - not its files. The app loader
        checks every file it executes against it. Raises ``tampered`` or another
        :class:`UpdateError`."""
        base = self.dir / slot
        try:
            delivery = Delivery.parse(_read_small(base / "delivery.json", 8 * 1024 * 1024))
            release, _target = self._verify_delivery(delivery)
            raw = _read_small(base / "manifest.json", self.limits.max_manifest_bytes)
        except OSError as e:
            raise UpdateError(UpdateReason.TAMPERED, f"slot {slot} is incomplete") from e
        if hashlib.sha256(raw).hexdigest() != release.manifest_sha256:
            raise UpdateError(UpdateReason.TAMPERED, f"slot {slot}: manifest.json changed")
        manifest = Manifest.parse(raw, limits=self.limits)
        if manifest.version != release.version or manifest.model != self.model:
            raise UpdateError(UpdateReason.TAMPERED, f"slot {slot}: manifest.json changed")
        return manifest

    def _verify_delivery(self, delivery: Delivery) -> tuple[ReleaseInfo, TargetFile]:
        """root chain -> targets signature -> the target -> its release info (model, name)."""
        root = self._root(delivery.root_version)
        try:
            md = Metadata[Targets].from_bytes(delivery.targets_metadata)
        except DeserializationError as e:
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "targets metadata unreadable") from e
        if not isinstance(md.signed, Targets):
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "not targets metadata")
        try:
            root.verify_delegate(Targets.type, md.signed_bytes, md.signatures)
        except UnsignedMetadataError as e:
            raise UpdateError(UpdateReason.BAD_SIGNATURE, "targets signature invalid") from e
        target = md.signed.targets.get(delivery.target_name)
        if target is None:
            raise UpdateError(UpdateReason.NOT_FOUND, "the target is not in its metadata")
        release = ReleaseInfo.from_custom(target.custom)
        if target_name_for(release.model, release.version) != delivery.target_name:
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "target name and release differ")
        if release.model != self.model:
            raise UpdateError(UpdateReason.WRONG_MODEL,
                              f"bundle for {release.model}, this unit is a {self.model}")
        return release, target

    def _root(self, version: int) -> Root:
        """The root of ``version``, verified from the factory anchor through root_history."""
        if version in self._roots:
            return self._roots[version]
        update = self.unit_dir / UPDATE_DIR
        try:
            md = Metadata[Root].from_bytes(_read_small(update / TRUSTED_ROOT, _MAX_ROOT_BYTES))
            if not isinstance(md.signed, Root):
                raise UpdateError(UpdateReason.BAD_ROOT, "trusted root is not root metadata")
            md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
            current = md.signed
            if version < current.version:
                raise UpdateError(UpdateReason.BAD_ROOT, "delivery older than the trust anchor")
            history = update / "metadata" / "root_history"
            while current.version < version:
                nxt = Metadata[Root].from_bytes(
                    _read_small(history / f"{current.version + 1}.root.json", _MAX_ROOT_BYTES)
                )
                if not isinstance(nxt.signed, Root) or nxt.signed.version != current.version + 1:
                    raise UpdateError(UpdateReason.BAD_ROOT, "root history is inconsistent")
                current.verify_delegate(Root.type, nxt.signed_bytes, nxt.signatures)
                nxt.signed.verify_delegate(Root.type, nxt.signed_bytes, nxt.signatures)
                current = nxt.signed
        except FileNotFoundError as e:
            raise UpdateError(UpdateReason.BAD_ROOT, "a root is missing from the chain") from e
        except OSError as e:
            raise os_error(e, "reading the trusted root") from e
        except (DeserializationError, UnsignedMetadataError) as e:
            raise UpdateError(UpdateReason.BAD_ROOT, "trusted root chain does not verify") from e
        self._roots[version] = current
        return current


# --- helpers -------------------------------------------------------------------------------------
def _unit_model(unit_dir: Path) -> str:
    try:
        obj = json.loads(_read_small(unit_dir / "unit.json", 64 * 1024))
        model = obj["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UpdateError(UpdateReason.NOT_PROVISIONED, f"no unit.json in {unit_dir}") from e
    if not isinstance(model, str):
        raise UpdateError(UpdateReason.NOT_PROVISIONED, "unit.json model must be a string")
    return model


def _read_small(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UpdateError(UpdateReason.TOO_LARGE, f"{path.name} is too large")
    return data


def _check_bundle_file(bundle: Path, target: TargetFile) -> None:
    """The downloaded bundle is exactly the signed target (length and SHA-256)."""
    expected = target.hashes.get("sha256")
    if expected is None:
        raise UpdateError(UpdateReason.BAD_TARGET_INFO, "target has no sha256")
    h = hashlib.sha256()
    n = 0
    try:
        with bundle.open("rb") as f:
            while chunk := f.read(_CHUNK):
                n += len(chunk)
                if n > target.length:
                    break
                h.update(chunk)
    except OSError as e:
        raise os_error(e, "reading the bundle") from e
    if n != target.length or h.hexdigest() != expected:
        raise UpdateError(UpdateReason.HASH_MISMATCH, "bundle differs from its signed target")


def _check_files(app_dir: Path, manifest: Manifest) -> list[str]:
    """Every manifest file present with the right hash; nothing else (no symlinks)."""
    problems: list[str] = []
    seen: set[str] = set()
    if not app_dir.is_dir() or app_dir.is_symlink():
        return ["app/"]
    for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
        for name in list(dirnames):
            if (Path(dirpath) / name).is_symlink():
                problems.append(f"{Path(dirpath, name).relative_to(app_dir).as_posix()} (symlink)")
                dirnames.remove(name)
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(app_dir).as_posix()
            entry = manifest.files.get(rel)
            try:
                st = full.lstat()
            except OSError:
                problems.append(rel)
                continue
            if entry is None:
                problems.append(f"{rel} (unexpected)")
                continue
            seen.add(rel)
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry.length:
                problems.append(rel)
                continue
            if _sha256_file(full) != entry.sha256:
                problems.append(rel)
    problems.extend(f"{p} (missing)" for p in sorted(set(manifest.files) - seen))
    return problems


def _sha256_file(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _rmtree(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _rmtree_quiet(path: Path) -> None:
    try:
        _rmtree(path)
    except OSError:
        pass


# --- module-level conveniences (what factory.mint and the agent call) ---------------------------
def provision_factory_image(unit_dir: Path, bundle: Path, delivery: Delivery | bytes) -> str:
    """Put the factory image into slot ``a`` of a freshly minted unit and commit it.

    Needs the trusted root installed first
    (:func:`hearth.device.updater.install_trusted_root`). ``delivery`` comes from
    :meth:`hearth.updates.repository.Repository.delivery`. Returns ``"a"``.
    """
    if isinstance(delivery, bytes):
        delivery = Delivery.parse(delivery)
    return SlotManager(unit_dir).provision_factory_image(bundle, delivery)


def verify_active(unit_dir: Path) -> SlotCheck:
    """Verify the slot the unit would boot, without changing anything."""
    slots = SlotManager(unit_dir)
    return slots.verify_slot(slots.state().active)


def boot(unit_dir: Path, *, on_step: Step | None = None) -> BootResult:
    """:meth:`SlotManager.boot` for ``unit_dir``."""
    return SlotManager(unit_dir).boot(on_step=on_step)
