"""The service's TUF update repository, built on python-tuf's Metadata API.

Four top-level roles sign the repository (TUF specification 1.0):

=========  ==========================  ==========  ===============================================
role       key                         expiry      signs
=========  ==========================  ==========  ===============================================
root       offline, K of N (keys.py)   1 year      the keys of every role (rotation = new version)
targets    online (service data, 0600) 90 days     each bundle's hashes, length, custom metadata
snapshot   online                      7 days      the current targets version (+ hash, length)
timestamp  online                      1 day       the current snapshot version (+ hash, length)
=========  ==========================  ==========  ===============================================

Consistent snapshots are on: metadata is published as ``N.root.json``, ``N.targets.json``,
``N.snapshot.json`` (only ``timestamp.json`` is unversioned) and targets as
``<dir>/<sha256>.<name>``, so a client always reads one coherent repository state while a new
one is being written, and a publish becomes visible atomically when ``timestamp.json`` is
replaced. Every change re-signs in the order targets -> snapshot -> timestamp.

Directory layout (serve ``metadata/`` at ``/updates/metadata/`` and ``targets/`` at
``/updates/targets/``; both are static files)::

    REPO/metadata/1.root.json  2.root.json ...  root.json (copy of the newest root)
    REPO/metadata/N.targets.json  N.snapshot.json  timestamp.json
    REPO/targets/<model>/<sha256>.<model>-<version>.tar
    REPO/.lock                          serialises writers (CLI publish vs. service refresh)

The timestamp expires after a day; the service calls :meth:`Repository.refresh_if_due`
periodically and every online role is re-signed once half of its validity has passed, so a
unit never sees expired metadata from an honest repository, and a frozen (replayed) timestamp
goes stale within a day.

Example::

    root = init_root(keys_dir, threshold=2, count=3)
    repo = Repository.create(data / "updates", online_keys_dir=data / "update-keys",
                             root_keys=root)
    repo.publish(Path("thermostat-1.1.0.tar"), model="thermostat", version="1.1.0",
                 min_from_version="1.0.0")
    repo.refresh_if_due()
"""

from __future__ import annotations

import copy
import datetime as dt
import fcntl
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from hearth._fsutil import atomic_write, fsync_dir
from hearth.errors import ConfigError
from hearth.protocol import MODELS
from hearth.updates._fs import os_error
from hearth.updates.bundle import (
    DEFAULT_LIMITS,
    BundleLimits,
    Delivery,
    ReleaseInfo,
    parse_version,
    read_manifest,
    target_name_for,
    verify_bundle,
)
from hearth.updates.errors import UpdateError, UpdateReason
from hearth.updates.keys import OfflineRootKeys, OnlineKeys

__all__ = ["ONLINE_ROLES", "Expiries", "Release", "Repository"]

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
_ROOT_FILE_RE = re.compile(r"^([1-9][0-9]{0,8})\.root\.json\Z")
_CHUNK = 1024 * 1024
_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)


@dataclass(frozen=True)
class Expiries:
    """How long each role's metadata stays valid. Online roles are re-signed at half-life."""

    root: dt.timedelta = dt.timedelta(days=365)
    targets: dt.timedelta = dt.timedelta(days=90)
    snapshot: dt.timedelta = dt.timedelta(days=7)
    timestamp: dt.timedelta = dt.timedelta(days=1)

    def __post_init__(self) -> None:
        for name in ("root", "targets", "snapshot", "timestamp"):
            if getattr(self, name) < dt.timedelta(minutes=10):
                raise ConfigError(f"{name} expiry must be at least 10 minutes")

    def of(self, role: str) -> dt.timedelta:
        value: dt.timedelta = getattr(self, role)
        return value


@dataclass(frozen=True)
class Release:
    """A published bundle as the repository lists it."""

    target_name: str
    info: ReleaseInfo
    length: int
    sha256: str


@dataclass
class _State:
    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load(path: Path, cls: type[_S]) -> Metadata[_S]:
    try:
        md = Metadata[_S].from_bytes(path.read_bytes())
    except (OSError, DeserializationError) as e:
        raise UpdateError(UpdateReason.REPOSITORY_ERROR, f"cannot load {path.name}") from e
    if not isinstance(md.signed, cls):
        raise UpdateError(UpdateReason.REPOSITORY_ERROR, f"{path.name} is not {cls.type}")
    return md


def _sign_root(md: Metadata[Root], previous: Root | None, signers: Sequence[Signer]) -> None:
    """Sign ``md`` with every useful signer, then demand both thresholds (old and new root)."""
    wanted = set(md.signed.roles[Root.type].keyids)
    if previous is not None:
        wanted |= set(previous.roles[Root.type].keyids)
    seen: set[str] = set()
    for signer in signers:
        keyid = signer.public_key.keyid
        if keyid in wanted and keyid not in seen:
            md.sign(signer, append=True)
            seen.add(keyid)
    result = md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures)
    if not result.verified:
        parts = [
            f"root v{previous.version if previous else md.signed.version}: "
            f"{len(result.first.signed)} of {result.first.threshold}",
            f"root v{md.signed.version}: {len(result.second.signed)} of "
            f"{result.second.threshold}",
        ]
        raise UpdateError(
            UpdateReason.THRESHOLD_NOT_MET, "not enough root signatures (" + "; ".join(parts) + ")"
        )


class Repository:
    """One TUF repository on disk. Every mutating method takes an exclusive file lock and
    reloads the current state first, so the CLI and the running service can both use it."""

    def __init__(
        self,
        path: Path,
        *,
        online_keys_dir: Path,
        clock: Callable[[], dt.datetime] = _utcnow,
        expiries: Expiries | None = None,
        limits: BundleLimits = DEFAULT_LIMITS,
    ) -> None:
        self.path = path
        self.metadata_dir = path / "metadata"
        self.targets_dir = path / "targets"
        self._online = OnlineKeys(online_keys_dir)
        self._clock = clock
        self.expiries = expiries or Expiries()
        self.limits = limits
        self._serializer = JSONSerializer(compact=False)

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r})"

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: Path,
        *,
        online_keys_dir: Path,
        root_keys: OfflineRootKeys,
        clock: Callable[[], dt.datetime] = _utcnow,
        expiries: Expiries | None = None,
        scheme: str = "ed25519",
    ) -> Repository:
        """Create a new repository: root v1 signed by ``root_keys`` (at least its threshold),
        one new online key per online role, and empty targets. Refuses an existing one."""
        repo = cls(path, online_keys_dir=online_keys_dir, clock=clock, expiries=expiries)
        if repo.metadata_dir.exists() and any(repo.metadata_dir.iterdir()):
            raise ConfigError(f"{repo.metadata_dir} already holds a repository")
        now = repo._now()
        root = Root(version=1, expires=now + repo.expiries.root, consistent_snapshot=True)
        for key in root_keys.keys:
            root.add_key(key, Root.type)
        root.roles[Root.type].threshold = root_keys.threshold
        new_keys: list[str] = []
        try:
            for role in ONLINE_ROLES:
                signer = repo._online.new(scheme)
                new_keys.append(signer.public_key.keyid)
                root.add_key(signer.public_key, role)
            root_md = Metadata(root)
            _sign_root(root_md, None, root_keys.signers)
        except BaseException:
            for keyid in new_keys:
                (online_keys_dir / f"{keyid}.pem").unlink(missing_ok=True)
            raise
        with repo._lock():
            repo.targets_dir.mkdir(parents=True, exist_ok=True)
            repo._write_root(root_md)
            state = _State(
                root=root_md,
                targets=Metadata(Targets(expires=now)),
                snapshot=Metadata(Snapshot(expires=now)),
                timestamp=Metadata(Timestamp(expires=now, snapshot_meta=MetaFile(1))),
            )
            for md in (state.targets, state.snapshot, state.timestamp):
                md.signed.version = 0  # _commit bumps every role to version 1
            repo._commit(state, now, targets=True)
        return repo

    # -- reading --------------------------------------------------------------------------------
    def _now(self) -> dt.datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ConfigError("the repository clock must be timezone-aware (UTC)")
        return now

    def _root_versions(self) -> list[int]:
        try:
            names = os.listdir(self.metadata_dir)
        except OSError as e:
            raise UpdateError(UpdateReason.NOT_PROVISIONED, f"no repository at {self.path}") from e
        return sorted(int(m.group(1)) for n in names if (m := _ROOT_FILE_RE.match(n)))

    def _load_state(self) -> _State:
        versions = self._root_versions()
        if not versions:
            raise UpdateError(UpdateReason.NOT_PROVISIONED, f"no repository at {self.path}")
        root = _load(self.metadata_dir / f"{versions[-1]}.root.json", Root)
        timestamp = _load(self.metadata_dir / "timestamp.json", Timestamp)
        snap_v = timestamp.signed.snapshot_meta.version
        snapshot = _load(self.metadata_dir / f"{snap_v}.snapshot.json", Snapshot)
        targets_v = snapshot.signed.meta["targets.json"].version
        targets = _load(self.metadata_dir / f"{targets_v}.targets.json", Targets)
        return _State(root, targets, snapshot, timestamp)

    def trusted_root(self) -> bytes:
        """The newest root metadata, as bytes: what the factory installs into each unit."""
        versions = self._root_versions()
        if not versions:
            raise UpdateError(UpdateReason.NOT_PROVISIONED, f"no repository at {self.path}")
        return (self.metadata_dir / f"{versions[-1]}.root.json").read_bytes()

    def root_version(self) -> int:
        return self._root_versions()[-1]

    def releases(self, model: str | None = None) -> list[Release]:
        """Published bundles (optionally of one model), oldest version first."""
        state = self._load_state()
        out = []
        for name, tf in state.targets.signed.targets.items():
            try:
                info = ReleaseInfo.from_custom(tf.custom)
            except UpdateError:
                continue
            if model is None or info.model == model:
                out.append(Release(name, info, tf.length, tf.hashes.get("sha256", "")))
        return sorted(out, key=lambda r: (r.info.model, parse_version(r.info.version)))

    def latest(self, model: str) -> Release | None:
        releases = self.releases(model)
        return releases[-1] if releases else None

    def target_file(self, target_name: str) -> Path:
        """Where the bundle published as ``target_name`` is stored (hash-prefixed name)."""
        tf = self._load_state().targets.signed.targets.get(target_name)
        if tf is None:
            raise UpdateError(UpdateReason.NOT_FOUND, f"{target_name!r} is not published")
        return self._target_path(target_name, tf.hashes["sha256"])

    def delivery(self, target_name: str) -> Delivery:
        """The signed evidence a unit keeps with ``target_name`` (used to provision the factory
        image into a unit's slot A)."""
        state = self._load_state()
        if target_name not in state.targets.signed.targets:
            raise UpdateError(UpdateReason.NOT_FOUND, f"{target_name!r} is not published")
        path = self.metadata_dir / f"{state.targets.signed.version}.targets.json"
        return Delivery(
            target_name=target_name,
            root_version=state.root.signed.version,
            targets_metadata=path.read_bytes(),
        )

    def snapshot_version(self) -> int:
        """The snapshot version the current timestamp names; it changes with every publish
        (cheap: reads ``timestamp.json`` only)."""
        return _load(self.metadata_dir / "timestamp.json",
                     Timestamp).signed.snapshot_meta.version

    def expiry(self) -> dict[str, dt.datetime]:
        """Current expiry of every role (operators watch ``root``: it needs the offline keys)."""
        state = self._load_state()
        return {
            "root": state.root.signed.expires,
            "targets": state.targets.signed.expires,
            "snapshot": state.snapshot.signed.expires,
            "timestamp": state.timestamp.signed.expires,
        }

    # -- publishing -----------------------------------------------------------------------------
    def publish(
        self, bundle: Path, *, model: str, version: str, min_from_version: str
    ) -> Release:
        """Add ``bundle`` as the release ``model``/``version`` and re-sign.

        The stored copy of the bundle is checked completely
        (:func:`~hearth.updates.bundle.verify_bundle`) before it is signed: its manifest must
        state the same model, version and minimum version. A version can be published once
        (``conflict`` otherwise). Raises :class:`UpdateError`.
        """
        if model not in MODELS:
            raise UpdateError(UpdateReason.WRONG_MODEL, f"unknown model {model!r}")
        return self._add_target(target_name_for(model, version), bundle,
                                expect=(model, version, min_from_version))

    def _add_target(
        self,
        target_name: str,
        bundle: Path,
        *,
        expect: tuple[str, str, str] | None = None,
        custom: dict[str, Any] | None = None,
    ) -> Release:
        """Copy ``bundle`` into the targets store and sign it under ``target_name``.

        With ``expect`` the stored copy is verified and its release info derived from its
        manifest; with ``custom`` (tests only: hostile releases) that is trusted as given."""
        with self._lock():
            state = self._load_state()
            if target_name in state.targets.signed.targets:
                raise UpdateError(UpdateReason.CONFLICT, f"{target_name!r} is already published")
            tmp, length, sha256 = self._copy_in(bundle)
            try:
                if custom is None:
                    assert expect is not None
                    custom = self._release_info(tmp, expect).to_custom()
                dest = self._target_path(target_name, sha256)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
                fsync_dir(dest.parent)
            except OSError as e:
                raise os_error(e, "storing the bundle") from e
            finally:
                tmp.unlink(missing_ok=True)
            tf = TargetFile(length, {"sha256": sha256}, target_name, {"custom": custom})
            state.targets.signed.targets[target_name] = tf
            self._commit(state, self._now(), targets=True)
        return Release(target_name, ReleaseInfo.from_custom(custom), length, sha256)

    def _release_info(self, stored: Path, expect: tuple[str, str, str]) -> ReleaseInfo:
        manifest = verify_bundle(stored, limits=self.limits)
        found = (manifest.model, manifest.version, manifest.min_from_version)
        if found != expect:
            raise UpdateError(
                UpdateReason.BAD_BUNDLE,
                f"the bundle's manifest is {found[0]} {found[1]} (from {found[2]}), "
                f"not {expect[0]} {expect[1]} (from {expect[2]})",
            )
        _manifest, raw = read_manifest(stored, limits=self.limits)
        return ReleaseInfo.for_manifest(manifest, raw)

    def _target_path(self, target_name: str, sha256: str) -> Path:
        dirname, _sep, base = target_name.rpartition("/")
        return self.targets_dir / dirname / f"{sha256}.{base}"

    def _copy_in(self, bundle: Path) -> tuple[Path, int, str]:
        """Copy ``bundle`` to a private temp file while hashing it (what is verified and
        signed is exactly what is stored), fsync it. Returns (temp path, length, sha256)."""
        tmp_dir = self.path / ".incoming"  # same file system as targets/, not served
        tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f"{os.getpid()}.tmp"
        h = hashlib.sha256()
        length = 0
        try:
            with bundle.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(_CHUNK):
                    length += len(chunk)
                    if length > self.limits.max_bundle_bytes:
                        raise UpdateError(UpdateReason.TOO_LARGE, "bundle too large")
                    h.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.chmod(tmp, 0o644)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise os_error(e, "copying the bundle") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, length, h.hexdigest()

    def prune(self, *, keep: int = 20) -> int:
        """Delete versioned snapshot/targets metadata older than the newest ``keep`` (a client
        only ever fetches the versions the current timestamp and snapshot name). Returns the
        number of files deleted. Root versions are never deleted: clients walk them all."""
        if keep < 2:
            raise ConfigError("keep at least 2 versions of each role")
        removed = 0
        with self._lock():
            state = self._load_state()
            current = {"snapshot": state.snapshot.signed.version,
                       "targets": state.targets.signed.version}
            for path in self.metadata_dir.iterdir():
                m = re.fullmatch(r"([0-9]+)\.(snapshot|targets)\.json", path.name)
                if m and int(m.group(1)) <= current[m.group(2)] - keep:
                    path.unlink()
                    removed += 1
        return removed

    # -- re-signing ----------------------------------------------------------------------------
    def _due_roles(self, state: _State, now: dt.datetime) -> list[str]:
        due = []
        for role in ONLINE_ROLES:
            md: Metadata[Any] = getattr(state, role)
            if now >= md.signed.expires - self.expiries.of(role) / 2:
                due.append(role)
        return due

    def timestamp_due(self, now: dt.datetime | None = None) -> bool:
        """True once half of the timestamp's validity has passed (time to re-sign)."""
        return "timestamp" in self._due_roles(self._load_state(), now or self._now())

    def next_refresh(self) -> dt.datetime:
        """When :meth:`refresh_if_due` will next have work to do."""
        state = self._load_state()
        times: list[dt.datetime] = [
            md.signed.expires - self.expiries.of(md.signed.type) / 2
            for md in (state.targets, state.snapshot, state.timestamp)
        ]
        return min(times)

    def refresh_timestamp(self) -> None:
        """Re-sign the timestamp now (new version, new expiry)."""
        with self._lock():
            state = self._load_state()
            self._commit(state, self._now())

    def refresh_if_due(self) -> list[str]:
        """Re-sign every online role past its half-life (and those above it); returns them."""
        with self._lock():
            state = self._load_state()
            now = self._now()
            due = self._due_roles(state, now)
            if due:
                self._commit(state, now, targets="targets" in due, snapshot="snapshot" in due)
            return due

    # -- root rotation -------------------------------------------------------------------------
    def rotate_root(
        self,
        *,
        root_keys: OfflineRootKeys,
        new_root_keys: OfflineRootKeys | None = None,
        rotate_online: Iterable[str] = (),
        scheme: str = "ed25519",
    ) -> int:
        """Publish root version N+1, signed by the threshold of the current root keys
        (``root_keys``) *and* of the new ones (``new_root_keys``, default: unchanged).

        ``rotate_online`` names online roles whose key is replaced by a new one (after a
        suspected compromise); the affected metadata is re-signed with the new keys at once.
        Returns the new root version. Raises ``threshold_not_met`` without changing anything.
        """
        rotate = list(dict.fromkeys(rotate_online))
        for role in rotate:
            if role not in ONLINE_ROLES:
                raise ConfigError(f"{role!r} is not an online role ({', '.join(ONLINE_ROLES)})")
        with self._lock():
            state = self._load_state()
            now = self._now()
            previous = state.root.signed
            new_md = copy.deepcopy(state.root)
            new_md.signatures.clear()
            root = new_md.signed
            root.version += 1
            root.expires = now + self.expiries.root
            signers: list[Signer] = list(root_keys.signers)
            if new_root_keys is not None:
                for keyid in list(root.roles[Root.type].keyids):
                    root.revoke_key(keyid, Root.type)
                for key in new_root_keys.keys:
                    root.add_key(key, Root.type)
                root.roles[Root.type].threshold = new_root_keys.threshold
                signers += new_root_keys.signers
            created: list[str] = []
            try:
                for role in rotate:
                    for keyid in list(root.roles[role].keyids):
                        root.revoke_key(keyid, role)
                    signer = self._online.new(scheme)
                    created.append(signer.public_key.keyid)
                    root.add_key(signer.public_key, role)
                _sign_root(new_md, previous, signers)
            except BaseException:
                for keyid in created:
                    (self._online.directory / f"{keyid}.pem").unlink(missing_ok=True)
                raise
            self._write_root(new_md)
            state.root = new_md
            if rotate:
                self._commit(state, now, targets="targets" in rotate,
                             snapshot="snapshot" in rotate)
                for role in rotate:  # a replaced key may be compromised: do not keep it
                    for keyid in previous.roles[role].keyids:
                        if keyid not in root.keys:
                            (self._online.directory / f"{keyid}.pem").unlink(missing_ok=True)
            return root.version

    # -- internals ------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _bytes(self, md: Metadata[Any]) -> bytes:
        return md.to_bytes(self._serializer)

    def _write(self, name: str, data: bytes) -> None:
        try:
            atomic_write(self.metadata_dir / name, data)
        except OSError as e:
            raise os_error(e, f"writing {name}") from e

    def _write_root(self, md: Metadata[Root]) -> None:
        data = self._bytes(md)
        self._write(f"{md.signed.version}.root.json", data)
        self._write("root.json", data)

    def _sign_online(self, state: _State, md: Metadata[Any]) -> None:
        role = md.signed.type
        root = state.root.signed
        md.signatures.clear()
        for keyid in root.roles[role].keyids:
            signer = self._online.signer(root.get_key(keyid))
            try:
                md.sign(signer, append=True)
            except UnsignedMetadataError as e:
                raise UpdateError(UpdateReason.BAD_SIGNATURE, f"cannot sign {role}") from e

    def _commit(
        self, state: _State, now: dt.datetime, *, targets: bool = False, snapshot: bool = False
    ) -> None:
        """Re-sign targets (optional) -> snapshot (optional, implied) -> timestamp, writing the
        versioned files first and ``timestamp.json`` last: that rename publishes the state."""
        if targets:
            t = state.targets.signed
            t.version += 1
            t.expires = now + self.expiries.targets
            self._sign_online(state, state.targets)
            data = self._bytes(state.targets)
            self._write(f"{t.version}.targets.json", data)
            state.snapshot.signed.meta["targets.json"] = MetaFile.from_data(
                t.version, data, ["sha256"]
            )
            snapshot = True
        if snapshot:
            s = state.snapshot.signed
            s.version += 1
            s.expires = now + self.expiries.snapshot
            self._sign_online(state, state.snapshot)
            data = self._bytes(state.snapshot)
            self._write(f"{s.version}.snapshot.json", data)
            state.timestamp.signed.snapshot_meta = MetaFile.from_data(s.version, data, ["sha256"])
        ts = state.timestamp.signed
        ts.version += 1
        ts.expires = now + self.expiries.timestamp
        self._sign_online(state, state.timestamp)
        self._write("timestamp.json", self._bytes(state.timestamp))
