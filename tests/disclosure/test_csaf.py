"""CSAF 2.0: advisories and provider metadata validate against the official schemas shipped
in the package; distribution files follow the directory rules; owners can find advisories."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.disclosure import csaf
from hearth.service.disclosure.advisories import advisories_for_model
from hearth.service.disclosure.scoring import score_vector
from hearth.service.disclosure.triage import AffectedRange, TriageError

from .conftest import BASE, FrozenClock, team_login
from .test_triage import api, new_report

T0 = dt.datetime(2026, 4, 1, 12, 0, tzinfo=dt.UTC)
PUB = csaf.Publisher(name="Example Devices Ltd", namespace=BASE)
MODELS = {"lock": "Lock", "thermostat": "Thermostat"}


def advisory(vector: str, affected: list[AffectedRange], **kw: Any) -> dict[str, Any]:
    history = kw.pop("history", [(1, T0, "Initial version.")])
    return csaf.build_advisory(csaf.AdvisoryInput(
        advisory_id=kw.pop("advisory_id", "HSA-2026-0001"), title="Replay of unlock commands",
        summary="An attacker in radio range can replay a captured unlock command.",
        score=score_vector(vector), affected=affected, models=MODELS,
        initial_release_date=T0, current_release_date=history[-1][1],
        revision_history=history, json_url=f"{BASE}/.well-known/csaf/white/2026/x.json",
        html_url=f"{BASE}/security/advisories/x", policy_url=f"{BASE}/security/policy", **kw,
    ), publisher=PUB, vendor="Example Devices Ltd")


CASES = {
    "critical-v3.1-one-model-fixed": advisory(
        "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
        [AffectedRange("lock", "1.0.0", "1.4.2")], fixing_release="1.4.2",
        cve="CVE-2026-12345", credit=["Ada Researcher"]),
    "high-v4.0-two-models": advisory(
        "CVSS:4.0/AV:A/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:N/SC:N/SI:N/SA:N",
        [AffectedRange("lock", None, "2.0"), AffectedRange("thermostat", "1.1", "1.3.0")],
        fixing_release="2.0"),
    "medium-v3.1-unfixed-and-fixed": advisory(
        "CVSS:3.1/AV:A/AC:H/PR:N/UI:R/S:U/C:L/I:L/A:L",
        [AffectedRange("thermostat", "3.0", None), AffectedRange("lock", "0.9", "1.0")],
        history=[(1, T0, "Initial version."),
                 (2, T0 + dt.timedelta(days=3), "Fix for the lock.")]),
    "low-v4.0-all-versions": advisory(
        "CVSS:4.0/AV:P/AC:H/AT:P/PR:H/UI:A/VC:L/VI:N/VA:N/SC:N/SI:N/SA:N",
        [AffectedRange("thermostat")]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_advisories_validate_against_the_csaf_schema(name: str) -> None:
    doc = CASES[name]
    assert csaf.validate_advisory(doc) == []
    assert doc["document"]["category"] == "csaf_security_advisory"
    assert doc["document"]["csaf_version"] == "2.0"


def test_severity_and_scores_per_cvss_version() -> None:
    v31 = CASES["critical-v3.1-one-model-fixed"]
    assert v31["document"]["aggregate_severity"]["text"] == "Critical"
    assert v31["vulnerabilities"][0]["scores"][0]["cvss_v3"]["baseScore"] == 9.8
    assert v31["vulnerabilities"][0]["cve"] == "CVE-2026-12345"
    v40 = CASES["high-v4.0-two-models"]
    assert "scores" not in v40["vulnerabilities"][0]  # CSAF 2.0 has no CVSS v4 object
    assert "CVSS:4.0/" in v40["vulnerabilities"][0]["threats"][0]["details"]
    assert v40["document"]["aggregate_severity"]["text"] == "High"
    mixed = CASES["medium-v3.1-unfixed-and-fixed"]["vulnerabilities"][0]
    assert {r["category"] for r in mixed["remediations"]} == {"vendor_fix", "none_available"}
    assert CASES["medium-v3.1-unfixed-and-fixed"]["document"]["tracking"]["version"] == "2"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["document"].pop("publisher"), "publisher"),
        (lambda d: d["document"].__setitem__("category", ""), "category"),
        (lambda d: d["document"]["tracking"].__setitem__("status", "published"), "status"),
        (lambda d: d["document"]["tracking"].__setitem__("current_release_date", "yesterday"),
         "date-time"),
        (lambda d: d["vulnerabilities"][0]["scores"][0]["cvss_v3"].__setitem__(
            "baseSeverity", "HUGE"), "HUGE"),
        (lambda d: d["vulnerabilities"][0]["product_status"]["known_affected"].append(
            "CSAFPID-9999"), "6.1.1"),
        (lambda d: d["vulnerabilities"][0]["scores"][0]["cvss_v3"].__setitem__(
            "baseScore", 5.0), "6.1.9"),
        (lambda d: d["document"]["tracking"].__setitem__("version", "7"), "6.1.16"),
        (lambda d: d.pop("vulnerabilities"), "6.1.27.3"),
    ],
)
def test_the_validator_catches_broken_documents(mutate: Any, expected: str) -> None:
    doc = copy.deepcopy(CASES["critical-v3.1-one-model-fixed"])
    mutate(doc)
    errors = csaf.validate_advisory(doc)
    assert errors and any(expected in e for e in errors), errors


def test_filenames_and_index_files() -> None:
    assert csaf.advisory_filename("HSA-2026-0001") == "hsa-2026-0001.json"
    assert csaf.advisory_filename("Example Co/SA:1") == "example_co_sa_1.json"
    t1, t2 = T0, T0 + dt.timedelta(days=1)
    assert csaf.index_txt(["2026/b.json", "2025/a.json"]) == "2025/a.json\n2026/b.json\n"
    assert csaf.changes_csv([("2026/a.json", t1), ("2026/b.json", t2)]) == (
        '"2026/b.json","2026-04-02T12:00:00.000Z"\n"2026/a.json","2026-04-01T12:00:00.000Z"\n')


def publish(client: TestClient, clock: FrozenClock, token: str, vector: str,
            affected: list[dict[str, Any]], release: str) -> dict[str, Any]:
    tid, _ = new_report(client, clock)
    for step in ({"state": "acknowledged"},):
        assert api(client, token, f"/{tid}/transition", step).status_code == 200
    assert api(client, token, f"/{tid}/assessment", {
        "cvss_vector": vector, "affected": affected, "fixing_release": release}).status_code == 200
    for state in ("triaged", "fixing", "fixed"):
        assert api(client, token, f"/{tid}/transition", {"state": state}).status_code == 200
    r = api(client, token, f"/{tid}/advisory", {
        "title": "Unlock replay", "summary": "Replay of unlock commands over the radio link.",
        "cve": "CVE-2026-0042"})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()["advisory"]
    return out


def test_published_advisories_are_distributed_per_csaf_rules(
    client: TestClient, clock: FrozenClock, team_token: str, sessions: sessionmaker[Session]
) -> None:
    a1 = publish(client, clock, team_token, "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
                 [{"model": "lock", "introduced": "1.0", "fixed": "1.4.2"}], "1.4.2")
    clock.advance(days=2)
    a2 = publish(client, clock, team_token,
                 "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N",
                 [{"model": "thermostat", "introduced": None, "fixed": "2.1"}], "2.1")
    assert (a1["id"], a2["id"]) == ("HSA-2026-0001", "HSA-2026-0002")

    meta = client.get("/.well-known/csaf/provider-metadata.json")
    assert meta.status_code == 200 and meta.headers["content-type"] == "application/json"
    assert csaf.validate_provider_metadata(meta.json()) == []
    assert meta.json()["distributions"] == [{"directory_url": f"{BASE}/.well-known/csaf/white/"}]

    index = client.get("/.well-known/csaf/white/index.txt").text
    assert index == "2026/hsa-2026-0001.json\n2026/hsa-2026-0002.json\n"
    changes = client.get("/.well-known/csaf/white/changes.csv").text.splitlines()
    assert changes[0].startswith('"2026/hsa-2026-0002.json",')
    for path in index.splitlines():
        r = client.get(f"/.well-known/csaf/white/{path}")
        assert r.status_code == 200
        doc = r.json()
        assert csaf.validate_advisory(doc) == [], path
        assert doc["document"]["references"][0]["url"] == f"{BASE}/.well-known/csaf/white/{path}"
        sha = client.get(f"/.well-known/csaf/white/{path}.sha256").text
        assert sha == f"{hashlib.sha256(r.content).hexdigest()}  {path.split('/')[1]}\n"
        sha512 = client.get(f"/.well-known/csaf/white/{path}.sha512").text
        assert sha512.split()[0] == hashlib.sha512(r.content).hexdigest()
    assert "hsa-2026-0001.json" in client.get("/.well-known/csaf/white/2026/").text
    assert client.get("/.well-known/csaf/white/2019/x.json").status_code == 404

    # the human-readable pages and the product pages
    page = client.get("/security/advisories/HSA-2026-0001")
    assert page.status_code == 200 and "Unlock replay" in page.text and "1.4.2" in page.text
    assert "HSA-2026-0002" in client.get("/security/advisories").text
    lock = client.get("/products/lock").text
    assert "HSA-2026-0001" in lock and "HSA-2026-0002" not in lock
    assert 'href="/security/policy"' in lock and 'id="support-period"' in lock

    # what the web app asks for an owner's unit
    with sessions() as s:
        assert [a.id for a in advisories_for_model(s, "lock")] == ["HSA-2026-0001"]
        assert [a.id for a in advisories_for_model(s, "lock", "1.3.9")] == ["HSA-2026-0001"]
        assert advisories_for_model(s, "lock", "1.4.2") == []
        assert advisories_for_model(s, "lock", "0.9") == []
        assert [a.id for a in advisories_for_model(s, "thermostat", "0.1")] == ["HSA-2026-0002"]
        assert advisories_for_model(s, "camera") == []
        with pytest.raises(TriageError):
            advisories_for_model(s, "lock", "1.x")


def test_advisory_publication_needs_a_fixed_report(client: TestClient, clock: FrozenClock,
                                                   team_token: str) -> None:
    tid, _ = new_report(client, clock)
    r = api(client, team_token, f"/{tid}/advisory", {"title": "Too early", "summary": "x" * 30})
    assert r.status_code == 409 and r.json()["error"] == "invalid_transition"
    team_login(client, team_token)
    assert "Publish the advisory" not in client.get(f"/security/triage/reports/{tid}").text


def test_schemas_are_shipped_and_resolve_offline() -> None:
    from importlib import resources

    names = {p.name for p in (resources.files("hearth.service.disclosure") / "schemas")
             .iterdir()}
    assert {"csaf_json_schema.json", "provider_json_schema.json", "cvss-v3.1.json"} <= names
    # every $ref resolves from the local registry (no network in tests anyway)
    doc = json.loads(csaf.serialize(CASES["critical-v3.1-one-model-fixed"]))
    assert csaf.validate_advisory(doc) == []
