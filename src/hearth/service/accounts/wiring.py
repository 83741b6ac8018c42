"""Building the accounts capability for ``hearth up`` (see :mod:`hearth.service.runner`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path

from fastapi import APIRouter
from sqlalchemy.orm import Session, sessionmaker

from hearth._fsutil import write_secret
from hearth.service.accounts.config import AccountsConfig
from hearth.service.accounts.routes import create_router
from hearth.service.accounts.service import AccountsService
from hearth.service.commands import CommandPublisher, CommandService
from hearth.service.config import Settings

__all__ = ["AccountsService", "accounts_router", "build_accounts", "secret_from_text",
           "service_secret"]

SECRET_FILE = Path("secrets") / "web-signing.key"


def secret_from_text(text: str) -> bytes:
    """The service secret as bytes: hex if it is hex, else the UTF-8 text."""
    text = text.strip()
    try:
        return bytes.fromhex(text)
    except ValueError:
        return text.encode()


def service_secret(settings: Settings) -> bytes:
    """``HEARTH_SECRET_KEY``, or the random key kept (0600) in ``DATA/secrets`` - the same
    one the runner uses for the web app; created on first use. Never in the database."""
    if settings.extra.get("HEARTH_SECRET_KEY"):
        return secret_from_text(settings.extra["HEARTH_SECRET_KEY"])
    import secrets

    path = settings.data_dir / SECRET_FILE
    if not path.exists():
        write_secret(path, secrets.token_hex(32).encode())
    return secret_from_text(path.read_text())


def build_accounts(settings: Settings, env: Mapping[str, str],
                   sessions: sessionmaker[Session],
                   publisher: CommandPublisher | None) -> AccountsService:
    """The accounts service for the runner's web app (``env`` holds ``HEARTH_BASE_URL``
    and ``HEARTH_SECRET_KEY`` as the runner resolved them)."""
    secret = secret_from_text(env["HEARTH_SECRET_KEY"]) if env.get(
        "HEARTH_SECRET_KEY") else service_secret(settings)
    config = AccountsConfig.from_env(env, secret_key=secret,
                                     site_name=env.get("HEARTH_SITE_NAME", "Hearth"))
    commands = CommandService(
        publisher, max_ttl=dt.timedelta(seconds=max(settings.command_max_ttl_seconds, 3600))
    ) if publisher is not None else None
    return AccountsService(config, sessions, commands=commands)


def accounts_router(service: AccountsService) -> APIRouter:
    return create_router(service)
