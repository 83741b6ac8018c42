"""Password policy (NIST SP 800-63B) and hashing (argon2id).

The policy, as SP 800-63B §5.1.1.2 asks:

* at least 8 characters and at least 64 allowed (here up to ``password_max_chars``, 1024 by
  default - the bound only stops a multi-megabyte "password" from tying up the hasher);
* any characters, Unicode included, counted after NFKC normalisation (so the same password
  typed on two keyboards is the same password); spaces are kept;
* no composition rules (no "one digit and one symbol") and no periodic expiry;
* refused when it is a known-common password (zxcvbn's shipped list of the 30,000 most
  common passwords), when it is easy to guess by zxcvbn's estimate (fewer than 10^6
  guesses: dictionary words, keyboard patterns, repeats, sequences, dates) or when it is
  built on a context-specific word - the service's name or parts of the user's e-mail
  address - with little else.

Each refusal is a :class:`PasswordRefused` with a stable reason (``too_short``,
``too_long``, ``common_password``, ``context_specific``, ``too_guessable``) and a message
that tells the person what to do instead.

Hashes are argon2id (:class:`PasswordHasher`); verification re-hashes a password whose hash
uses weaker parameters than the current ones (:meth:`PasswordHasher.needs_rehash`).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from hearth.errors import ValidationError
from hearth.service.accounts.config import Argon2Params

__all__ = ["PasswordHasher", "PasswordRefused", "check_password", "context_words",
           "normalize_password"]

_ZXCVBN_MAX = 72
"""zxcvbn scores only a prefix (its matcher is super-linear; the package refuses more)."""
_MIN_GUESSES_LOG10 = 6


class PasswordRefused(ValidationError):
    """A new password does not meet the policy (``reason`` says why)."""


def normalize_password(password: str) -> str:
    """NFKC, as SP 800-63B §5.1.1.2 recommends before hashing."""
    return unicodedata.normalize("NFKC", password)


@functools.cache
def _common() -> frozenset[str]:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS  # type: ignore[import-untyped]

    return frozenset(FREQUENCY_LISTS["passwords"])


def context_words(*, email: str = "", site_name: str = "Hearth") -> list[str]:
    """Words a guesser would try first for this account: the service's name and the parts
    of the e-mail address (local part split at . _ + -, domain labels but the TLD)."""
    words = {"hearth", *re.split(r"[^\w]+", site_name.lower())}
    local, _, domain = email.lower().partition("@")
    words.update(re.split(r"[._+\-]+", local))
    labels = domain.split(".")
    words.update(labels[:-1] if len(labels) > 1 else labels)
    return sorted(w for w in words if len(w) >= 3)


def _guesses_log10(password: str, user_inputs: Iterable[str]) -> float:
    from zxcvbn import zxcvbn  # type: ignore[import-untyped]

    if not password:
        return 0.0
    result = zxcvbn(password[:_ZXCVBN_MAX], user_inputs=list(user_inputs),
                    max_length=_ZXCVBN_MAX)
    return float(result["guesses_log10"])


def check_password(password: str, *, context: Iterable[str] = (), min_chars: int = 8,
                   max_chars: int = 1024) -> str:
    """The normalised password if it meets the policy; raises :class:`PasswordRefused`."""
    if not isinstance(password, str):
        raise PasswordRefused("wrong_type", "the password must be text")
    pw = normalize_password(password)
    if len(pw) < min_chars:
        raise PasswordRefused("too_short", f"use at least {min_chars} characters - a few "
                              "words you will remember make a good password")
    if len(pw) > max_chars:
        raise PasswordRefused("too_long", f"use at most {max_chars} characters")
    try:
        pw.encode("utf-8")
    except UnicodeEncodeError:
        raise PasswordRefused("wrong_type", "the password contains invalid characters"
                              ) from None
    lowered = pw.lower()
    if lowered in _common():
        raise PasswordRefused("common_password", "this is one of the most common passwords; "
                              "choose something less predictable")
    words = [w for w in context if len(w) >= 3]
    present = [w for w in words if w in lowered]
    if present:
        rest = lowered
        for w in sorted(present, key=len, reverse=True):
            rest = rest.replace(w, "")
        if len(rest) < min_chars // 2 or _guesses_log10(rest, ()) < _MIN_GUESSES_LOG10:
            raise PasswordRefused("context_specific", "do not build the password on the "
                                  "service's name or your e-mail address")
    if _guesses_log10(pw, words) < _MIN_GUESSES_LOG10:
        raise PasswordRefused("too_guessable", "this password is easy to guess (a common "
                              "word, name, date or keyboard pattern); add a few more words")
    return pw


class PasswordHasher:
    """argon2id hashing of (normalised) passwords."""

    def __init__(self, params: Argon2Params | None = None) -> None:
        p = params or Argon2Params()
        self._ph = argon2.PasswordHasher(time_cost=p.time_cost, memory_cost=p.memory_kib,
                                         parallelism=p.parallelism, type=argon2.Type.ID)
        self._dummy: str | None = None

    def hash(self, password: str) -> str:
        return str(self._ph.hash(normalize_password(password)))

    def verify(self, stored: str, password: str) -> bool:
        """Constant-work check (a wrong password costs as much as a right one)."""
        try:
            return bool(self._ph.verify(stored, normalize_password(password)))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def verify_dummy(self, password: str) -> bool:
        """Spend the same work as :meth:`verify` for an unknown account; always False."""
        if self._dummy is None:
            self._dummy = self.hash("hearth-dummy-password-never-matches")
        self.verify(self._dummy, password + "\x00")
        return False

    def needs_rehash(self, stored: str) -> bool:
        try:
            return bool(self._ph.check_needs_rehash(stored))
        except (InvalidHashError, ValueError):
            return True
