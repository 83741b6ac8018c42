"""Operator tokens: random, hashed at rest, revocable, no default credentials."""

from __future__ import annotations

import hashlib

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth.errors import NotFoundError, ValidationError
from hearth.service import auth
from hearth.service.auth import Permission
from hearth.service.models import ApiToken


def _create(sf: sessionmaker[Session], name: str = "ops", **kw: object) -> str:
    with sf.begin() as s:
        return auth.create_token(s, name, **kw)  # type: ignore[arg-type]


def _verify(sf: sessionmaker[Session], token: str) -> auth.Principal | None:
    with sf() as s:
        return auth.verify_token(s, token)


def test_token_is_random_and_only_its_hash_is_stored(sf: sessionmaker[Session]) -> None:
    token = _create(sf)
    other = _create(sf)
    assert token != other
    assert token.startswith("hth_") and len(token) == 4 + 16 + 1 + 43
    secret = token.split(".", 1)[1]
    with sf() as s:
        rows = list(s.scalars(sa.select(ApiToken)))
    stored = repr([(r.id, r.name, r.token_hash, r.permissions) for r in rows])
    assert secret not in stored
    assert hashlib.sha256(secret.encode()).hexdigest() in stored


def test_valid_token_authenticates_with_its_permissions(sf: sessionmaker[Session]) -> None:
    token = _create(sf, "reader", permissions=[Permission.FLEET_READ])
    principal = _verify(sf, token)
    assert principal is not None and principal.name == "reader"
    assert principal.may(Permission.FLEET_READ)
    assert not principal.may(Permission.COMMANDS_SEND)


def test_wrong_secret_for_a_real_id_is_refused(sf: sessionmaker[Session]) -> None:
    token = _create(sf)
    prefix, secret = token.split(".", 1)
    flipped = ("A" if secret[0] != "A" else "B") + secret[1:]
    assert _verify(sf, f"{prefix}.{flipped}") is None


def test_a_real_token_with_anything_after_it_is_refused(sf: sessionmaker[Session]) -> None:
    """The whole header value is the token: a trailing newline (which a regex's ``$``
    lets through) or space is not ignored."""
    token = _create(sf)
    assert _verify(sf, token) is not None
    for suffix in ("\n", " ", "x"):
        assert _verify(sf, token + suffix) is None


@pytest.mark.parametrize("token", ["", "hth_", "Bearer x", "hth_" + "0" * 16 + "." + "a" * 43,
                                   "x" * 10_000, "hth_zzzzzzzzzzzzzzzz." + "a" * 43])
def test_malformed_or_unknown_token_is_refused(sf: sessionmaker[Session], token: str) -> None:
    _create(sf)
    assert _verify(sf, token) is None


def test_revoked_token_is_refused(sf: sessionmaker[Session]) -> None:
    token = _create(sf)
    token_id = token[4:20]
    with sf.begin() as s:
        auth.revoke_token(s, token_id)
        auth.revoke_token(s, token_id)  # idempotent
    assert _verify(sf, token) is None
    with sf.begin() as s, pytest.raises(NotFoundError):
        auth.revoke_token(s, "f" * 16)


def test_first_token_only_on_first_start(sf: sessionmaker[Session]) -> None:
    with sf.begin() as s:
        first = auth.ensure_first_token(s)
    assert first is not None
    principal = _verify(sf, first)
    assert principal is not None and principal.permissions == auth.ALL_PERMISSIONS
    with sf.begin() as s:
        assert auth.ensure_first_token(s) is None
        auth.revoke_token(s, first[4:20])
    with sf.begin() as s:  # revoking every token does not mint a new default one
        assert auth.ensure_first_token(s) is None
        assert [t.name for t in auth.list_tokens(s)] == ["operator"]


@pytest.mark.parametrize("name", ["", " lead", "x" * 65, "a\nb", "<script>"])
def test_token_name_is_validated(sf: sessionmaker[Session], name: str) -> None:
    with pytest.raises(ValidationError):
        _create(sf, name)


def test_token_needs_a_permission(sf: sessionmaker[Session]) -> None:
    with pytest.raises(ValidationError):
        _create(sf, permissions=[])
