"""Update signing keys: offline root keys and the service's online keys.

Two kinds of keys sign the update repository (see ``docs/adr/0002-update-trust.md``):

* **Root keys are offline.** ``hearth release root init --keys DIR --threshold K --count N``
  (:func:`init_root`) creates N key pairs in a directory that is *not* part of the service's
  data - a removable drive, one per custodian if the keys are split. Root metadata needs K of
  them; they are used only by the ``hearth release root ...`` commands (create the
  repository, rotate keys) and never loaded by the running service.
* **Online keys** (targets, snapshot, timestamp) live in the service's data directory, one
  PEM file per key, mode 0600 (:class:`OnlineKeys`). The service needs them to publish
  releases and to re-sign the timestamp before it expires. Their compromise is bounded: the
  offline root can rotate them away.

Layout of an offline keys directory (0700)::

    root-keys.json            {"format": 1, "threshold": K, "keys": [{"keyid", "key", "file"}]}
    root-<keyid[:16]>.pem     one private key per file (PKCS#8, 0600, optionally encrypted)

Splitting custody: copy the directory and delete the ``.pem`` files a custodian must not hold;
:meth:`OfflineRootKeys.load` signs with whatever private keys are present.

Example::

    init_root(Path("/media/usb/hearth-root"), threshold=2, count=3)
    root = OfflineRootKeys.load(Path("/media/usb/hearth-root"))
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from securesystemslib.signer import CryptoSigner, Key, SSlibKey

from hearth._fsutil import write_json, write_secret
from hearth.errors import ConfigError
from hearth.updates.errors import UpdateError, UpdateReason

__all__ = [
    "KEY_SCHEMES",
    "ROOT_KEYS_FILE",
    "OfflineRootKeys",
    "OnlineKeys",
    "generate_signer",
    "init_root",
]

ROOT_KEYS_FILE = "root-keys.json"
KEYS_FORMAT = 1
MAX_ROOT_KEYS = 16
KEY_SCHEMES = ("ed25519", "ecdsa-sha2-nistp256")


def generate_signer(scheme: str = "ed25519") -> CryptoSigner:
    """A fresh key pair. Ed25519 by default (small, fast, deterministic signatures)."""
    if scheme == "ed25519":
        return CryptoSigner.generate_ed25519()
    if scheme == "ecdsa-sha2-nistp256":
        return CryptoSigner.generate_ecdsa(scheme=scheme)
    raise ConfigError(f"unsupported key scheme {scheme!r}; use one of {KEY_SCHEMES}")


def _private_pem(signer: CryptoSigner, passphrase: bytes | None) -> bytes:
    key = load_pem_private_key(signer.private_bytes, None)
    encryption = BestAvailableEncryption(passphrase) if passphrase else NoEncryption()
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)


def _check_private_file(path: Path) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        raise ConfigError(f"{path} must be a regular file readable only by its owner (0600)")


def _load_signer(path: Path, public: Key, passphrase: bytes | None) -> CryptoSigner:
    _check_private_file(path)
    try:
        private = load_pem_private_key(path.read_bytes(), passphrase)
        return CryptoSigner(private, public)  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"cannot load the key in {path.name}: wrong passphrase or key") from e


@dataclass(frozen=True)
class OfflineRootKeys:
    """The public root keys with their threshold, and the private ones present here."""

    threshold: int
    keys: tuple[Key, ...]
    signers: tuple[CryptoSigner, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= len(self.keys) <= MAX_ROOT_KEYS:
            raise ConfigError(f"need 1 <= threshold <= count <= {MAX_ROOT_KEYS}")
        if len({k.keyid for k in self.keys}) != len(self.keys):
            raise ConfigError("duplicate root key")

    @classmethod
    def load(
        cls,
        keys_dir: Path,
        *,
        passphrase: bytes | None = None,
        only: Iterable[str] | None = None,
    ) -> OfflineRootKeys:
        """Load ``root-keys.json`` and every private key file present in ``keys_dir``.

        ``only`` restricts signing to the named key ids (or unique key id prefixes).
        Raises :class:`ConfigError` for a missing/invalid directory or a key file that is
        readable by others.
        """
        index = keys_dir / ROOT_KEYS_FILE
        try:
            obj = json.loads(index.read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{index} is missing or not JSON") from e
        if not isinstance(obj, dict) or obj.get("format") != KEYS_FORMAT:
            raise ConfigError(f"{index} is not a Hearth root keys file")
        try:
            entries: list[dict[str, Any]] = list(obj["keys"])
            keys = tuple(Key.from_dict(e["keyid"], dict(e["key"])) for e in entries)
            threshold = int(obj["threshold"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{index} is malformed") from e
        wanted = None if only is None else list(only)
        signers: list[CryptoSigner] = []
        for entry, key in zip(entries, keys, strict=True):
            if wanted is not None and not any(key.keyid.startswith(w) for w in wanted):
                continue
            path = keys_dir / str(entry["file"])
            if path.name != entry["file"] or not path.exists():
                continue  # this custodian does not hold that key
            signers.append(_load_signer(path, key, passphrase))
        return cls(threshold=threshold, keys=keys, signers=tuple(signers))

    def public(self) -> OfflineRootKeys:
        """The same key set without any private key (what a new root needs to list)."""
        return OfflineRootKeys(threshold=self.threshold, keys=self.keys)


def init_root(
    keys_dir: Path,
    *,
    threshold: int,
    count: int,
    passphrase: bytes | None = None,
    scheme: str = "ed25519",
) -> OfflineRootKeys:
    """Create ``count`` offline root keys in ``keys_dir`` (0700), ``threshold`` of them needed.

    Refuses to overwrite an existing key set. Private key files are 0600 and, with a
    ``passphrase``, encrypted. Returns the key set with its signers loaded.
    """
    if not 1 <= threshold <= count <= MAX_ROOT_KEYS:
        raise ConfigError(f"need 1 <= threshold <= count <= {MAX_ROOT_KEYS}")
    index = keys_dir / ROOT_KEYS_FILE
    if index.exists():
        raise ConfigError(f"{index} exists: refusing to replace root keys")
    keys_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    signers = [generate_signer(scheme) for _ in range(count)]
    entries = []
    for signer in signers:
        key = signer.public_key
        name = f"root-{key.keyid[:16]}.pem"
        write_secret(keys_dir / name, _private_pem(signer, passphrase))
        entries.append({"keyid": key.keyid, "key": key.to_dict(), "file": name})
    write_json(index, {"format": KEYS_FORMAT, "threshold": threshold, "keys": entries})
    return OfflineRootKeys(
        threshold=threshold, keys=tuple(s.public_key for s in signers), signers=tuple(signers)
    )


class OnlineKeys:
    """The service's online signing keys: ``<dir>/<keyid>.pem`` (0600), directory 0700."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __repr__(self) -> str:
        return f"OnlineKeys({str(self.directory)!r})"

    def new(self, scheme: str = "ed25519") -> CryptoSigner:
        """Generate and store a new online key; returns its signer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        signer = generate_signer(scheme)
        write_secret(self._path(signer.public_key.keyid), signer.private_bytes)
        return signer

    def signer(self, key: Key) -> CryptoSigner:
        """The signer for ``key`` (a key listed in root); raises ``UpdateError`` if absent."""
        path = self._path(key.keyid)
        if not path.exists():
            raise UpdateError(
                UpdateReason.NOT_FOUND, f"online key {key.keyid[:16]} is not in {self.directory}"
            )
        if not isinstance(key, SSlibKey):
            raise ConfigError("online keys must be securesystemslib keys")
        return _load_signer(path, key, None)

    def _path(self, keyid: str) -> Path:
        if not all(c in "0123456789abcdef" for c in keyid) or not keyid:
            raise ConfigError("a key id is lowercase hex")
        return self.directory / f"{keyid}.pem"
