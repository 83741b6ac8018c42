"""Rate limiting and spam defence for the public intake, with no third-party service.

**Rate limit** - :class:`TokenBucketLimiter`, one bucket per source address (IPv4 /32,
IPv6 /64, since one host usually owns a whole /64). A bucket holds ``burst`` tokens and
regains one every ``every`` seconds; a request takes one or is refused (``429`` with
``Retry-After``). Buckets live in process memory: cheap, no database write per flood
request, bounded (least-recently-seen addresses are dropped beyond ``max_keys``). The cost
is that N service processes allow N times the rate; put the same limit at the reverse
proxy when running several processes. The limiter sits behind the small
:class:`RateLimiter` protocol so a shared store can replace it.

**Spam defence for the web form** - two cheap signals that need no JavaScript:

* a *honeypot* field, hidden from people (off-screen, ``aria-hidden``, ``tabindex=-1``,
  ``autocomplete=off``) that form-filling bots fill in;
* a *signed form timestamp* (:class:`FormStamp`): the form carries ``time.MAC`` issued
  when the page was served; a submission sooner than ``form_min_seconds`` after that (no
  person types a report that fast) or older than ``form_max_age_seconds`` is refused.

**Spam defence for the JSON API** - a hashcash-style proof of work (:class:`ProofOfWork`):
the client fetches a server-signed, short-lived challenge and must find a ``nonce`` such
that ``sha256(challenge ":" nonce)`` starts with ``difficulty`` zero bits (about 2**18
hashes by default: well under a second for a researcher's script, expensive at volume).
Each challenge is accepted once (replays refused) within its lifetime.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import math
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from hearth.service.disclosure.intake import IntakeError, IntakeReason
from hearth.service.web.signing import Signer

__all__ = [
    "FormStamp",
    "ProofOfWork",
    "RateLimiter",
    "TokenBucketLimiter",
    "address_key",
    "leading_zero_bits",
    "solve_pow",
]

Clock = Callable[[], dt.datetime]


def address_key(host: str | None) -> str:
    """The rate-limit key of a client address: IPv4 as is, IPv6 by its /64."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class RateLimiter(Protocol):
    def take(self, key: str) -> float:
        """0.0 if allowed (a token was taken), else seconds until the next token."""
        ...


class TokenBucketLimiter:
    """In-memory token buckets per key (thread-safe, bounded). See the module docstring."""

    def __init__(self, *, burst: int, every_seconds: float, clock: Clock,
                 max_keys: int = 100_000) -> None:
        if burst < 1 or every_seconds <= 0:
            raise ValueError("burst >= 1 and every_seconds > 0")
        self._burst = float(burst)
        self._every = every_seconds
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        now = self._clock().timestamp()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self._burst, now))
            tokens = min(self._burst, tokens + max(0.0, now - last) / self._every)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) * self._every
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
            return wait


class FormStamp:
    """Signed "form served at" stamps for the web form (see the module docstring)."""

    PURPOSE = "form-ts"

    def __init__(self, signer: Signer, *, min_seconds: float, max_age_seconds: float) -> None:
        self._signer = signer
        self._min = min_seconds
        self._max = max_age_seconds

    def issue(self, now: dt.datetime) -> str:
        return self._signer.sign(self.PURPOSE, f"{now.timestamp():.3f}")

    def check(self, stamp: object, now: dt.datetime) -> None:
        """Raise :class:`IntakeError` (bad_form_token, form_too_fast, form_expired)."""
        payload = self._signer.unsign(self.PURPOSE, stamp) if isinstance(stamp, str) else None
        if payload is None:
            raise IntakeError(IntakeReason.BAD_FORM_TOKEN,
                              "the form is invalid; reload the page and try again")
        age = now.timestamp() - float(payload)
        if age < self._min:
            raise IntakeError(IntakeReason.FORM_TOO_FAST,
                              "the form was sent too quickly; please check it and send again")
        if age > self._max:
            raise IntakeError(IntakeReason.FORM_EXPIRED,
                              "the form has expired; reload the page and try again")


def leading_zero_bits(digest: bytes) -> int:
    bits = 0
    for byte in digest:
        if byte == 0:
            bits += 8
            continue
        return bits + 8 - byte.bit_length()
    return bits


def solve_pow(challenge: str, difficulty: int) -> str:
    """Find a nonce for ``challenge`` (what a client does; used by tests and the docs)."""
    for n in range(2**40):
        nonce = format(n, "x")
        digest = hashlib.sha256(f"{challenge}:{nonce}".encode()).digest()
        if leading_zero_bits(digest) >= difficulty:
            return nonce
    raise RuntimeError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class Challenge:
    challenge: str
    difficulty: int
    expires_at: dt.datetime


class ProofOfWork:
    """Issue and check proof-of-work challenges for the JSON intake API."""

    PURPOSE = "pow"

    def __init__(self, signer: Signer, *, difficulty: int, ttl_seconds: float,
                 max_spent: int = 200_000) -> None:
        self._signer = signer
        self.difficulty = difficulty
        self._ttl = ttl_seconds
        self._spent: OrderedDict[str, float] = OrderedDict()
        self._max_spent = max_spent
        self._lock = threading.Lock()

    def issue(self, now: dt.datetime) -> Challenge:
        expires = now + dt.timedelta(seconds=self._ttl)
        payload = f"{secrets.token_urlsafe(16)}~{math.floor(expires.timestamp())}~{self.difficulty}"
        return Challenge(self._signer.sign(self.PURPOSE, payload), self.difficulty, expires)

    def check(self, challenge: object, nonce: object, now: dt.datetime) -> None:
        """Raise :class:`IntakeError` unless ``nonce`` solves a fresh, unused ``challenge``."""
        if challenge is None or nonce is None:
            raise IntakeError(IntakeReason.POW_REQUIRED,
                              "fetch a challenge from /api/v1/disclosure/challenge and solve it",
                              field="pow")
        if not isinstance(challenge, str) or not isinstance(nonce, str) or len(nonce) > 64:
            raise IntakeError(IntakeReason.POW_INVALID, "pow challenge and nonce are strings",
                              field="pow")
        payload = self._signer.unsign(self.PURPOSE, challenge)
        if payload is None or payload.count("~") != 2:
            raise IntakeError(IntakeReason.POW_INVALID, "the challenge is not one of ours",
                              field="pow")
        _, expires_s, bits_s = payload.split("~")
        expires = float(expires_s)
        if now.timestamp() > expires:
            raise IntakeError(IntakeReason.CHALLENGE_EXPIRED, "the challenge has expired",
                              field="pow")
        digest = hashlib.sha256(f"{challenge}:{nonce}".encode()).digest()
        if leading_zero_bits(digest) < int(bits_s):
            raise IntakeError(IntakeReason.POW_INVALID, "the nonce does not solve the challenge",
                              field="pow")
        with self._lock:
            for key, exp in list(self._spent.items()):
                if exp >= now.timestamp() and len(self._spent) <= self._max_spent:
                    break
                del self._spent[key]
            if challenge in self._spent:
                raise IntakeError(IntakeReason.CHALLENGE_REUSED,
                                  "this challenge was used already; fetch a new one",
                                  field="pow")
            self._spent[challenge] = expires
