"""NIST SP 800-63B password policy: length, any characters, no composition rules, common
and context-specific passwords refused; argon2id hashes."""

from __future__ import annotations

import hashlib

import pytest

from hearth.service.accounts.config import Argon2Params
from hearth.service.accounts.passwords import (
    PasswordHasher,
    PasswordRefused,
    check_password,
    context_words,
)

CTX = context_words(email="alice.smith@example.org", site_name="Hearth")


@pytest.mark.parametrize("password", [
    "correct horse battery staple",          # a passphrase of lower-case words, no digits
    "Tr0ub4dour&3 is not my password",
    "ünïcødé pässwörd ☃ fünf",               # any Unicode
    "日本語のパスワードはとても長い",            # no Latin letters at all
    "spaces   are   fine   here",
    "x7$Kq!m2",                              # 8 characters is enough when not guessable
    "w" + "q8Zr" * 16,                       # 65 characters: at least 64 allowed
    "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(12)),  # 768 chars
])
def test_good_passwords_are_accepted_without_composition_rules(password: str) -> None:
    assert check_password(password, context=CTX)


@pytest.mark.parametrize(("password", "reason"), [
    ("", "too_short"),
    ("short", "too_short"),
    ("7chars!", "too_short"),
    ("x" * 1025, "too_long"),
    ("password", "common_password"),
    ("PASSWORD", "common_password"),           # case does not help
    ("12345678", "common_password"),
    ("qwertyuiop", "common_password"),
    ("iloveyou", "common_password"),
    ("aaaaaaaaaaaa", "too_guessable"),         # repeats
    ("abcdefghijkl", "too_guessable"),         # sequences
    ("hearth2026!", "context_specific"),       # the service's name
    ("Hearth-Hearth", "context_specific"),
    ("alicesmith99", "context_specific"),      # the user's e-mail address
    ("alice.smith@example", "context_specific"),
])
def test_weak_passwords_are_refused_with_a_reason(password: str, reason: str) -> None:
    with pytest.raises(PasswordRefused) as e:
        check_password(password, context=CTX)
    assert e.value.reason == reason
    assert len(password) < 10 or password not in e.value.detail  # never echoed back


def test_unicode_is_normalised_so_the_same_password_matches() -> None:
    hasher = PasswordHasher(Argon2Params())
    composed = "caf\u00e9 au lait sans sucre"
    decomposed = "cafe\u0301 au lait sans sucre"
    assert composed != decomposed
    stored = hasher.hash(composed)
    assert hasher.verify(stored, decomposed)


def test_hashes_are_argon2id_and_salted() -> None:
    hasher = PasswordHasher(Argon2Params())
    a, b = hasher.hash("correct horse battery staple"), hasher.hash(
        "correct horse battery staple")
    assert a.startswith("$argon2id$") and a != b
    assert "m=19456,t=2,p=1" in a
    assert hasher.verify(a, "correct horse battery staple")
    assert not hasher.verify(a, "correct horse battery stapler")
    assert not hasher.verify("not a hash", "x")
    assert not hasher.verify_dummy("correct horse battery staple")


def test_no_expiry_or_composition_settings_exist() -> None:
    from dataclasses import fields

    from hearth.service.accounts.config import AccountsConfig

    names = {f.name for f in fields(AccountsConfig)}
    assert not {n for n in names if "expir" in n or "require_digit" in n or "rotate" in n}
