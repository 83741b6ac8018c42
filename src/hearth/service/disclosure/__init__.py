"""Vulnerability disclosure built in (guideline 2): security.txt, policy, intake, triage,
CSAF advisories, and product pages.

How a report flows::

    researcher ──form / JSON──▶ intake (validate, rate-limit, spam defence)
         │                          │ tracking id + secret status link
         │◀── status page ──────────┤
         │     (public events,      ▼
         │      messages)        triage (security team, operator token):
         │                       received → acknowledged → triaged → fixing → fixed
         │                       → disclosed (or rejected / duplicate); CVSS severity;
         │                       deadlines in working days; append-only audit trail
         ▼                          │
    advisory page, product page ◀── CSAF 2.0 advisory (validated against the shipped
    /.well-known/csaf/...            schema) + provider-metadata.json, index.txt, changes.csv

Example::

    service = DisclosureService(DisclosureConfig.from_env(), session_factory(engine))
    app.include_router(create_router(service))

Modules: :mod:`.config` (settings), :mod:`.security_txt`, :mod:`.intake` (validation),
:mod:`.antiabuse` (rate limit, honeypot, form stamps, proof of work), :mod:`.reports`
(reporter side), :mod:`.triage` (workflow), :mod:`.scoring` (CVSS), :mod:`.csaf`,
:mod:`.advisories`, :mod:`.models` (tables), :mod:`.routes` (HTTP).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hearth.service.disclosure.advisories import AdvisorySummary, advisories_for_model
    from hearth.service.disclosure.config import DisclosureConfig
    from hearth.service.disclosure.routes import create_router
    from hearth.service.disclosure.security_txt import parse_security_txt, render_security_txt
    from hearth.service.disclosure.service import DisclosureService

__all__ = [
    "AdvisorySummary",
    "DisclosureConfig",
    "DisclosureService",
    "advisories_for_model",
    "create_router",
    "parse_security_txt",
    "render_security_txt",
]

# Imported lazily so that importing the table definitions (``.models``, e.g. to register
# them on the service's ``Base``) does not pull in the web stack.
_HOME = {
    "AdvisorySummary": "advisories", "advisories_for_model": "advisories",
    "DisclosureConfig": "config", "create_router": "routes",
    "parse_security_txt": "security_txt", "render_security_txt": "security_txt",
    "DisclosureService": "service",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
