"""HMAC-SHA256 signing of short tokens, with a purpose string for domain separation.

A token signed for one purpose (``"csrf"``, ``"form-ts"``, ``"triage-session"``) never
verifies for another, so a value an attacker can obtain in one place (e.g. a form
timestamp) cannot be replayed as another (e.g. a session cookie).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["Signer", "b64url"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Signer:
    """Signs short ASCII payloads; the MAC follows the last ``.`` of the token."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("signing key must be at least 32 bytes")
        self._key = key

    def mac(self, purpose: str, payload: str) -> str:
        msg = purpose.encode() + b"\x00" + payload.encode()
        return b64url(hmac.new(self._key, msg, hashlib.sha256).digest())

    def sign(self, purpose: str, payload: str) -> str:
        """``payload.MAC``; the payload is readable by anyone, only its integrity is protected."""
        return f"{payload}.{self.mac(purpose, payload)}"

    def unsign(self, purpose: str, token: str, *, max_len: int = 1024) -> str | None:
        """The payload if ``token`` was signed by us for ``purpose``, else ``None``."""
        if not isinstance(token, str) or len(token) > max_len or "." not in token:
            return None
        payload, _, mac = token.rpartition(".")
        if hmac.compare_digest(mac.encode(), self.mac(purpose, payload).encode()):
            return payload
        return None

    def verify_mac(self, purpose: str, payload: str, mac: str) -> bool:
        if not isinstance(mac, str) or len(mac) > 100:
            return False
        return hmac.compare_digest(mac.encode(), self.mac(purpose, payload).encode())
