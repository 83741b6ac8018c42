"""Publishing advisories from fixed reports, and finding the advisories of a product.

:func:`publish_advisory` turns a report in state ``fixed`` into a CSAF advisory (validated
against the shipped schema before anything is stored), moves the report to ``disclosed``
and tells the reporter. The stored ``document`` is the exact text served, so its hashes
(``.sha256`` / ``.sha512``) are stable.

:func:`advisories_for_model` is what the web app calls to tell owners of affected units:
the advisories affecting ``model``, optionally only those whose ranges contain the unit's
firmware ``version``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from hearth.errors import NotFoundError
from hearth.service.disclosure import csaf
from hearth.service.disclosure.config import DisclosureConfig
from hearth.service.disclosure.models import Advisory, AdvisoryProduct, Report, ReportState
from hearth.service.disclosure.scoring import score_vector
from hearth.service.disclosure.triage import (
    AffectedRange,
    TriageError,
    parse_version,
    record_event,
    transition,
)

__all__ = [
    "AdvisorySummary",
    "advisories_for_model",
    "advisory_html_path",
    "advisory_json_path",
    "document_of",
    "get_advisory",
    "list_advisories",
    "publish_advisory",
    "publisher_of",
]

_CVE = r"^CVE-[0-9]{4}-[0-9]{4,}$"


def publisher_of(config: DisclosureConfig) -> csaf.Publisher:
    return csaf.Publisher(
        name=config.organisation,
        namespace=config.base_url,
        category=config.csaf_publisher_category,
        contact_details=f"Report vulnerabilities at {config.report_url}",
    )


def advisory_json_path(advisory_id: str, initial_release_date: dt.datetime) -> str:
    return "/.well-known/csaf/white/" + csaf.advisory_path(advisory_id, initial_release_date)


def advisory_html_path(advisory_id: str) -> str:
    return f"/security/advisories/{advisory_id}"


@dataclass(frozen=True)
class AdvisorySummary:
    """What a product page or an owner's device page shows about an advisory."""

    id: str
    title: str
    severity: str
    cvss_score: float
    cvss_version: str
    published: dt.datetime
    updated: dt.datetime
    ranges: tuple[AffectedRange, ...]
    fixing_release: str | None
    html_path: str
    json_path: str


def _summary(adv: Advisory, products: list[AdvisoryProduct]) -> AdvisorySummary:
    return AdvisorySummary(
        id=adv.id, title=adv.title, severity=adv.severity, cvss_score=adv.cvss_score,
        cvss_version=adv.cvss_version, published=adv.initial_release_date,
        updated=adv.current_release_date,
        ranges=tuple(AffectedRange(p.model, p.introduced, p.fixed) for p in products),
        fixing_release=adv.fixing_release, html_path=advisory_html_path(adv.id),
        json_path=advisory_json_path(adv.id, adv.initial_release_date),
    )


def _next_id(session: Session, prefix: str, year: int) -> str:
    stem = f"{prefix}-{year}-"
    existing = session.scalars(sa.select(Advisory.id).where(Advisory.id.like(stem + "%")))
    numbers = [int(i[len(stem):]) for i in existing if i[len(stem):].isdigit()]
    return f"{stem}{max(numbers, default=0) + 1:04d}"


def publish_advisory(
    session: Session,
    report: Report,
    *,
    config: DisclosureConfig,
    models: Mapping[str, str],
    now: dt.datetime,
    actor: str,
    title: str,
    summary: str,
    cve: str | None = None,
) -> Advisory:
    """Publish the advisory for a fixed report; raises :class:`TriageError`. Caller commits."""
    if ReportState(report.state) is not ReportState.FIXED:
        raise TriageError("invalid_transition",
                          "publish an advisory once the report is fixed (state 'fixed')")
    if not report.cvss_vector or not report.affected:
        raise TriageError("assessment_required", "assess severity and affected versions first")
    title = " ".join(title.split())
    summary = summary.strip()
    if not 5 <= len(title) <= 200 or not 20 <= len(summary) <= 10_000:
        raise TriageError("invalid_advisory",
                          "title: 5-200 characters; summary: 20-10000 characters")
    if cve and not re.match(_CVE, cve):
        raise TriageError("invalid_cve", "a CVE id looks like CVE-2025-12345")
    ranges = [AffectedRange(a["model"], a.get("introduced"), a.get("fixed"))
              for a in report.affected]
    advisory_id = _next_id(session, config.advisory_prefix, now.astimezone(dt.UTC).year)
    score = score_vector(report.cvss_vector)
    credit = [report.reporter_name] if report.wants_credit and report.reporter_name else []
    doc = csaf.build_advisory(
        csaf.AdvisoryInput(
            advisory_id=advisory_id, title=title, summary=summary, score=score,
            affected=ranges, models=models, initial_release_date=now,
            current_release_date=now, revision_history=[(1, now, "Initial version.")],
            json_url=config.url(advisory_json_path(advisory_id, now)),
            html_url=config.url(advisory_html_path(advisory_id)),
            policy_url=config.policy_url, fixing_release=report.fixing_release, cve=cve or None,
            credit=credit,
        ),
        publisher=publisher_of(config), vendor=config.organisation,
    )
    problems = csaf.validate_advisory(doc)
    if problems:  # a bug, not bad input: never publish an invalid advisory
        raise TriageError("invalid_csaf", "the advisory does not validate: " + problems[0])
    adv = Advisory(
        id=advisory_id, report_id=report.id, title=title, summary=summary,
        severity=score.severity, cvss_vector=score.vector, cvss_version=score.version,
        cvss_score=score.base_score, cve=cve or None, fixing_release=report.fixing_release,
        initial_release_date=now, current_release_date=now, version=1,
        document=csaf.serialize(doc),
    )
    session.add(adv)
    session.flush()
    for r in ranges:
        session.add(AdvisoryProduct(advisory_id=advisory_id, model=r.model,
                                    introduced=r.introduced, fixed=r.fixed))
    report.advisory_id = advisory_id
    transition(session, report, ReportState.DISCLOSED, actor=actor, now=now,
               _via_advisory=True)
    record_event(session, report, kind="advisory_published", actor=actor, now=now, public=True,
                 body=f"Advisory {advisory_id} is published.",
                 data={"advisory_id": advisory_id})
    session.flush()
    return adv


def get_advisory(session: Session, advisory_id: str) -> Advisory:
    if not isinstance(advisory_id, str) or len(advisory_id) > 32:
        raise NotFoundError("no such advisory")
    adv = session.get(Advisory, advisory_id)
    if adv is None:
        raise NotFoundError("no such advisory")
    return adv


def _products(session: Session, ids: list[str]) -> dict[str, list[AdvisoryProduct]]:
    out: dict[str, list[AdvisoryProduct]] = {i: [] for i in ids}
    if ids:
        q = sa.select(AdvisoryProduct).where(AdvisoryProduct.advisory_id.in_(ids)).order_by(
            AdvisoryProduct.id)
        for p in session.scalars(q):
            out[p.advisory_id].append(p)
    return out


def list_advisories(session: Session) -> list[AdvisorySummary]:
    """All advisories, newest first."""
    advs = list(session.scalars(
        sa.select(Advisory).order_by(Advisory.initial_release_date.desc(), Advisory.id.desc())))
    products = _products(session, [a.id for a in advs])
    return [_summary(a, products[a.id]) for a in advs]


def advisories_for_model(
    session: Session, model: str, version: str | None = None
) -> list[AdvisorySummary]:
    """Advisories affecting ``model`` (newest first); with ``version``, only those whose
    affected ranges contain it. Raises :class:`TriageError` (``invalid_version``)."""
    if version is not None:
        parse_version(version)
    ids = list(session.scalars(
        sa.select(AdvisoryProduct.advisory_id).where(AdvisoryProduct.model == model).distinct()))
    if not ids:
        return []
    advs = list(session.scalars(
        sa.select(Advisory).where(Advisory.id.in_(ids))
        .order_by(Advisory.initial_release_date.desc(), Advisory.id.desc())))
    products = _products(session, ids)
    out = []
    for a in advs:
        mine = [p for p in products[a.id] if p.model == model]
        if version is not None and not any(
            AffectedRange(p.model, p.introduced, p.fixed).contains(version) for p in mine
        ):
            continue
        out.append(_summary(a, mine))
    return out


def document_of(adv: Advisory) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(adv.document)
    return doc
