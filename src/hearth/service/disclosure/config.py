"""The maker's vulnerability-disclosure configuration, validated at start.

Everything the public sees (security.txt, the policy page, advisories) and every limit
the intake enforces comes from one :class:`DisclosureConfig`. Build it from a mapping
(``DisclosureConfig.model_validate({...})``) or from ``HEARTH_DISCLOSURE_*`` environment
variables (:meth:`DisclosureConfig.from_env`). Invalid configuration raises
:class:`hearth.errors.ConfigError` at start, never at request time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hearth.errors import ConfigError

__all__ = [
    "DEFAULT_ATTACHMENT_TYPES",
    "DisclosureConfig",
    "IntakeLimits",
    "RateLimits",
    "SpamDefence",
]

DEFAULT_ATTACHMENT_TYPES = ("text/plain", "application/pdf", "image/png", "image/jpeg")
"""Attachment types accepted, decided by sniffing the bytes (never the client's claim)."""

_LANG_TAG = re.compile(r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*\Z")
_CONTACT_SCHEMES = ("mailto", "https", "tel")
_ENCRYPTION_SCHEMES = ("https", "openpgp4fpr", "dns")
_PREFIX = re.compile(r"^[A-Z][A-Z0-9]{1,15}\Z")


class IntakeLimits(BaseModel):
    """Size limits for untrusted report content (explicit, per DESIGN conventions)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_title_chars: int = Field(default=200, ge=10, le=1000)
    max_text_chars: int = Field(default=20_000, ge=100, le=200_000)
    """Longest description, steps to reproduce, or message."""
    max_short_chars: int = Field(default=200, ge=10, le=1000)
    """Longest short field (product, version, name, e-mail)."""
    max_attachments: int = Field(default=3, ge=0, le=10)
    max_attachment_bytes: int = Field(default=2 * 1024 * 1024, ge=1024, le=20 * 1024 * 1024)
    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=100 * 1024 * 1024)
    """Whole request body (form or JSON, attachments included); checked before parsing."""
    attachment_types: tuple[str, ...] = DEFAULT_ATTACHMENT_TYPES

    @field_validator("attachment_types")
    @classmethod
    def _known_types(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(v) - set(DEFAULT_ATTACHMENT_TYPES)
        if unknown:
            raise ValueError(f"attachment types Hearth cannot sniff: {sorted(unknown)}")
        return v


class RateLimits(BaseModel):
    """Token buckets per source address: ``burst`` requests at once, then one per ``every``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    report_burst: int = Field(default=3, ge=1, le=1000)
    report_every_seconds: float = Field(default=600.0, gt=0)
    """New reports: 3 at once, then one every 10 minutes per address."""
    message_burst: int = Field(default=10, ge=1, le=1000)
    message_every_seconds: float = Field(default=60.0, gt=0)
    """Status-page reads, messages and sign-in attempts."""
    max_tracked_addresses: int = Field(default=100_000, ge=100)
    """Memory bound: the least recently seen addresses are forgotten beyond this."""


class SpamDefence(BaseModel):
    """Spam defence without third parties (see docs/disclosure.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    form_min_seconds: float = Field(default=3.0, ge=0, le=600)
    """A web form submitted sooner than this after it was served is refused (bots)."""
    form_max_age_seconds: float = Field(default=4 * 3600.0, ge=60)
    """A web form older than this is refused (stale or harvested token)."""
    pow_difficulty_bits: int = Field(default=18, ge=0, le=28)
    """JSON API: leading zero bits required of sha256(challenge ':' nonce)."""
    challenge_ttl_seconds: float = Field(default=900.0, ge=30)


class DisclosureConfig(BaseModel):
    """The maker's disclosure settings. Field docs say what each one drives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    organisation: str = Field(min_length=1, max_length=200)
    """The maker's name, as shown on the policy page and as the CSAF publisher."""
    base_url: str
    """Public origin of the service, e.g. ``https://hearth.example.com`` (https required)."""
    contacts: tuple[str, ...] = Field(min_length=1)
    """security.txt ``Contact:`` URIs (mailto:, https:, tel:), in order of preference.
    The service's own report form is always listed first."""
    encryption: tuple[str, ...] = ()
    """security.txt ``Encryption:`` URIs (https: key URL, openpgp4fpr:, dns:)."""
    acknowledgments_url: str | None = None
    """security.txt ``Acknowledgments:`` (a hall-of-fame page), https only."""
    preferred_languages: tuple[str, ...] = ("en",)
    expires_after_days: int = Field(default=180, ge=7, le=364)
    """security.txt ``Expires:`` is computed at serve time as now + this (RFC 9116: < 1 year)."""
    acknowledge_within_working_days: int = Field(default=5, ge=1, le=30)
    status_update_every_days: int = Field(default=14, ge=1, le=90)
    fix_target_days: int = Field(default=90, ge=7, le=365)
    timezone: str = "UTC"
    """Time zone of the security team's working days."""
    working_weekdays: tuple[int, ...] = (0, 1, 2, 3, 4)
    """ISO weekday numbers minus one (Monday = 0) on which the team works."""
    holidays: tuple[dt.date, ...] = ()
    scope: tuple[str, ...] = (
        "the firmware of our Hearth-based devices",
        "the companion web app and its API",
        "the cloud service that runs the fleet, updates and this disclosure service",
    )
    out_of_scope: tuple[str, ...] = (
        "denial-of-service testing against production systems",
        "social engineering of staff or customers, and physical attacks on our premises",
        "devices you do not own or are not authorised to test",
    )
    advisory_prefix: str = "HSA"
    """Advisory ids look like ``HSA-2025-0001``."""
    csaf_publisher_category: Literal["vendor", "coordinator", "user", "discoverer", "other"] = (
        "vendor"
    )
    csaf_list_on_aggregators: bool = True
    csaf_mirror_on_aggregators: bool = True
    limits: IntakeLimits = IntakeLimits()
    rates: RateLimits = RateLimits()
    spam: SpamDefence = SpamDefence()
    secret_key: bytes = Field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    """Key for signed cookies, CSRF tokens, form timestamps and proof-of-work challenges.
    Set it (``HEARTH_SECRET_KEY``, >= 32 bytes) when several processes serve the app."""
    unsafe_allow_http: bool = False
    """Only for local tests: allow an ``http://`` base URL and non-Secure cookies."""

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("base_url must be an absolute https URL")
        if parts.query or parts.fragment or parts.path not in ("", "/"):
            raise ValueError("base_url must be an origin without path, query or fragment")
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("contacts")
    @classmethod
    def _contacts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for uri in v:
            _check_uri(uri, _CONTACT_SCHEMES, "contact")
        return v

    @field_validator("encryption")
    @classmethod
    def _encryption(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for uri in v:
            _check_uri(uri, _ENCRYPTION_SCHEMES, "encryption")
        return v

    @field_validator("acknowledgments_url")
    @classmethod
    def _ack(cls, v: str | None) -> str | None:
        if v is not None:
            _check_uri(v, ("https",), "acknowledgments_url")
        return v

    @field_validator("preferred_languages")
    @classmethod
    def _langs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one preferred language")
        for tag in v:
            if not _LANG_TAG.match(tag):
                raise ValueError(f"not a language tag: {tag!r}")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ValueError(f"unknown time zone {v!r}") from e
        return v

    @field_validator("working_weekdays")
    @classmethod
    def _weekdays(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(d not in range(7) for d in v) or len(set(v)) != len(v):
            raise ValueError("working_weekdays: distinct numbers 0 (Monday) to 6 (Sunday)")
        return tuple(sorted(v))

    @field_validator("advisory_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _PREFIX.match(v):
            raise ValueError("advisory_prefix: 2-16 upper-case letters or digits")
        return v

    @field_validator("secret_key")
    @classmethod
    def _secret(cls, v: bytes) -> bytes:
        if len(v) < 32:
            raise ValueError("secret_key must be at least 32 bytes")
        return v

    @model_validator(mode="after")
    def _https(self) -> DisclosureConfig:
        if self.base_url.startswith("http://") and not self.unsafe_allow_http:
            raise ValueError("base_url must use https (unsafe_allow_http is for local tests)")
        return self

    # --- derived values ---------------------------------------------------------------
    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def secure_cookies(self) -> bool:
        return not self.unsafe_allow_http

    def url(self, path: str) -> str:
        """Absolute public URL of ``path`` (which starts with ``/``)."""
        return self.base_url + path

    @property
    def policy_url(self) -> str:
        return self.url("/security/policy")

    @property
    def report_url(self) -> str:
        return self.url("/security/report")

    @property
    def security_txt_url(self) -> str:
        return self.url("/.well-known/security.txt")

    @property
    def provider_metadata_url(self) -> str:
        return self.url("/.well-known/csaf/provider-metadata.json")

    # --- loading ----------------------------------------------------------------------
    @classmethod
    def load(cls, data: Mapping[str, Any]) -> DisclosureConfig:
        """Validate a mapping; raises :class:`ConfigError` with every problem listed."""
        try:
            return cls.model_validate(dict(data))
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                for err in e.errors()
            )
            raise ConfigError(f"invalid disclosure configuration: {problems}") from e

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DisclosureConfig:
        """Read ``HEARTH_DISCLOSURE_CONFIG`` (a JSON file) and ``HEARTH_DISCLOSURE_*`` overrides.

        Simple variables: ``ORGANISATION``, ``BASE_URL`` (else ``HEARTH_BASE_URL``),
        ``CONTACTS`` / ``ENCRYPTION`` / ``PREFERRED_LANGUAGES`` (comma-separated),
        ``ACKNOWLEDGMENTS_URL``, ``TIMEZONE``; the secret comes from ``HEARTH_SECRET_KEY``
        (hex or text, >= 32 bytes). Raises :class:`ConfigError`.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        path = env.get("HEARTH_DISCLOSURE_CONFIG")
        if path:
            try:
                loaded = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read HEARTH_DISCLOSURE_CONFIG {path}: {e}") from e
            if not isinstance(loaded, dict):
                raise ConfigError("HEARTH_DISCLOSURE_CONFIG must hold a JSON object")
            data.update(loaded)
        p = "HEARTH_DISCLOSURE_"
        for key in ("ORGANISATION", "BASE_URL", "ACKNOWLEDGMENTS_URL", "TIMEZONE"):
            if env.get(p + key):
                data[key.lower()] = env[p + key]
        if "base_url" not in data and env.get("HEARTH_BASE_URL"):
            data["base_url"] = env["HEARTH_BASE_URL"]
        for key in ("CONTACTS", "ENCRYPTION", "PREFERRED_LANGUAGES"):
            if env.get(p + key):
                data[key.lower()] = [s.strip() for s in env[p + key].split(",") if s.strip()]
        secret = env.get("HEARTH_SECRET_KEY")
        if secret:
            try:
                data["secret_key"] = bytes.fromhex(secret)
            except ValueError:
                data["secret_key"] = secret.encode()
        return cls.load(data)


def _check_uri(uri: str, schemes: tuple[str, ...], what: str) -> None:
    if any(c.isspace() for c in uri) or any(ord(c) < 0x21 for c in uri):
        raise ValueError(f"{what}: URI must not contain spaces or control characters")
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme not in schemes:
        raise ValueError(f"{what}: {uri!r} must start with one of {', '.join(schemes)}:")
    if scheme == "https" and not urlsplit(uri).hostname:
        raise ValueError(f"{what}: {uri!r} is not an absolute https URL")
