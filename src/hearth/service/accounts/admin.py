"""``hearth admin create``: the first operator (or security-team) account, never a default.

The CLI parses arguments and calls :func:`create_admin`; the password comes from a file
(``--password-file``; it must meet the password policy) or is generated (24 random
URL-safe characters, ~144 bits) and printed once. With ``--totp-now`` the TOTP secret is
made at once and its ``otpauth://`` URI printed once; otherwise the account must enrol its
authenticator at its first sign-in, before it can do anything else.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from hearth.errors import ConfigError, ValidationError
from hearth.service.accounts.config import Argon2Params
from hearth.service.accounts.models import Role
from hearth.service.accounts.passwords import PasswordHasher
from hearth.service.accounts.service import create_account
from hearth.service.accounts.totp import SecretBox, derive_key, new_totp_secret, provisioning_uri
from hearth.service.db import utcnow

__all__ = ["AdminCreated", "create_admin", "read_password_file"]

MAX_PASSWORD_FILE = 4096


@dataclass(frozen=True)
class AdminCreated:
    account_id: str
    email: str
    role: Role
    generated_password: str | None
    totp_uri: str | None


def read_password_file(path: Path) -> str:
    """The password in ``path`` (one line; a trailing newline is not part of it)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the password file: {e.strerror}") from e
    if len(raw) > MAX_PASSWORD_FILE:
        raise ValidationError("too_long", "the password file is too large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("wrong_type", "the password file must be UTF-8 text") from None
    return text.rstrip("\r\n")


def create_admin(session: Session, *, email: str, role: Role, password: str | None,
                 secret_key: bytes, site_name: str = "Hearth", totp_now: bool = False,
                 now: dt.datetime | None = None) -> AdminCreated:
    """Create an operator or security-team account (the caller commits)."""
    if role not in (Role.OPERATOR, Role.SECURITY):
        raise ValidationError("invalid_role", "admin accounts are operator or security")
    account, generated = create_account(session, email=email, password=password, role=role,
                                        hasher=PasswordHasher(Argon2Params()),
                                        site_name=site_name, now=now or utcnow())
    uri: str | None = None
    if totp_now:
        secret = new_totp_secret()
        box = SecretBox(derive_key(secret_key, "hearth accounts totp v1"))
        account.totp_secret_enc = box.seal(secret, aad=account.id)
        account.totp_enrolled_at = now or utcnow()
        uri = provisioning_uri(secret, account=account.email, issuer=site_name)
    session.flush()
    return AdminCreated(account.id, account.email, role, generated, uri)
