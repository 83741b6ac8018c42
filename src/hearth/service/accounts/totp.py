"""TOTP second factor (RFC 6238) and encryption of the TOTP secrets at rest.

A TOTP secret must be readable by the service (it computes the expected code), so it cannot
be hashed; it is encrypted with AES-256-GCM (:class:`SecretBox`) under a key derived (HKDF)
from the service secret, which lives in a 0600 file outside the database
(``DATA/secrets/web-signing.key`` or ``HEARTH_SECRET_KEY``). The account id is the
associated data, so a ciphertext copied to another account's row does not decrypt.

Codes: 6 digits, 30-second steps, one step of clock drift either way. A code is accepted
at most once: the account remembers the last step used and refuses that step or an older
one (a code seen over a shoulder or in a log cannot be replayed).
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import secrets

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hearth.errors import HearthError

__all__ = ["STEP_SECONDS", "SecretBox", "derive_key", "new_totp_secret", "provisioning_uri",
           "totp_code", "verify_totp"]

STEP_SECONDS = 30
DIGITS = 6
DRIFT_STEPS = 1
_BOX_VERSION = "v1"


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one ``purpose`` from the service secret (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"hearth-accounts",
                info=purpose.encode()).derive(secret)


class SecretBox:
    """AES-256-GCM with a random 96-bit nonce; text in, text out."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("SecretBox needs a 32-byte key")
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, *, aad: str) -> str:
        nonce = secrets.token_bytes(12)
        ct = self._aead.encrypt(nonce, plaintext.encode(), aad.encode())
        return f"{_BOX_VERSION}.{base64.urlsafe_b64encode(nonce + ct).decode()}"

    def open(self, sealed: str, *, aad: str) -> str:
        """Raises :class:`HearthError` if the text was not sealed by this key for ``aad``."""
        version, _, body = sealed.partition(".")
        try:
            if version != _BOX_VERSION:
                raise ValueError("unknown version")
            raw = base64.urlsafe_b64decode(body.encode())
            return self._aead.decrypt(raw[:12], raw[12:], aad.encode()).decode()
        except (ValueError, InvalidTag) as e:
            raise HearthError("a sealed secret could not be opened (wrong key or row)") from e


def new_totp_secret() -> str:
    """160 random bits in base32 (RFC 4226's recommended length)."""
    return pyotp.random_base32(32)


def provisioning_uri(secret: str, *, account: str, issuer: str) -> str:
    """The ``otpauth://`` URI authenticator apps import (also shown as a QR code)."""
    uri: str = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=account, issuer_name=issuer)
    return uri


def _step(now: dt.datetime) -> int:
    return int(now.timestamp()) // STEP_SECONDS


def totp_code(secret: str, now: dt.datetime) -> str:
    """The code for ``now`` (tests and enrolment checks)."""
    return str(pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).generate_otp(_step(now)))


def verify_totp(secret: str, code: str, *, now: dt.datetime, last_step: int | None) -> int | None:
    """The time step ``code`` matches (within the drift window and newer than
    ``last_step``), or ``None``. Compares in constant time."""
    if not isinstance(code, str):
        return None
    code = code.strip().replace(" ", "")
    if len(code) != DIGITS or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    current = _step(now)
    matched: int | None = None
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(str(totp.generate_otp(step)), code) and (
                last_step is None or step > last_step):
            matched = step
    return matched
