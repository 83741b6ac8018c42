"""``/.well-known/security.txt`` (RFC 9116): rendered from configuration, and checked.

:func:`render_security_txt` builds the file at serve time from :class:`DisclosureConfig`
and the current time, so ``Expires`` is always ``now + expires_after_days`` (truncated to
the start of the UTC day, so the file is stable within a day): the file renews itself
and can never go stale while the service runs.

:func:`parse_security_txt` is an independent checker written to RFC 9116's rules (field
syntax, required and single-valued fields, ``Expires`` format and limits, https-only web
URIs, ``Canonical`` naming the URL the file was fetched from). The tests use it against
the rendered file; a conformance check can use it against a deployed service.

Example::

    text = render_security_txt(config, now=utc_now())
    parsed = parse_security_txt(text, now=utc_now(), retrieved_from=config.security_txt_url)
    assert parsed.ok, parsed.errors
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

from hearth.service.disclosure.config import DisclosureConfig

__all__ = ["SecurityTxt", "parse_security_txt", "render_security_txt"]

_FIELD_LINE = re.compile(r"^([A-Za-z0-9!#$%&'*+.^_`|~-]+):[ \t]+(\S(?:.*\S)?)[ \t]*\Z")
# RFC 3339 date-time (the Internet profile of ISO 8601), with a mandatory offset.
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})\Z"
)
_URI_FIELDS = {"acknowledgments", "canonical", "contact", "encryption", "hiring", "policy", "csaf"}
_WEB_MUST_BE_HTTPS = {"acknowledgments", "canonical", "hiring", "policy", "csaf"}
_SINGLE = {"expires", "preferred-languages"}
_LANG_TAG = re.compile(r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*\Z")


def _format_expires(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_security_txt(config: DisclosureConfig, *, now: dt.datetime) -> str:
    """The security.txt body (UTF-8 text, LF line ends) for ``now`` (aware UTC)."""
    day_start = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    expires = day_start + dt.timedelta(days=config.expires_after_days)
    lines = [
        f"# Security contact for {_one_line(config.organisation)}.",
        "# Report a vulnerability with the form (first Contact); no account is needed.",
        f"Contact: {config.report_url}",
        *(f"Contact: {c}" for c in config.contacts),
        f"Expires: {_format_expires(expires)}",
        *(f"Encryption: {e}" for e in config.encryption),
    ]
    if config.acknowledgments_url:
        lines.append(f"Acknowledgments: {config.acknowledgments_url}")
    lines += [
        f"Preferred-Languages: {', '.join(config.preferred_languages)}",
        f"Canonical: {config.security_txt_url}",
        f"Policy: {config.policy_url}",
        f"CSAF: {config.provider_metadata_url}",
    ]
    return "\n".join(lines) + "\n"


def _one_line(s: str) -> str:
    return " ".join(s.split())


@dataclass
class SecurityTxt:
    """A parsed security.txt: ``fields`` maps lower-case names to values in file order."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    expires: dt.datetime | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def get(self, name: str) -> list[str]:
        return self.fields.get(name.lower(), [])


def parse_security_txt(
    text: str | bytes,
    *,
    now: dt.datetime,
    retrieved_from: str | None = None,
    content_type: str | None = None,
) -> SecurityTxt:
    """Parse and check ``text`` against RFC 9116. Never raises on bad input.

    Error codes (stable, in ``errors``): ``not_utf8``, ``bad_content_type``, ``bad_line``,
    ``missing_contact``, ``missing_expires``, ``duplicate_expires``,
    ``duplicate_preferred_languages``, ``bad_expires_format``, ``expired``,
    ``not_https:<field>``, ``bad_uri:<field>``, ``bad_language_tag``,
    ``canonical_mismatch``, ``signed_not_supported``. Warning: ``expires_over_a_year``.
    """
    out = SecurityTxt()
    if content_type is not None:
        ct = [p.strip().lower() for p in content_type.split(";")]
        if ct[0] != "text/plain" or "charset=utf-8" not in ct[1:]:
            out.errors.append("bad_content_type")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            out.errors.append("not_utf8")
            return out
    if text.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        out.errors.append("signed_not_supported")
        return out
    # eol = *WSP [CR] LF ; a last line without LF is tolerated
    for raw in text.split("\n"):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip() or line.lstrip(" \t").startswith("#"):
            continue
        m = _FIELD_LINE.match(line)
        if not m:
            out.errors.append("bad_line")
            continue
        out.fields.setdefault(m.group(1).lower(), []).append(m.group(2))

    for name in _SINGLE:
        if len(out.get(name)) > 1:
            out.errors.append(f"duplicate_{name.replace('-', '_')}")
    if not out.get("contact"):
        out.errors.append("missing_contact")
    expires = out.get("expires")
    if not expires:
        out.errors.append("missing_expires")
    else:
        out.expires = _parse_rfc3339(expires[0])
        if out.expires is None:
            out.errors.append("bad_expires_format")
        elif out.expires <= now:
            out.errors.append("expired")
        elif out.expires > now + dt.timedelta(days=365):
            out.warnings.append("expires_over_a_year")
    for name in _URI_FIELDS:
        for value in out.get(name):
            scheme = value.split(":", 1)[0].lower() if ":" in value else ""
            if not re.match(r"^[a-z][a-z0-9+.-]*$", scheme) or value.endswith(":"):
                out.errors.append(f"bad_uri:{name}")
            elif scheme == "http" or (name in _WEB_MUST_BE_HTTPS and scheme != "https"):
                out.errors.append(f"not_https:{name}")
    for value in out.get("preferred-languages"):
        if not all(_LANG_TAG.match(t.strip()) for t in value.split(",")):
            out.errors.append("bad_language_tag")
    if retrieved_from is not None and out.get("canonical"):
        if retrieved_from not in out.get("canonical"):
            out.errors.append("canonical_mismatch")
    return out


def _parse_rfc3339(value: str) -> dt.datetime | None:
    m = _RFC3339.match(value)
    if not m:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(dt.UTC)
