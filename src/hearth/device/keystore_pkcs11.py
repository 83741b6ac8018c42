"""A key store whose private key lives in a PKCS#11 token (secure element, TPM, HSM).

The key never leaves the token: :meth:`Pkcs11KeyStore.sign` hashes the data with SHA-256
on the host and asks the token for a plain ``CKM_ECDSA`` signature over that digest (tokens
such as Debian's SoftHSM2 do not offer ``CKM_ECDSA_SHA256``), then encodes ``r || s`` as
the DER signature the rest of Hearth expects - the same bytes a
:class:`~hearth.device.keystore.FileKeyStore` signature verifies as.

Python's :mod:`ssl` cannot use a key that lives in a token, so
:meth:`Pkcs11KeyStore.tls_credentials` raises :class:`~hearth.errors.DeviceError`: a unit
with its key in a token fronts its TLS connections differently (for example a local
proxy using OpenSSL's pkcs11 provider).

The user PIN is read from a file that only the unit's user may read (``pin_file``, mode
0600); it is never logged and not part of ``repr``. At construction the store signs a
random challenge and checks it against the certificate, so a token holding another key is
refused at start, not at the first signature.

Example::

    store = Pkcs11KeyStore(module=Path("/usr/lib/softhsm/libsofthsm2.so"),
                           token_label="unit", key_label="device",
                           pin_file=unit_dir / "token.pin",
                           certificate=unit_dir / "device.pem")
    identity = UnitIdentity.load(unit_dir, keystore=store)
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hearth.device.keystore import check_secret_file_mode
from hearth.errors import DeviceError

__all__ = ["Pkcs11KeyStore"]

_log = logging.getLogger("hearth.device.keystore")

_MAX_PIN = 256


def _read_pin(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DeviceError(f"cannot open the token PIN file {path.name}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        check_secret_file_mode(path, os.fstat(f.fileno()).st_mode)
        raw = f.read(_MAX_PIN + 1)
    pin = raw.decode("utf-8", "replace").strip()
    if not pin or len(pin) > _MAX_PIN:
        raise DeviceError(f"{path.name} must hold the token's user PIN")
    return pin


class Pkcs11KeyStore:
    """The unit's key in a PKCS#11 token; implements the :class:`KeyStore` protocol.

    Raises :class:`DeviceError` if the module cannot be loaded, the token or key is not
    found, the PIN is wrong, or the key does not belong to ``certificate``.
    """

    def __init__(self, *, module: Path, token_label: str, key_label: str, pin_file: Path,
                 certificate: Path) -> None:
        try:
            import pkcs11
            from pkcs11 import KeyType, ObjectClass
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise DeviceError("python-pkcs11 is not installed") from e
        self._module_path = module
        self._token_label = token_label
        self._key_label = key_label
        try:
            self._cert_pem = certificate.read_bytes()
            self.certificate = x509.load_pem_x509_certificate(self._cert_pem)
        except (OSError, ValueError) as e:
            raise DeviceError(f"cannot load the certificate {certificate.name}") from e
        public = self.certificate.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
                public.curve, ec.SECP256R1):
            raise DeviceError("the certificate is not for an ECDSA P-256 key")
        self._public = public
        pin = _read_pin(pin_file)
        self._lock = threading.Lock()
        try:
            lib = pkcs11.lib(str(module))
            token = lib.get_token(token_label=token_label)
            self._session: Any = token.open(user_pin=pin)
            self._key: Any = self._session.get_key(
                object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label=key_label)
        except (pkcs11.PKCS11Error, RuntimeError, OSError) as e:
            raise DeviceError(f"the PKCS#11 token could not be opened or has no key "
                              f"{key_label!r} ({type(e).__name__})") from e
        challenge = secrets.token_bytes(32)
        try:
            self._public.verify(self.sign(challenge), challenge, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as e:
            self.close()
            raise DeviceError("the key in the token does not match the certificate") from e

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore({self._module_path.name}, token={self._token_label!r})"

    def close(self) -> None:
        with self._lock:
            try:
                self._session.close()
            except Exception:  # noqa: BLE001 - closing a dead session is not an error
                _log.debug("the PKCS#11 session was already closed")

    def device_certificate_pem(self) -> bytes:
        return self._cert_pem

    def tls_credentials(self) -> tuple[Path, Path]:
        raise DeviceError(
            "the unit's key is in a PKCS#11 token, which Python's ssl cannot use for TLS; "
            "front the TLS connection with a proxy that uses the token (OpenSSL pkcs11 "
            "provider) or use a file key store")

    def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 (DER) by the token: SHA-256 here, CKM_ECDSA over the digest there."""
        from pkcs11 import Mechanism, PKCS11Error

        digest = hashlib.sha256(data).digest()
        try:
            with self._lock:
                raw = bytes(self._key.sign(digest, mechanism=Mechanism.ECDSA))
        except PKCS11Error as e:
            raise DeviceError(f"the token refused to sign ({type(e).__name__})") from e
        if len(raw) != 64:
            raise DeviceError("the token returned a malformed ECDSA signature")
        return encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                    int.from_bytes(raw[32:], "big"))
