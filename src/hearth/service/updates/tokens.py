"""Short-lived update tokens: how a unit authenticates its downloads.

uvicorn does not hand the TLS client certificate to the application, so the HTTPS update
routes cannot use the unit's mutual-TLS identity directly. Instead a unit asks for a token
over its MQTT link, which *is* mutually authenticated and bound to its device id by the
broker (``update/check`` -> ``update/offer``), and presents it as a bearer token.

A token is ``hut_<payload>.<mac>``: the payload is ``v1~<device id>~<model>~<scope>~<expiry
(unix s)>~<nonce>`` and the MAC HMAC-SHA256 under a 256-bit key kept in the service's data
directory (``secrets/update-token.key``, 0600), with the purpose ``update-token`` for
domain separation (:class:`hearth.service.web.Signer`). Nothing is stored: a token is valid
until its expiry (at most :data:`MAX_TTL`, 15 minutes), and the routes also check that its
unit is still active, so revoking a unit cuts its downloads at once. The token grants only
``updates:read``: the repository metadata and its own model's bundles.

Integrity never depends on the token: TUF verifies every byte the unit downloads. The token
keeps the repository (and a maker's unreleased software) from anonymous readers and bounds
who can make the service send large files.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from hearth._fsutil import write_secret
from hearth.errors import ConfigError
from hearth.service.web.signing import Signer

__all__ = ["DEFAULT_TTL", "MAX_TTL", "SCOPE", "TOKEN_PREFIX", "UpdateClaims", "UpdateTokens"]

TOKEN_PREFIX = "hut_"  # noqa: S105 - a prefix, not a secret
SCOPE = "updates:read"
DEFAULT_TTL = dt.timedelta(minutes=10)
MAX_TTL = dt.timedelta(minutes=15)
_PURPOSE = "update-token"
_PAYLOAD_RE = re.compile(
    r"^v1~([0-9a-f]{32})~([a-z][a-z0-9_]{0,31})~(updates:read)~([0-9]{10,12})~([0-9a-f]{16})\Z")
MAX_TOKEN_CHARS = 256


@dataclass(frozen=True)
class UpdateClaims:
    device_id: str
    model: str
    scope: str
    expires_at: dt.datetime


class UpdateTokens:
    """Issues and verifies update tokens with one key."""

    def __init__(self, key: bytes, *, ttl: dt.timedelta = DEFAULT_TTL) -> None:
        if not dt.timedelta(seconds=30) <= ttl <= MAX_TTL:
            raise ConfigError(f"update tokens live 30 s .. {MAX_TTL}")
        self._signer = Signer(key)
        self.ttl = ttl

    @classmethod
    def from_data_dir(cls, data_dir: Path, *, ttl: dt.timedelta = DEFAULT_TTL) -> UpdateTokens:
        """Load (or create on first use) the key in ``DATA/secrets/update-token.key``."""
        path = data_dir / "secrets" / "update-token.key"
        if not path.exists():
            write_secret(path, secrets.token_hex(32).encode())
        key = path.read_text(encoding="ascii").strip().encode()
        return cls(key, ttl=ttl)

    def issue(self, device_id: str, model: str, *, now: dt.datetime) -> tuple[str, dt.datetime]:
        """A token for ``device_id`` (of ``model``); returns it and its expiry."""
        expires = (now + self.ttl).replace(microsecond=0)
        payload = (f"v1~{device_id}~{model}~{SCOPE}~{int(expires.timestamp())}~"
                   f"{secrets.token_hex(8)}")
        if not _PAYLOAD_RE.match(payload):
            raise ValueError("bad device id or model for an update token")
        return TOKEN_PREFIX + self._signer.sign(_PURPOSE, payload), expires

    def verify(self, token: str, *, now: dt.datetime) -> UpdateClaims | None:
        """The claims of a valid, unexpired token, else ``None`` (constant-time MAC check)."""
        if (not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS
                or not token.startswith(TOKEN_PREFIX)):
            return None
        payload = self._signer.unsign(_PURPOSE, token[len(TOKEN_PREFIX):])
        if payload is None:
            return None
        m = _PAYLOAD_RE.match(payload)
        if m is None:
            return None
        expires = dt.datetime.fromtimestamp(int(m.group(4)), dt.UTC)
        if expires <= now or expires - now > MAX_TTL:
            return None
        return UpdateClaims(device_id=m.group(1), model=m.group(2), scope=m.group(3),
                            expires_at=expires)
