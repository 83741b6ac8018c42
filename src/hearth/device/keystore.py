"""Where a unit keeps its private key, behind one small interface (guideline 4).

The agent needs three things from a key store and nothing else:

* the unit's certificate (:meth:`KeyStore.device_certificate_pem`);
* credentials Python's :mod:`ssl` can use for mutual TLS to the broker
  (:meth:`KeyStore.tls_credentials`);
* ECDSA-SHA256 signatures made with the unit's key (:meth:`KeyStore.sign`), for anything
  the unit must prove outside TLS (update requests, attestation, HTTPS tokens).

:class:`FileKeyStore` is the reference backend: the key lives in a PEM file that only the
unit's user may read (mode 0600). It refuses to load a key that group or others can read
or write, or a key that does not belong to the unit's certificate.

A PKCS#11 backend (a secure element, a TPM, SoftHSM2 in tests) fits the same interface:
its :meth:`~KeyStore.sign` asks the token to sign (over a SHA-256 digest computed on the
host, since tokens such as SoftHSM2 offer plain ``CKM_ECDSA``), and the key never leaves the
token. Python's :mod:`ssl` cannot use a key that lives in a token, so such a backend raises
:class:`~hearth.errors.DeviceError` from :meth:`~KeyStore.tls_credentials`; the link to the
broker must then be fronted differently (for example a local TLS proxy using the OpenSSL
pkcs11 provider). That is why :meth:`~KeyStore.tls_credentials` is separate from
:meth:`~KeyStore.sign`.

Example::

    store = FileKeyStore(Path("/var/lib/hearth/unit"))
    cert_file, key_file = store.tls_credentials()
    signature = store.sign(b"payload")
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hearth.errors import DeviceError

__all__ = ["CERT_FILE", "KEY_FILE", "FileKeyStore", "KeyStore", "check_secret_file_mode"]

KEY_FILE = "device.key"
CERT_FILE = "device.pem"
_MAX_PEM_BYTES = 64 * 1024
_GROUP_OTHER = stat.S_IRWXG | stat.S_IRWXO


@runtime_checkable
class KeyStore(Protocol):
    """What the device agent needs from a key store."""

    def device_certificate_pem(self) -> bytes:
        """The unit's X.509 certificate (PEM)."""
        ...

    def tls_credentials(self) -> tuple[Path, Path]:
        """``(certificate file, private key file)`` for :meth:`ssl.SSLContext.load_cert_chain`.

        Raises :class:`~hearth.errors.DeviceError` when the key cannot be handed to Python's
        ``ssl`` (a PKCS#11 token key): such a backend must front TLS another way.
        """
        ...

    def sign(self, data: bytes) -> bytes:
        """An ECDSA-SHA256 signature of ``data`` (DER) made with the unit's key."""
        ...


def check_secret_file_mode(path: Path, mode: int) -> None:
    """Raise :class:`DeviceError` unless ``mode`` keeps ``path`` private to its owner."""
    if not stat.S_ISREG(mode):
        raise DeviceError(f"{path.name} is not a regular file")
    if mode & _GROUP_OTHER:
        raise DeviceError(
            f"{path.name} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"a secret must be readable by its owner only: chmod 600 {path}"
        )


def _read_secret_file(path: Path) -> bytes:
    """Read a secret after checking the mode of the file actually opened (no TOCTOU)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise DeviceError(f"missing {path.name} in {path.parent}") from e
    except OSError as e:
        raise DeviceError(f"cannot open {path.name}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        check_secret_file_mode(path, os.fstat(f.fileno()).st_mode)
        data = f.read(_MAX_PEM_BYTES + 1)
    if len(data) > _MAX_PEM_BYTES:
        raise DeviceError(f"{path.name} is larger than {_MAX_PEM_BYTES} bytes")
    return data


class FileKeyStore:
    """The unit's key in a 0600 PEM file next to its certificate.

    Raises :class:`DeviceError` if the key or certificate is missing or unreadable, if the key
    file is accessible by group or others, if the key is not ECDSA P-256, or if the key does
    not match the certificate. ``repr`` never shows the key.
    """

    def __init__(
        self, directory: Path, *, key_file: str = KEY_FILE, cert_file: str = CERT_FILE
    ) -> None:
        self._key_path = directory / key_file
        self._cert_path = directory / cert_file
        key_pem = _read_secret_file(self._key_path)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise DeviceError(f"{key_file} is not an unencrypted PEM private key") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise DeviceError(f"{key_file} is not an ECDSA P-256 key")
        try:
            self._cert_pem = self._cert_path.read_bytes()
        except FileNotFoundError as e:
            raise DeviceError(f"missing {cert_file} in {directory}") from e
        except OSError as e:
            raise DeviceError(f"cannot read {cert_file}: {e.strerror}") from e
        try:
            cert = x509.load_pem_x509_certificate(self._cert_pem)
        except ValueError as e:
            raise DeviceError(f"{cert_file} is not a PEM X.509 certificate") from e
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise DeviceError(f"{key_file} does not match the certificate in {cert_file}")
        self._key = key
        self.certificate = cert

    def __repr__(self) -> str:
        return f"FileKeyStore({self._key_path.parent!s})"

    def device_certificate_pem(self) -> bytes:
        return self._cert_pem

    def tls_credentials(self) -> tuple[Path, Path]:
        return self._cert_path, self._key_path

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))
