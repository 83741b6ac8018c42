"""The disclosure capability's runtime object: configuration, clock, database and defences.

:class:`DisclosureService` is built once at start and handed to
:func:`hearth.service.disclosure.routes.create_router`. Tests build it with a frozen
``clock`` to move time (deadlines, security.txt renewal, form timestamps, rate limits).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth.protocol import MODELS
from hearth.service import auth
from hearth.service.disclosure.antiabuse import FormStamp, ProofOfWork, TokenBucketLimiter
from hearth.service.disclosure.config import DisclosureConfig
from hearth.service.disclosure.deadlines import WorkCalendar, utc_now
from hearth.service.disclosure.intake import RejectionCounter
from hearth.service.models import ApiToken
from hearth.service.web import CsrfProtection, Signer, Templates

__all__ = ["TRIAGE_PERMISSION", "DisclosureService", "default_models", "may_triage"]

TRIAGE_PERMISSION: str | None = getattr(auth.Permission, "DISCLOSURE_TRIAGE", None)
"""``disclosure:triage`` once :class:`hearth.service.auth.Permission` defines it. Until then
only an operator token holding *every* permission may triage (fail closed)."""

NAV_LINKS = (
    ("/security/policy", "Disclosure policy"),
    ("/security/report", "Report a vulnerability"),
    ("/security/advisories", "Advisories"),
    ("/products", "Products"),
)


def may_triage(permissions: set[str] | frozenset[str]) -> bool:
    """Whether a token with ``permissions`` may use the triage views and API."""
    if TRIAGE_PERMISSION is not None:
        return str(TRIAGE_PERMISSION) in permissions
    return {p.value for p in auth.ALL_PERMISSIONS} <= set(permissions)


def default_models() -> dict[str, str]:
    """Model key -> display name, from the protocol's model specs."""
    return {name: name.replace("_", " ").capitalize() for name in MODELS}


class DisclosureService:
    """Everything the disclosure routes need, built once at start."""

    def __init__(
        self,
        config: DisclosureConfig,
        sessions: sessionmaker[Session],
        *,
        clock: Callable[[], dt.datetime] = utc_now,
        models: Mapping[str, str] | None = None,
        model_descriptions: Mapping[str, str] | None = None,
        support_period: Callable[[str], Any] | None = None,
        team_session: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.config = config
        self.team_session = team_session
        """``request -> actor | None``: a signed-in security-team account (accounts
        capability, TOTP included). When set, it replaces pasting an operator token into
        the triage sign-in page; the JSON triage API keeps using tokens."""
        self.support_period = support_period
        """``model -> Markup | None``: the product page's support-period section (filled in
        by the updates capability, :func:`hearth.service.updates.web.support_period_provider`)."""
        self.sessions = sessions
        self.clock = clock
        self.models: dict[str, str] = dict(models or default_models())
        self.model_descriptions: dict[str, str] = dict(
            model_descriptions or {n: m.description for n, m in MODELS.items()}
        )
        self.calendar = WorkCalendar.of(config.tz, config.working_weekdays, config.holidays)
        self.signer = Signer(config.secret_key)
        self.rejections = RejectionCounter()
        r = config.rates
        self.report_limiter = TokenBucketLimiter(
            burst=r.report_burst, every_seconds=r.report_every_seconds, clock=clock,
            max_keys=r.max_tracked_addresses)
        self.message_limiter = TokenBucketLimiter(
            burst=r.message_burst, every_seconds=r.message_every_seconds, clock=clock,
            max_keys=r.max_tracked_addresses)
        self.login_limiter = TokenBucketLimiter(
            burst=r.message_burst, every_seconds=r.message_every_seconds, clock=clock,
            max_keys=r.max_tracked_addresses)
        self.form_stamp = FormStamp(self.signer, min_seconds=config.spam.form_min_seconds,
                                    max_age_seconds=config.spam.form_max_age_seconds)
        self.pow = ProofOfWork(self.signer, difficulty=config.spam.pow_difficulty_bits,
                               ttl_seconds=config.spam.challenge_ttl_seconds)
        self.csrf = CsrfProtection(self.signer, allowed_origins={config.base_url},
                                   secure=config.secure_cookies)
        self.templates = Templates(
            "hearth.service.disclosure", csrf=self.csrf, site_name=config.organisation,
            hsts=config.secure_cookies,
            globals={"nav_links": NAV_LINKS, "org": config.organisation},
        )

    def now(self) -> dt.datetime:
        t = self.clock()
        if t.tzinfo is None:
            raise ValueError("the clock must return aware UTC datetimes")
        return t.astimezone(dt.UTC)

    def token_may_triage(self, session: Session, token_id: str) -> str | None:
        """The token's name if token ``token_id`` exists, is not revoked and may triage."""
        row = session.scalar(sa.select(ApiToken).where(ApiToken.id == token_id))
        if row is None or row.revoked_at is not None or not may_triage(set(row.permissions)):
            return None
        return row.name
