"""The application bundle: what a unit installs into a slot, and how it proves where it came from.

A bundle is an uncompressed POSIX tar holding ``manifest.json`` as its **first** member and the
device application's files after it::

    manifest.json   {"format": 1, "model": "thermostat", "version": "1.2.0",
                     "min_from_version": "1.0.0",
                     "files": {"app.py": {"sha256": "...", "length": 1234}, ...}}
    app.py
    lib/control.py
    ...

Parsing is strict (guideline 13: an update file is untrusted input until verified):

* only regular files - no directories, symlinks, hard links, devices, FIFOs or sparse files;
* paths are relative POSIX paths of plain components (``[A-Za-z0-9_][A-Za-z0-9._-]*``):
  no absolute paths, no ``..``, no ``.``, no hidden files, no duplicates;
* bounded file count, per-file size, total size and manifest size (:class:`BundleLimits`);
* the manifest lists *exactly* the files present, with their SHA-256 and length.

The bundle is delivered by TUF: its target entry in the signed ``targets`` metadata carries
the bundle's hashes and length, plus custom metadata (:class:`ReleaseInfo`): model, version,
minimum version to update from and the SHA-256 of the manifest. A unit keeps that signed
``targets`` metadata next to the installed files (:class:`Delivery`), so at every start it
can re-check the chain *root key -> targets signature -> manifest hash -> every file* without
the network and without keeping the tar (see ``docs/adr/0002-update-trust.md``).

This module is the update contract shared by the maker's tools, the service and the unit; it
does no network I/O and imports nothing from TUF.

Example::

    manifest = build_bundle(Path("app"), model="thermostat", version="1.1.0",
                            min_from_version="1.0.0", out=Path("thermostat-1.1.0.tar"))
    manifest = verify_bundle(Path("thermostat-1.1.0.tar"))
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from hearth._fsutil import fsync_dir
from hearth.updates._fs import os_error
from hearth.updates.errors import UpdateError, UpdateReason

__all__ = [
    "BUNDLE_FORMAT",
    "DEFAULT_LIMITS",
    "MANIFEST_NAME",
    "BundleLimits",
    "Delivery",
    "FileEntry",
    "Manifest",
    "ReleaseInfo",
    "build_bundle",
    "check_model_name",
    "check_path",
    "extract_bundle",
    "parse_target_name",
    "parse_version",
    "read_manifest",
    "target_name_for",
    "verify_bundle",
]

BUNDLE_FORMAT = 1
DELIVERY_FORMAT = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 64 * 1024
_VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\Z")
_MODEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
_TARGET_RE = re.compile(
    r"^([a-z][a-z0-9_]{0,31})/\1-((?:0|[1-9][0-9]{0,5})(?:\.(?:0|[1-9][0-9]{0,5})){2})\.tar\Z"
)


@dataclass(frozen=True)
class BundleLimits:
    """Explicit bounds on a bundle (defaults fit a Linux-class unit's application)."""

    max_files: int = 2_000
    max_file_bytes: int = 32 * 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024
    max_manifest_bytes: int = 512 * 1024
    max_path_length: int = 240
    max_depth: int = 16

    @property
    def max_bundle_bytes(self) -> int:
        """Largest tar accepted: contents plus tar headers and padding (generous)."""
        return self.max_total_bytes + self.max_manifest_bytes + (self.max_files + 2) * 1536 + 10240


DEFAULT_LIMITS = BundleLimits()


# --- small validators --------------------------------------------------------------------------
def parse_version(version: object) -> tuple[int, int, int]:
    """``"1.2.3"`` -> ``(1, 2, 3)``. Strict: three decimal numbers, no leading zeros."""
    if not isinstance(version, str):
        raise UpdateError(UpdateReason.BAD_BUNDLE, "a version must be a string like 1.2.3")
    m = _VERSION_RE.match(version)
    if not m:
        raise UpdateError(UpdateReason.BAD_BUNDLE, f"{version[:40]!r} is not a version like 1.2.3")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def check_model_name(model: object) -> str:
    if not isinstance(model, str) or not _MODEL_RE.match(model):
        raise UpdateError(UpdateReason.BAD_BUNDLE, "a model name is 1-32 of [a-z0-9_]")
    return model


def check_path(path: object, limits: BundleLimits = DEFAULT_LIMITS) -> str:
    """Refuse any path that is not a plain relative POSIX path inside the bundle."""
    if not isinstance(path, str) or not path or len(path) > limits.max_path_length:
        raise UpdateError(UpdateReason.BAD_BUNDLE, "file path empty or too long")
    parts = path.split("/")
    if len(parts) > limits.max_depth:
        raise UpdateError(UpdateReason.BAD_BUNDLE, f"file path too deep: {path[:80]!r}")
    for part in parts:
        # also refuses "", ".", ".." and hidden names: the first character cannot be a dot
        if not _COMPONENT_RE.match(part):
            raise UpdateError(UpdateReason.BAD_BUNDLE, f"refused file path {path[:80]!r}")
    if path == MANIFEST_NAME:
        raise UpdateError(UpdateReason.BAD_BUNDLE, f"{MANIFEST_NAME} cannot be an app file")
    return path


def target_name_for(model: str, version: str) -> str:
    """The TUF target path of a release: ``thermostat/thermostat-1.2.0.tar``."""
    check_model_name(model)
    parse_version(version)
    return f"{model}/{model}-{version}.tar"


# --- manifest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    sha256: str
    length: int


@dataclass(frozen=True)
class Manifest:
    """What a bundle holds: its release identity and every file's hash and length."""

    model: str
    version: str
    min_from_version: str
    files: Mapping[str, FileEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if parse_version(self.min_from_version) > parse_version(self.version):
            raise UpdateError(UpdateReason.BAD_BUNDLE, "min_from_version is above version")
        for path, entry in self.files.items():
            check_path(path)
            if not _SHA256_RE.match(entry.sha256) or entry.length < 0:
                raise UpdateError(UpdateReason.BAD_BUNDLE, f"bad hash or length for {path!r}")

    @classmethod
    def parse(cls, raw: bytes, *, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
        """Parse and check ``manifest.json`` bytes (unknown fields are refused)."""
        if len(raw) > limits.max_manifest_bytes:
            raise UpdateError(UpdateReason.BAD_BUNDLE, "manifest too large")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise UpdateError(UpdateReason.BAD_BUNDLE, "manifest is not JSON") from None
        if not isinstance(obj, dict) or set(obj) != {
            "format", "model", "version", "min_from_version", "files"
        }:
            raise UpdateError(UpdateReason.BAD_BUNDLE, "manifest fields are wrong")
        if obj["format"] != BUNDLE_FORMAT or isinstance(obj["format"], bool):
            raise UpdateError(UpdateReason.BAD_BUNDLE, "unsupported manifest format")
        files = obj["files"]
        if not isinstance(files, dict):
            raise UpdateError(UpdateReason.BAD_BUNDLE, "manifest files must be an object")
        if len(files) > limits.max_files:
            raise UpdateError(UpdateReason.BAD_BUNDLE, f"more than {limits.max_files} files")
        entries: dict[str, FileEntry] = {}
        total = 0
        for path, entry in files.items():
            check_path(path, limits)
            if (
                not isinstance(entry, dict)
                or set(entry) != {"sha256", "length"}
                or not isinstance(entry["sha256"], str)
                or not _SHA256_RE.match(entry["sha256"])
                or not isinstance(entry["length"], int)
                or isinstance(entry["length"], bool)
                or not 0 <= entry["length"] <= limits.max_file_bytes
            ):
                raise UpdateError(UpdateReason.BAD_BUNDLE, f"bad manifest entry for {path!r}")
            total += entry["length"]
            entries[path] = FileEntry(entry["sha256"], entry["length"])
        if total > limits.max_total_bytes:
            raise UpdateError(UpdateReason.BAD_BUNDLE, "bundle contents too large")
        return cls(
            model=check_model_name(obj["model"]),
            version=_version_str(obj["version"]),
            min_from_version=_version_str(obj["min_from_version"]),
            files=entries,
        )

    def to_bytes(self) -> bytes:
        """Canonical form (sorted keys, no whitespace): its SHA-256 identifies the manifest."""
        obj = {
            "format": BUNDLE_FORMAT,
            "model": self.model,
            "version": self.version,
            "min_from_version": self.min_from_version,
            "files": {p: {"sha256": e.sha256, "length": e.length}
                      for p, e in sorted(self.files.items())},
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _version_str(v: object) -> str:
    parse_version(v)
    assert isinstance(v, str)
    return v


# --- release info (TUF custom metadata) ----------------------------------------------------------
@dataclass(frozen=True)
class ReleaseInfo:
    """The custom metadata of a bundle's TUF target entry, signed with the targets role."""

    model: str
    version: str
    min_from_version: str
    manifest_sha256: str

    def __post_init__(self) -> None:
        check_model_name(self.model)
        if parse_version(self.min_from_version) > parse_version(self.version):
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "min_from_version is above version")
        if not isinstance(self.manifest_sha256, str) or not _SHA256_RE.match(self.manifest_sha256):
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "manifest_sha256 is not a SHA-256")

    def to_custom(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "min_from_version": self.min_from_version,
            "manifest_sha256": self.manifest_sha256,
        }

    @classmethod
    def from_custom(cls, custom: object) -> ReleaseInfo:
        """Strict parse of a target's ``custom`` field; raises ``bad_target_info``."""
        keys = {"model", "version", "min_from_version", "manifest_sha256"}
        if not isinstance(custom, dict) or set(custom) != keys:
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "target custom metadata is malformed")
        try:
            return cls(
                model=check_model_name(custom["model"]),
                version=_version_str(custom["version"]),
                min_from_version=_version_str(custom["min_from_version"]),
                manifest_sha256=custom["manifest_sha256"],
            )
        except UpdateError as e:
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, e.detail) from None

    @classmethod
    def for_manifest(cls, manifest: Manifest, manifest_bytes: bytes) -> ReleaseInfo:
        return cls(
            model=manifest.model,
            version=manifest.version,
            min_from_version=manifest.min_from_version,
            manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        )


def parse_target_name(name: str) -> tuple[str, str]:
    """``thermostat/thermostat-1.2.0.tar`` -> ``("thermostat", "1.2.0")``."""
    m = _TARGET_RE.match(name)
    if not m:
        raise UpdateError(UpdateReason.BAD_TARGET_INFO, f"{name[:80]!r} is not a release name")
    return m.group(1), m.group(2)


# --- delivery record -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Delivery:
    """The signed evidence a unit keeps with an installed bundle.

    ``targets_metadata`` is the complete signed TUF ``targets`` metadata (as bytes) that listed
    ``target_name``; ``root_version`` is the version of the root that trusted its signing key.
    """

    target_name: str
    root_version: int
    targets_metadata: bytes = field(repr=False)

    def to_bytes(self) -> bytes:
        try:
            targets = json.loads(self.targets_metadata)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "targets metadata is not JSON") from e
        obj = {
            "format": DELIVERY_FORMAT,
            "target_name": self.target_name,
            "root_version": self.root_version,
            "targets": targets,
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, raw: bytes, *, max_bytes: int = 8 * 1024 * 1024) -> Delivery:
        if len(raw) > max_bytes:
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "delivery record too large")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "delivery record is not JSON") from None
        if (
            not isinstance(obj, dict)
            or set(obj) != {"format", "target_name", "root_version", "targets"}
            or obj["format"] != DELIVERY_FORMAT
            or not isinstance(obj["target_name"], str)
            or not isinstance(obj["root_version"], int)
            or isinstance(obj["root_version"], bool)
            or obj["root_version"] < 1
            or not isinstance(obj["targets"], dict)
        ):
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "delivery record is malformed")
        parse_target_name(obj["target_name"])
        return cls(
            target_name=obj["target_name"],
            root_version=obj["root_version"],
            targets_metadata=json.dumps(obj["targets"]).encode(),
        )


# --- building ------------------------------------------------------------------------------------
def build_bundle(
    src_dir: Path,
    *,
    model: str,
    version: str,
    min_from_version: str,
    out: Path,
    exclude: tuple[str, ...] = ("__pycache__",),
    limits: BundleLimits = DEFAULT_LIMITS,
) -> Manifest:
    """Pack every regular file under ``src_dir`` into a bundle at ``out``.

    The tar is deterministic (sorted, mtime 0, uid/gid 0, mode 0644). Directories named in
    ``exclude`` and ``*.pyc`` files are skipped; symlinks and special files are refused.
    Raises :class:`UpdateError` (``bad_bundle``) for anything the parser would refuse.
    """
    src_dir = Path(src_dir)
    files: dict[str, FileEntry] = {}
    paths: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(src_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude)
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise UpdateError(UpdateReason.BAD_BUNDLE, f"symlink {d!r} refused")
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if name.endswith(".pyc"):
                continue
            if full.is_symlink() or not full.is_file():
                raise UpdateError(UpdateReason.BAD_BUNDLE, f"{name!r} is not a regular file")
            rel = full.relative_to(src_dir).as_posix()
            check_path(rel, limits)
            data = full.read_bytes()
            files[rel] = FileEntry(hashlib.sha256(data).hexdigest(), len(data))
            paths.append((rel, full))
    manifest = Manifest(model=model, version=version, min_from_version=min_from_version,
                        files=files)
    manifest_bytes = manifest.to_bytes()
    Manifest.parse(manifest_bytes, limits=limits)  # same limits as a unit will apply
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add_member(tar, MANIFEST_NAME, io.BytesIO(manifest_bytes), len(manifest_bytes))
        for rel, full in sorted(paths):
            with full.open("rb") as f:
                _add_member(tar, rel, f, files[rel].length)
    os.replace(tmp, out)
    return manifest


def _add_member(tar: tarfile.TarFile, name: str, data: IO[bytes], size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, data)


# --- reading -------------------------------------------------------------------------------------
def _open_tar(bundle: Path, limits: BundleLimits) -> tarfile.TarFile:
    try:
        size = bundle.stat().st_size
    except OSError as e:
        raise UpdateError(UpdateReason.IO_ERROR, f"cannot read bundle: {e.strerror}") from e
    if size > limits.max_bundle_bytes:
        raise UpdateError(UpdateReason.TOO_LARGE, "bundle file too large")
    try:
        return tarfile.open(bundle, mode="r:")  # uncompressed tar only
    except (tarfile.TarError, OSError) as e:
        raise UpdateError(UpdateReason.BAD_BUNDLE, "not an uncompressed tar") from e


def _check_member(member: tarfile.TarInfo) -> None:
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.issparse():
        raise UpdateError(
            UpdateReason.BAD_BUNDLE, f"{member.name[:80]!r} is not a regular file"
        )


def _read_manifest_member(tar: tarfile.TarFile, limits: BundleLimits) -> tuple[Manifest, bytes]:
    try:
        first = tar.next()
    except tarfile.TarError as e:
        raise UpdateError(UpdateReason.BAD_BUNDLE, "corrupt tar") from e
    if first is None or first.name != MANIFEST_NAME:
        raise UpdateError(UpdateReason.BAD_BUNDLE, f"{MANIFEST_NAME} must be the first member")
    _check_member(first)
    if first.size > limits.max_manifest_bytes:
        raise UpdateError(UpdateReason.BAD_BUNDLE, "manifest too large")
    f = tar.extractfile(first)
    assert f is not None  # regular file
    raw = f.read(first.size)
    return Manifest.parse(raw, limits=limits), raw


def read_manifest(bundle: Path, *, limits: BundleLimits = DEFAULT_LIMITS) -> tuple[Manifest, bytes]:
    """The bundle's manifest and its exact bytes, without checking the files."""
    with _open_tar(bundle, limits) as tar:
        return _read_manifest_member(tar, limits)


def _iter_files(
    tar: tarfile.TarFile, manifest: Manifest, limits: BundleLimits
) -> Iterator[tuple[str, FileEntry, IO[bytes]]]:
    """Yield ``(path, entry, reader)`` for each file member, enforcing every structural rule."""
    seen: set[str] = set()
    count = 0
    while True:
        try:
            member = tar.next()
        except tarfile.TarError as e:
            raise UpdateError(UpdateReason.BAD_BUNDLE, "corrupt tar") from e
        if member is None:
            break
        count += 1
        if count > limits.max_files:
            raise UpdateError(UpdateReason.BAD_BUNDLE, f"more than {limits.max_files} files")
        _check_member(member)
        path = check_path(member.name, limits)
        if path in seen:
            raise UpdateError(UpdateReason.BAD_BUNDLE, f"duplicate file {path!r}")
        seen.add(path)
        entry = manifest.files.get(path)
        if entry is None:
            raise UpdateError(UpdateReason.BAD_BUNDLE, f"{path!r} is not in the manifest")
        if member.size != entry.length:
            raise UpdateError(UpdateReason.HASH_MISMATCH, f"{path!r} length differs from manifest")
        reader = tar.extractfile(member)
        assert reader is not None
        yield path, entry, reader
    missing = set(manifest.files) - seen
    if missing:
        raise UpdateError(UpdateReason.BAD_BUNDLE, f"missing file {sorted(missing)[0]!r}")


def verify_bundle(bundle: Path, *, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
    """Check the whole bundle: structure, and every file against the manifest."""
    with _open_tar(bundle, limits) as tar:
        manifest, _raw = _read_manifest_member(tar, limits)
        for path, entry, reader in _iter_files(tar, manifest, limits):
            h = hashlib.sha256()
            while chunk := reader.read(_CHUNK):
                h.update(chunk)
            if h.hexdigest() != entry.sha256:
                raise UpdateError(UpdateReason.HASH_MISMATCH, f"{path!r} does not match manifest")
    return manifest


def extract_bundle(
    bundle: Path,
    dest: Path,
    *,
    expected_manifest_sha256: str | None = None,
    limits: BundleLimits = DEFAULT_LIMITS,
    on_file: Callable[[str], None] | None = None,
) -> tuple[Manifest, bytes]:
    """Extract ``bundle`` into the empty or missing directory ``dest``, verifying as it goes.

    Each file is created exclusively (``O_EXCL|O_NOFOLLOW``) with mode 0644, hashed while it is
    written and fsynced. If ``expected_manifest_sha256`` is given (from signed metadata) the
    manifest must match it before any file is written. ``on_file(path)`` is called after each
    file is durable. Returns the manifest and its bytes. On any error the caller owns the
    clean-up of ``dest``. Raises :class:`UpdateError` (``bad_bundle``, ``hash_mismatch``,
    ``no_space``, ``io_error``).
    """
    with _open_tar(bundle, limits) as tar:
        manifest, raw = _read_manifest_member(tar, limits)
        if (
            expected_manifest_sha256 is not None
            and hashlib.sha256(raw).hexdigest() != expected_manifest_sha256
        ):
            raise UpdateError(UpdateReason.HASH_MISMATCH, "manifest differs from signed metadata")
        try:
            dest.mkdir(parents=True, exist_ok=True)
            if any(dest.iterdir()):
                raise UpdateError(UpdateReason.IO_ERROR, f"{dest} is not empty")
            for path, entry, reader in _iter_files(tar, manifest, limits):
                target = dest / PurePosixPath(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = _write_exclusive(target, reader)
                if digest != entry.sha256:
                    raise UpdateError(UpdateReason.HASH_MISMATCH, f"{path!r} does not match")
                if on_file is not None:
                    on_file(path)
            _fsync_tree(dest)
        except OSError as e:
            raise os_error(e, "extracting the bundle") from e
    return manifest, raw


def _write_exclusive(target: Path, reader: IO[bytes]) -> str:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        while chunk := reader.read(_CHUNK):
            h.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    """fsync every directory under ``root`` (files were fsynced as they were written)."""
    for dirpath, _dirs, _files in os.walk(root):
        fsync_dir(Path(dirpath))
