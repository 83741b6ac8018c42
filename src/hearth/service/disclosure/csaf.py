"""CSAF 2.0 advisories (profile ``csaf_security_advisory``) and their distribution files.

Pure functions: they take values and return JSON-ready dicts or text, and validate them.

* :func:`build_advisory` - one advisory document. The product tree is
  vendor → model → ``product_version_range`` (a ``vers:generic/...`` range per affected
  range) and ``product_version`` (the fixed release); ``product_status`` lists the ranges as
  ``known_affected`` and the fixed releases as ``fixed``. A CVSS v3.1 score goes in
  ``scores[].cvss_v3`` (FIRST's schema). CSAF 2.0 has no CVSS v4 object, so a v4.0 vector is
  carried in an ``impact`` threat and a note, and drives ``aggregate_severity``.
* :func:`provider_metadata` - ``/.well-known/csaf/provider-metadata.json``
  (role ``csaf_provider``, directory distribution).
* :func:`advisory_filename`, :func:`index_txt`, :func:`changes_csv` - the directory
  layout of CSAF section 7.1 (requirements 11-13): ``<tlp>/<year>/<id>.json``.
* :func:`validate_advisory`, :func:`validate_provider_metadata` - JSON-schema validation
  against the official schemas shipped in ``schemas/`` (nothing fetched: a local
  ``referencing`` registry resolves every ``$ref``), plus a subset of CSAF's mandatory
  tests (section 6.1) that a schema cannot express.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import referencing
from referencing.jsonschema import DRAFT7, DRAFT202012

from hearth import __version__
from hearth.errors import ValidationError
from hearth.service.disclosure.scoring import CvssScore, score_vector
from hearth.service.disclosure.triage import AffectedRange

__all__ = [
    "CSAF_SCHEMA_ID",
    "PROVIDER_SCHEMA_ID",
    "AdvisoryInput",
    "Publisher",
    "advisory_filename",
    "advisory_path",
    "build_advisory",
    "changes_csv",
    "csaf_time",
    "index_txt",
    "provider_metadata",
    "serialize",
    "validate_advisory",
    "validate_provider_metadata",
]

CSAF_SCHEMA_ID = "https://docs.oasis-open.org/csaf/csaf/v2.0/csaf_json_schema.json"
PROVIDER_SCHEMA_ID = "https://docs.oasis-open.org/csaf/csaf/v2.0/provider_json_schema.json"
_CVSS_IDS = {
    "cvss-v2.0.json": "https://www.first.org/cvss/cvss-v2.0.json",
    "cvss-v3.0.json": "https://www.first.org/cvss/cvss-v3.0.json",
    "cvss-v3.1.json": "https://www.first.org/cvss/cvss-v3.1.json",
}
TLP_URL = "https://www.first.org/tlp/"


def csaf_time(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class Publisher:
    name: str
    namespace: str
    category: str = "vendor"
    contact_details: str = ""

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "category": self.category, "name": self.name, "namespace": self.namespace,
        }
        if self.contact_details:
            d["contact_details"] = self.contact_details
        return d


@dataclass(frozen=True)
class AdvisoryInput:
    """Everything an advisory says. ``models`` maps model key -> product display name."""

    advisory_id: str
    title: str
    summary: str
    score: CvssScore
    affected: Sequence[AffectedRange]
    models: Mapping[str, str]
    initial_release_date: dt.datetime
    current_release_date: dt.datetime
    revision_history: Sequence[tuple[int, dt.datetime, str]]
    json_url: str
    html_url: str
    policy_url: str
    fixing_release: str | None = None
    cve: str | None = None
    credit: Sequence[str] = ()


def advisory_filename(advisory_id: str) -> str:
    """CSAF 5.1: lower-case id, every character outside ``[+\\-a-z0-9]`` -> ``_``, ``.json``."""
    return re.sub(r"[^+\-a-z0-9]", "_", advisory_id.lower()) + ".json"


def advisory_path(advisory_id: str, initial_release_date: dt.datetime) -> str:
    """``<year>/<filename>``, relative to the TLP directory (requirement 11)."""
    return f"{initial_release_date.astimezone(dt.UTC).year}/{advisory_filename(advisory_id)}"


def build_advisory(a: AdvisoryInput, *, publisher: Publisher, vendor: str) -> dict[str, Any]:
    """The CSAF document of ``a``. Raises ``ValueError`` if it has no affected range."""
    if not a.affected:
        raise ValueError("an advisory needs at least one affected product range")
    product_ids: dict[tuple[str, str], str] = {}
    model_branches: list[dict[str, Any]] = []
    affected_ids: list[str] = []
    fixed_ids: list[str] = []
    fixed_ranges: list[str] = []
    for model in sorted({r.model for r in a.affected}):
        product = a.models.get(model, model)
        leaves: list[dict[str, Any]] = []
        for r in (r for r in a.affected if r.model == model):
            key = ("range", f"{model}|{r.vers()}")
            if key not in product_ids:
                pid = product_ids[key] = f"CSAFPID-{len(product_ids) + 1:04d}"
                affected_ids.append(pid)
                if r.fixed:
                    fixed_ranges.append(pid)
                leaves.append({
                    "category": "product_version_range",
                    "name": r.vers(),
                    "product": {"name": f"{vendor} {product} firmware {r.vers()}",
                                "product_id": pid},
                })
            if r.fixed:
                key = ("fixed", f"{model}|{r.fixed}")
                if key not in product_ids:
                    pid = product_ids[key] = f"CSAFPID-{len(product_ids) + 1:04d}"
                    fixed_ids.append(pid)
                    leaves.append({
                        "category": "product_version",
                        "name": r.fixed,
                        "product": {"name": f"{vendor} {product} firmware {r.fixed}",
                                    "product_id": pid},
                    })
        model_branches.append({"category": "product_name", "name": product, "branches": leaves})

    score = a.score
    severity_text = score.severity.capitalize()
    cvss_text = (f"CVSS v{score.version} base score {score.base_score} ({severity_text}): "
                 f"{score.vector}")
    vuln: dict[str, Any] = {
        "title": a.title,
        "notes": [
            {"category": "description", "title": "Vulnerability description", "text": a.summary},
            {"category": "other", "title": "Severity", "text": cvss_text},
        ],
        "product_status": {"known_affected": affected_ids},
        "remediations": [],
        "threats": [{"category": "impact", "details": cvss_text, "product_ids": affected_ids}],
    }
    if fixed_ids:
        vuln["product_status"]["fixed"] = fixed_ids
    if a.cve:
        vuln["cve"] = a.cve
    unfixed = [pid for pid in affected_ids if pid not in fixed_ranges]
    if fixed_ranges:
        release = a.fixing_release or "the fixed release"
        vuln["remediations"].append({
            "category": "vendor_fix",
            "details": (f"Update the device firmware to {release} or later. Devices that "
                        "install updates automatically receive it without action."),
            "product_ids": fixed_ranges,
        })
    if unfixed:
        vuln["remediations"].append({
            "category": "none_available",
            "details": "No fixed firmware is available yet; this advisory will be updated.",
            "product_ids": unfixed,
        })
    if score.version == "3.1":
        vuln["scores"] = [{"cvss_v3": score.csaf_cvss_v3(), "products": affected_ids}]
    if a.credit:
        vuln["acknowledgments"] = [{"names": list(a.credit),
                                    "summary": "reported this vulnerability"}]

    return {
        "document": {
            "category": "csaf_security_advisory",
            "csaf_version": "2.0",
            "title": a.title,
            "lang": "en",
            "publisher": publisher.as_dict(),
            "distribution": {
                "text": "Public. Distribute freely.",
                "tlp": {"label": "WHITE", "url": TLP_URL},
            },
            "aggregate_severity": {"text": severity_text},
            "notes": [
                {"category": "summary", "title": "Summary", "text": a.summary},
                {"category": "general", "title": "Coordinated disclosure",
                 "text": ("This advisory is published under our vulnerability disclosure "
                          f"policy: {a.policy_url}")},
            ],
            "references": [
                {"category": "self", "summary": "This advisory (CSAF)", "url": a.json_url},
                {"category": "self", "summary": "This advisory (web page)", "url": a.html_url},
                {"category": "external", "summary": "Vulnerability disclosure policy",
                 "url": a.policy_url},
            ],
            "tracking": {
                "id": a.advisory_id,
                "status": "final",
                "version": str(a.revision_history[-1][0]) if a.revision_history else "1",
                "initial_release_date": csaf_time(a.initial_release_date),
                "current_release_date": csaf_time(a.current_release_date),
                "revision_history": [
                    {"number": str(n), "date": csaf_time(d), "summary": s}
                    for n, d, s in a.revision_history
                ],
                "generator": {
                    "engine": {"name": "Hearth", "version": __version__},
                    "date": csaf_time(a.current_release_date),
                },
            },
        },
        "product_tree": {
            "branches": [{"category": "vendor", "name": vendor, "branches": model_branches}]
        },
        "vulnerabilities": [vuln],
    }


def provider_metadata(
    *, publisher: Publisher, canonical_url: str, directory_url: str, last_updated: dt.datetime,
    list_on_aggregators: bool, mirror_on_aggregators: bool,
) -> dict[str, Any]:
    return {
        "canonical_url": canonical_url,
        "distributions": [{"directory_url": directory_url}],
        "last_updated": csaf_time(last_updated),
        "list_on_CSAF_aggregators": list_on_aggregators,
        "metadata_version": "2.0",
        "mirror_on_CSAF_aggregators": mirror_on_aggregators,
        "publisher": publisher.as_dict(),
        "role": "csaf_provider",
    }


def serialize(doc: Mapping[str, Any]) -> str:
    """The exact bytes served (and hashed): stable key order, UTF-8, trailing newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def index_txt(paths: Sequence[str]) -> str:
    """``index.txt`` (requirement 12): one path per line, relative to the TLP directory."""
    return "".join(f"{p}\n" for p in sorted(paths))


def changes_csv(entries: Sequence[tuple[str, dt.datetime]]) -> str:
    """``changes.csv`` (requirement 13): ``"path","time"`` newest first."""
    rows = sorted(entries, key=lambda e: e[1], reverse=True)
    return "".join(f'"{p}","{csaf_time(t)}"\n' for p, t in rows)


# --- validation ---------------------------------------------------------------------------
@functools.cache
def _registry() -> referencing.Registry[Any]:
    root = resources.files("hearth.service.disclosure") / "schemas"
    pairs: list[tuple[str, referencing.Resource[Any]]] = []
    for name, uri in _CVSS_IDS.items():
        contents = json.loads((root / name).read_text(encoding="utf-8"))
        res = referencing.Resource.from_contents(contents, default_specification=DRAFT7)
        pairs.append((uri, res))
        pairs.append((contents.get("$id", uri), res))
    for name in ("csaf_json_schema.json", "provider_json_schema.json"):
        contents = json.loads((root / name).read_text(encoding="utf-8"))
        pairs.append((contents["$id"], referencing.Resource.from_contents(
            contents, default_specification=DRAFT202012)))
    return referencing.Registry().with_resources(pairs).crawl()


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$",
                        value):
            return False
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return True

    @checker.checks("uri")
    def _uri(value: object) -> bool:
        if not isinstance(value, str):
            return True
        parts = urlsplit(value)
        return bool(parts.scheme) and (bool(parts.netloc) or parts.scheme in ("mailto", "urn"))

    return checker


@functools.cache
def _validator(schema_id: str) -> jsonschema.Draft202012Validator:
    schema = _registry().contents(schema_id)
    return jsonschema.Draft202012Validator(
        schema, registry=_registry(), format_checker=_format_checker()
    )


def _schema_errors(schema_id: str, doc: Any) -> list[str]:
    errors = sorted(_validator(schema_id).iter_errors(doc), key=lambda e: list(e.path))
    return [f"/{'/'.join(str(p) for p in e.path)}: {e.message[:200]}" for e in errors]


def validate_provider_metadata(doc: Mapping[str, Any]) -> list[str]:
    """Schema errors of a provider-metadata.json (empty when valid)."""
    return _schema_errors(PROVIDER_SCHEMA_ID, doc)


def validate_advisory(doc: Mapping[str, Any]) -> list[str]:
    """Schema errors plus mandatory-test failures of a CSAF advisory (empty when valid)."""
    errors = _schema_errors(CSAF_SCHEMA_ID, doc)
    if errors:
        return errors
    return _mandatory_tests(doc)


def _mandatory_tests(doc: Mapping[str, Any]) -> list[str]:
    """A subset of CSAF 2.0 section 6.1 mandatory tests."""
    out: list[str] = []
    document = doc["document"]
    # 6.1.27.x: the security-advisory profile needs a product tree and vulnerabilities,
    # each with notes and a product status.
    if document["category"] == "csaf_security_advisory":
        if "product_tree" not in doc:
            out.append("6.1.27.4: product_tree missing")
        vulns = doc.get("vulnerabilities") or []
        if not vulns:
            out.append("6.1.27.3: vulnerabilities missing")
        for i, v in enumerate(vulns):
            if not v.get("notes"):
                out.append(f"6.1.27.5: /vulnerabilities/{i}/notes missing")
            if not v.get("product_status"):
                out.append(f"6.1.27.6: /vulnerabilities/{i}/product_status missing")
    # 6.1.1 / 6.1.2: every product id used is defined, and defined once.
    defined: list[str] = []

    def walk(branches: Sequence[Mapping[str, Any]]) -> None:
        for b in branches:
            if "product" in b:
                defined.append(b["product"]["product_id"])
            walk(b.get("branches", []))

    tree = doc.get("product_tree", {})
    walk(tree.get("branches", []))
    defined += [p["product_id"] for p in tree.get("full_product_names", [])]
    dupes = {p for p in defined if defined.count(p) > 1}
    out += [f"6.1.2: product id {p} defined more than once" for p in sorted(dupes)]
    used: set[str] = set()
    for v in doc.get("vulnerabilities", []):
        for ids in v.get("product_status", {}).values():
            used.update(ids)
        for part in ("remediations", "threats"):
            for item in v.get(part, []):
                used.update(item.get("product_ids", []))
        for s in v.get("scores", []):
            used.update(s["products"])
            # 6.1.8-6.1.10: the CVSS object agrees with its vector and computed score.
            cvss3 = s.get("cvss_v3")
            if cvss3:
                try:
                    computed = score_vector(cvss3["vectorString"])
                except ValidationError as e:
                    out.append(f"6.1.8: invalid CVSS vector: {e}")
                    continue
                if computed.base_score != cvss3["baseScore"] or (
                    computed.severity.upper() != cvss3["baseSeverity"]
                ):
                    out.append("6.1.9: CVSS base score or severity does not match its vector")
    out += [f"6.1.1: product id {p} used but not defined" for p in sorted(used - set(defined))]
    # 6.1.14 / 6.1.16 / 6.1.21: revision history sorted, complete, and matching version.
    tracking = document["tracking"]
    numbers = [int(r["number"]) for r in tracking["revision_history"]
               if r["number"].isdigit()]
    if numbers != list(range(1, len(tracking["revision_history"]) + 1)):
        out.append("6.1.21: revision history numbers must be 1..n without gaps")
    dates = [r["date"] for r in tracking["revision_history"]]
    if dates != sorted(dates):
        out.append("6.1.14: revision history is not sorted by date")
    if numbers and str(numbers[-1]) != tracking["version"]:
        out.append("6.1.16: tracking.version is not the latest revision number")
    if tracking["status"] == "final" and tracking["version"] == "0":
        out.append("6.1.17: a final document cannot have version 0")
    return out
