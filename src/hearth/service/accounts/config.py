"""Settings of the accounts capability: session lifetimes, throttles, password hashing.

Every limit is a typed default here, so "how fast can anyone guess?" has one answer (see
``docs/accounts.md`` for the arithmetic). :class:`AccountsConfig` validates itself when
built; :meth:`AccountsConfig.from_env` reads ``HEARTH_BASE_URL`` and the service secret.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from hearth.errors import ConfigError

__all__ = ["AccountsConfig", "Argon2Params", "ThrottlePolicy"]


@dataclass(frozen=True, kw_only=True)
class ThrottlePolicy:
    """Exponential backoff per key: ``free`` attempts, then each further attempt must wait
    ``min(cap, base * 2**(n - free))`` seconds after the previous one. Never a permanent
    lock: the longest wait is ``cap``. A key with no attempt for ``forget_after`` starts over.
    """

    free: int
    base: dt.timedelta
    cap: dt.timedelta
    forget_after: dt.timedelta

    def __post_init__(self) -> None:
        if self.free < 0 or self.base <= dt.timedelta(0) or self.cap < self.base:
            raise ConfigError("throttle: free >= 0 and 0 < base <= cap")
        if self.forget_after < self.cap:
            raise ConfigError("throttle: forget_after must be at least cap")

    def delay(self, attempts: int) -> dt.timedelta:
        """How long after attempt number ``attempts`` (1-based) the next one must wait."""
        if attempts < self.free:
            return dt.timedelta(0)
        exponent = min(attempts - self.free, 40)
        return min(self.cap, self.base * (1 << exponent))


def _policy(free: int, base_s: float, cap_s: float, forget_s: float) -> ThrottlePolicy:
    return ThrottlePolicy(free=free, base=dt.timedelta(seconds=base_s),
                          cap=dt.timedelta(seconds=cap_s),
                          forget_after=dt.timedelta(seconds=forget_s))


_HOUR = 3600.0
_DAY = 86400.0


@dataclass(frozen=True, kw_only=True)
class Argon2Params:
    """argon2id cost for account passwords (OWASP minimum: 19 MiB, 2 passes, 1 lane)."""

    time_cost: int = 2
    memory_kib: int = 19 * 1024
    parallelism: int = 1


@dataclass(frozen=True, kw_only=True)
class AccountsConfig:
    base_url: str
    """The web app's origin (``https://host[:port]``): CSRF origin checks, cookie flags."""
    secret_key: bytes = field(repr=False)
    """The service secret (kept outside the database); signing and TOTP-encryption keys
    are derived from it with HKDF, one per purpose."""
    site_name: str = "Hearth"
    unsafe_allow_http: bool = False
    """Plain-http base URL for local tests only: cookies lose ``Secure`` and ``__Host-``."""
    consumer_idle: dt.timedelta = dt.timedelta(hours=24)
    consumer_absolute: dt.timedelta = dt.timedelta(days=30)
    privileged_idle: dt.timedelta = dt.timedelta(minutes=30)
    privileged_absolute: dt.timedelta = dt.timedelta(hours=12)
    pending_ttl: dt.timedelta = dt.timedelta(minutes=5)
    """How long a password-verified session may wait for its TOTP code (or enrolment)."""
    password_min_chars: int = 8
    password_max_chars: int = 1024
    argon2: Argon2Params = field(default_factory=Argon2Params)
    system_command_ttl: dt.timedelta = dt.timedelta(hours=1)
    """Life of one ``bind_owner``/``factory_reset`` command; the sync loop resends."""
    # Claiming: the per-unit policy bounds online guessing of one unit's setup code.
    claim_unit: ThrottlePolicy = field(default_factory=lambda: _policy(5, 60, _HOUR, 7 * _DAY))
    claim_account: ThrottlePolicy = field(default_factory=lambda: _policy(10, 60, _HOUR, _DAY))
    claim_address: ThrottlePolicy = field(default_factory=lambda: _policy(20, 60, _HOUR, _DAY))
    # Sign-in: per account+address is the tight one; per account (any address) and per
    # address (any account) stop distributed guessing and credential stuffing; a browser
    # that signed in before (known-device cookie) only meets its own, separate limit.
    login_account_address: ThrottlePolicy = field(
        default_factory=lambda: _policy(5, 1, 900, _DAY))
    login_account: ThrottlePolicy = field(default_factory=lambda: _policy(20, 1, 300, _DAY))
    login_address: ThrottlePolicy = field(default_factory=lambda: _policy(50, 1, 900, _DAY))
    login_device: ThrottlePolicy = field(default_factory=lambda: _policy(10, 1, 60, _DAY))
    totp: ThrottlePolicy = field(default_factory=lambda: _policy(5, 2, 300, _DAY))
    signup_address: ThrottlePolicy = field(default_factory=lambda: _policy(10, 60, _HOUR, _DAY))

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("https", "http") or not parts.netloc or parts.path not in (
                "", "/") or parts.query or parts.fragment:
            raise ConfigError("accounts: base_url must be an origin like https://host:port")
        if parts.scheme == "http" and not self.unsafe_allow_http:
            raise ConfigError("accounts: base_url must use https (unsafe_allow_http is for "
                              "local tests)")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if len(self.secret_key) < 32:
            raise ConfigError("accounts: the secret key must be at least 32 bytes")
        if not 8 <= self.password_min_chars <= 64 or self.password_max_chars < 64:
            raise ConfigError("accounts: passwords of 8..64+ characters must be allowed "
                              "(NIST SP 800-63B)")
        for name in ("consumer_idle", "consumer_absolute", "privileged_idle",
                     "privileged_absolute", "pending_ttl", "system_command_ttl"):
            if getattr(self, name) <= dt.timedelta(0):
                raise ConfigError(f"accounts: {name} must be positive")

    @property
    def secure_cookies(self) -> bool:
        return self.base_url.startswith("https://")

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, secret_key: bytes,
                 site_name: str = "Hearth") -> AccountsConfig:
        """``HEARTH_BASE_URL`` (required) and the service secret (read by the caller from
        outside the database)."""
        base = env.get("HEARTH_BASE_URL", "")
        if not base:
            raise ConfigError("HEARTH_BASE_URL must be set for the web app")
        return cls(base_url=base, secret_key=secret_key, site_name=site_name)
