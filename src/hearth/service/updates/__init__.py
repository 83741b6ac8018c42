"""Signed updates in the service (guidelines 3 and 7): serving the TUF repository to units
with short-lived tokens, rollouts in cohorts, support periods and integrity alerts.

How an update reaches a unit::

    hearth release publish ──▶ DATA/updates (TUF repository, hearth.updates.repository)
                                   │ served at /updates/metadata/, /updates/targets/
    operator: POST /api/v1/rollouts (stages 1,10,50,100 %, failure threshold)
                                   │
    unit ──update/check (MQTT)──▶ responder: unit active? in the cohort? owner's window?
         ◀─update/offer───────── token (HMAC, 10 min, this unit, updates:read) + release
    unit ──GET /updates/... Bearer token──▶ metadata, bundle (ranges: resumable)
    unit ──events update_installed/failed/rolled_back, integrity_alert──▶ ingest ──▶ events
                                   │
    monitor: events ──▶ rollout outcomes (halt above the threshold), alerts, unit state

Modules: :mod:`.models` (tables), :mod:`.tokens` (update tokens), :mod:`.files` (the
repository routes), :mod:`.rollouts` (releases, cohorts, outcomes, preferences, support
periods, alerts), :mod:`.responder` (the MQTT side), :mod:`.service` (the running parts),
:mod:`.api` (operator API), :mod:`.web` (operator page, support on product pages, the
consumer's view).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hearth.service.updates.service import UpdateService

__all__ = ["UpdateService"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the tables (``.models``) does not pull in the web stack.
    if name == "UpdateService":
        return importlib.import_module(f"{__name__}.service").UpdateService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
