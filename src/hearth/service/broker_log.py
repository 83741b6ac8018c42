"""What the broker refused, counted by reason from its own log (guideline 10).

Mosquitto logs every connection it turns away - a certificate the CA did not sign, an
expired or revoked one, no certificate, plain TCP, an old TLS version, a weak cipher, a
wrong password, another unit's identity or client id (Hearth's identity plugin), broken
MQTT - but only as text; what a unit tries on another unit's topics is logged by
Hearth's plugin (``hearth-acl:``; Mosquitto logs ACL denials only at debug level).
:class:`LogWatch` reads the log incrementally and turns those lines into counts per
reason; :func:`record` adds them to the ``broker_refusals`` table, which the operator
API serves (``GET /api/v1/security/broker-refusals``). A burst of ``identity_mismatch``,
``certificate_refused`` or ``acl_denied`` is what a cloned, stolen or compromised unit,
or someone probing the front door, looks like.

One refused connection counts once: Mosquitto follows a TLS failure with "disconnected:
Protocol error." and an identity refusal with "disconnected, not authorised."; those
follow-up lines are not counted again. Mosquitto 2.0.11's line formats are pinned by
tests against the real broker.

A restarted broker refuses every unit certificate until it has restored the ingest
sessions (ADR 0001 decision 10). The broker writes :data:`HOLD_BEGINS` into the log
before it starts Mosquitto and a ``hearth: hold ends:`` line once it lets units in (or
the process is gone); certificate failures between the two count as ``held_back``, not
as ``certificate_refused``, so a restart does not look like an attack. Every other kind
of refusal is counted as usual during the hold.
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hearth.service.models import BrokerRefusal

__all__ = ["HOLD_ABORTED", "HOLD_BEGINS", "HOLD_ENDS", "LOG_TIMESTAMP_FORMAT", "REASONS",
           "LogWatch", "classify", "mark", "record", "weight"]

REASONS: dict[str, str] = {
    "certificate_refused": "TLS: the client certificate did not verify (another CA, "
                           "expired, revoked)",
    "held_back": "TLS: a certificate refused while a restarted broker held units back "
                 "until the ingest sessions were restored (ADR 0001 decision 10): units "
                 "reconnecting a moment too early, and any other certificate failure of "
                 "that moment",
    "no_certificate": "TLS: the client sent no certificate",
    "tls_version_refused": "TLS: a protocol version below TLS 1.2",
    "cipher_refused": "TLS: no cipher suite in common (a weak client)",
    "not_tls": "not TLS at all (plain MQTT or another protocol on the TLS port)",
    "tls_failed": "TLS: another handshake failure",
    "identity_mismatch": "the MQTT username is not the certificate's identity",
    "client_id_mismatch": "a client id that belongs to another identity",
    "auth_refused": "wrong password, or a revoked or quarantined identity",
    "protocol_error": "broken MQTT after a good handshake: a packet the protocol does not "
                      "allow (a control character in a client id, a reserved packet "
                      "type) or one that does not parse",
    "oversize_packet": "an MQTT packet over the broker's limit (a 16 KiB payload plus "
                       "headers)",
    "acl_denied": "a unit published or subscribed outside its own topics (another unit's, "
                  "the broker's control topics, wildcards)",
}
"""Reason code -> what it means."""

MAX_READ = 4 * 1024 * 1024
"""Bytes read per :meth:`LogWatch.read` call at most (the rest waits for the next call)."""

LOG_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S"
"""Mosquitto's ``log_timestamp_format`` in Hearth's config, and the markers' stamps."""
HOLD_BEGINS = "hearth: hold begins: units are refused until the ingest sessions are restored"
HOLD_ENDS = "hearth: hold ends: units may connect"
HOLD_ABORTED = "hearth: hold ends: this Mosquitto process stopped before letting units in"
_HOLD_END_PREFIX = "hearth: hold ends: "

_ACL_DENIED = "hearth-acl: denied "
_ACL_UNLOGGED = re.compile(r"hearth-acl: (\d{1,19}) more denials were not logged one by one")

_AFTER_TLS_FAILURE = "disconnected: Protocol error."
_AFTER_AUTH_FAILURE = "disconnected, not authorised."
_FOLLOW_UP = {
    **dict.fromkeys(("certificate_refused", "no_certificate", "tls_version_refused",
                     "cipher_refused", "not_tls", "tls_failed"), _AFTER_TLS_FAILURE),
    **dict.fromkeys(("identity_mismatch", "client_id_mismatch"), _AFTER_AUTH_FAILURE),
}
"""Reason -> the line Mosquitto logs next for the same refused connection."""


def classify(line: str) -> str | None:
    """The refusal reason of one log line (without its timestamp), or None. (A line
    that reports several refusals at once is weighed by :func:`weight`.)"""
    if "OpenSSL Error" in line or ("Client connection from" in line and "failed:" in line):
        if "certificate verify failed" in line:
            return "certificate_refused"
        if "did not return a certificate" in line:
            return "no_certificate"
        if "unsupported protocol" in line:
            return "tls_version_refused"
        if "no shared cipher" in line:
            return "cipher_refused"
        if "wrong version number" in line or "http request" in line:
            return "not_tls"
        return "tls_failed"
    if line.startswith(_ACL_DENIED) or _ACL_UNLOGGED.fullmatch(line):
        return "acl_denied"
    if line.startswith("hearth-identity: refused client "):
        if "client id" in line:
            return "client_id_mismatch"
        return "identity_mismatch"
    if line.endswith(_AFTER_AUTH_FAILURE):
        return "auth_refused"
    if line.endswith((_AFTER_TLS_FAILURE, " disconnected due to protocol error.",
                      " disconnected due to malformed packet.")):
        return "protocol_error"
    if line.endswith(" disconnected due to oversize packet."):
        return "oversize_packet"
    return None


def mark(path: Path, text: str) -> None:
    """Append a line of Hearth's own to Mosquitto's log, stamped as Mosquitto stamps its
    lines. One ``write`` with ``O_APPEND``: a whole line, even while Mosquitto appends."""
    line = f"{time.strftime(LOG_TIMESTAMP_FORMAT)}: {text}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def weight(line: str) -> int:
    """How many refusals a classified line stands for: the plugin's rate-limited ACL
    denials are reported as a count; every other line is one."""
    m = _ACL_UNLOGGED.fullmatch(line)
    return int(m.group(1)) if m else 1


@dataclass
class _Position:
    inode: int
    offset: int


class LogWatch:
    """Reads the lines Mosquitto appended since the last call and counts the refusals.

    Starts at the end of the file as it is now (``from_start=False``), so what an earlier
    run logged is not counted again; a file that shrank or was replaced is read from its
    beginning. A line still being written is kept for the next call.
    """

    def __init__(self, path: Path, *, from_start: bool = False) -> None:
        self.path = path
        self._pos = self._stat(start=not from_start)
        self._partial = b""
        self._swallow: str | None = None  # the follow-up line of a refusal already counted
        self._holding = False  # between HOLD_BEGINS and a "hold ends" line

    def _stat(self, *, start: bool) -> _Position:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return _Position(0, 0)
        return _Position(st.st_ino, st.st_size if start else 0)

    def read(self) -> collections.Counter[str]:
        """Refusals per reason in the lines appended since the last call."""
        counts: collections.Counter[str] = collections.Counter()
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._pos.inode or st.st_size < self._pos.offset:
                    self._pos, self._partial, self._swallow = _Position(st.st_ino, 0), b"", None
                    self._holding = False
                f.seek(self._pos.offset)
                data = f.read(MAX_READ)
        except FileNotFoundError:
            return counts
        self._pos.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            reason, n = self._reason(raw.decode("utf-8", "replace").rstrip("\r"))
            if reason is not None:
                counts[reason] += n
        return counts

    def _reason(self, line: str) -> tuple[str | None, int]:
        _stamp, sep, text = line.partition(": ")
        text = text if sep else line
        swallow, self._swallow = self._swallow, None
        if swallow is not None and text.endswith(swallow):
            return None, 0
        if text == HOLD_BEGINS or text.startswith(_HOLD_END_PREFIX):
            self._holding = text == HOLD_BEGINS
            return None, 0
        reason = classify(text)
        if reason is None:
            return None, 0
        self._swallow = _FOLLOW_UP.get(reason)
        if reason == "certificate_refused" and self._holding:
            return "held_back", 1
        return reason, weight(text) if reason == "acl_denied" else 1


def record(session: Session, counts: collections.Counter[str], now: dt.datetime) -> None:
    """Add ``counts`` to the ``broker_refusals`` table (in the caller's transaction)."""
    for reason, n in sorted(counts.items()):
        if n <= 0:
            continue
        updated = session.execute(
            sa.update(BrokerRefusal).where(BrokerRefusal.reason == reason)
            .values(count=BrokerRefusal.count + n, last_at=now))
        if updated.rowcount == 0:  # type: ignore[attr-defined]
            session.add(BrokerRefusal(reason=reason, count=n, last_at=now))
    session.flush()
