"""Accounts, sign-in and claiming units (guidelines 1, 4, 11 and 12).

::

    consumer ──sign-up / sign-in (argon2id, NIST SP 800-63B policy, throttled)──▶ session
       │          (server-side id, SHA-256 in the DB, Secure HttpOnly SameSite cookie)
       │                                   operators / security team: + TOTP, every time
       ├──claim: device ID + setup code, or a photo of the label's QR code──▶ owner binding
       │      (throttled per unit, account, address; one argon2id check; same answer for a
       │       wrong code and an unknown unit)            │ bind_owner over MQTT
       │                                                  ▼
       ├──my devices (live state, advisories), commands ──▶ unit (stores a hash of the
       │                                                   owner's local-access credential)
       └──release / factory reset ──▶ binding ends at once; unbind_owner / factory_reset
                                      is sent until the unit confirms; a reset the unit
                                      reports (event ``factory_reset``) also ends it

Modules: :mod:`.config` (limits), :mod:`.models` (tables), :mod:`.passwords`,
:mod:`.sessions`, :mod:`.totp`, :mod:`.throttle`, :mod:`.claims` (ownership),
:mod:`.service` (:class:`AccountsService`), :mod:`.routes` (HTTP), :mod:`.admin` (CLI).

Example::

    accounts = AccountsService(AccountsConfig(base_url=..., secret_key=...), sessions,
                               commands=CommandService(publisher))
    web = create_web_app(create_router(accounts))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hearth.service.accounts.claims import ClaimRefused, ClaimResult, Ownership
    from hearth.service.accounts.config import AccountsConfig, ThrottlePolicy
    from hearth.service.accounts.models import Role
    from hearth.service.accounts.passwords import PasswordRefused, check_password
    from hearth.service.accounts.routes import create_router
    from hearth.service.accounts.service import AccountsService, SignInFailed, create_account
    from hearth.service.accounts.throttle import Throttled

__all__ = [
    "AccountsConfig",
    "AccountsService",
    "ClaimRefused",
    "ClaimResult",
    "Ownership",
    "PasswordRefused",
    "Role",
    "SignInFailed",
    "ThrottlePolicy",
    "Throttled",
    "check_password",
    "create_account",
    "create_router",
]

# Imported lazily so that importing the table definitions (``.models``, registered on the
# service's ``Base`` by ``models.all_metadata()``) does not pull in the web stack.
_MODULES = {
    "config": ("AccountsConfig", "ThrottlePolicy"),
    "service": ("AccountsService", "SignInFailed", "create_account"),
    "claims": ("ClaimRefused", "ClaimResult", "Ownership"),
    "passwords": ("PasswordRefused", "check_password"),
    "models": ("Role",),
    "routes": ("create_router",),
    "throttle": ("Throttled",),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
