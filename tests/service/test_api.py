"""HTTP API: authentication on every route, one permission per route, validated input,
JSON errors with stable codes, security headers."""

from __future__ import annotations

import collections
import datetime as dt
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from fastapi.testclient import TestClient
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

from hearth.errors import BrokerError
from hearth.protocol import Reason
from hearth.service import auth, fleet
from hearth.service.api import PUBLIC_PATHS, create_app, iter_routes, require
from hearth.service.auth import Permission
from hearth.service.broker_log import REASONS
from hearth.service.broker_log import record as record_refusals
from hearth.service.commands import InMemoryCommandPublisher
from hearth.service.config import Settings
from hearth.service.ingest import IngestCore
from tests.service import messages as m
from tests.service.conftest import Fleet

READ_ONLY = [Permission.FLEET_READ, Permission.TELEMETRY_READ, Permission.QUARANTINE_READ,
             Permission.COMMANDS_READ]


class FakeRevoker:
    def __init__(self) -> None:
        self.calls: list[tuple[str, x509.Certificate]] = []
        self.fail = False

    def revoke(self, device_id: str, cert: x509.Certificate) -> None:
        if self.fail:
            raise BrokerError("broker down")
        self.calls.append((device_id, cert))


class Api:
    def __init__(self, client: TestClient, sf: sessionmaker[Session], fleet_: Fleet,
                 publisher: InMemoryCommandPublisher, revoker: FakeRevoker) -> None:
        self.client = client
        self.sf = sf
        self.fleet = fleet_
        self.publisher = publisher
        self.revoker = revoker
        with sf.begin() as s:
            self.admin = auth.create_token(s, "admin")
            self.reader = auth.create_token(s, "reader", permissions=READ_ONLY)
            self.revoked = auth.create_token(s, "gone")
            auth.revoke_token(s, self.revoked[4:20])

    def get(self, path: str, token: str | None = None, **kw: Any) -> Any:
        return self.client.get(path, headers=_bearer(token or self.admin), **kw)

    def post(self, path: str, token: str | None = None, *,
             headers: dict[str, str] | None = None, **kw: Any) -> Any:
        return self.client.post(path, headers={**_bearer(token or self.admin), **(headers or {})},
                                **kw)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(sf: sessionmaker[Session], imported: Fleet, tmp_path: Any) -> Iterator[Api]:
    publisher = InMemoryCommandPublisher()
    revoker = FakeRevoker()
    app = create_app(Settings(data_dir=tmp_path, api_max_page=50), session_factory=sf,
                     command_publisher=publisher, revoker=revoker)
    with TestClient(app, base_url="https://testserver") as client:
        yield Api(client, sf, imported, publisher, revoker)


def _ingest(sf: sessionmaker[Session], items: list[tuple[str, bytes]]) -> None:
    core = IngestCore(sf)
    for topic, payload in items:
        core.handle(topic, payload)
    core.flush()


def _routes(api: Api) -> list[tuple[str, str]]:
    """(method, concrete path) for every route of the app."""
    out = []
    for path, route, _perm in iter_routes(api.client.app.routes):  # type: ignore[attr-defined]
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method == "HEAD":
                continue
            concrete = re.sub(r"\{device_id\}", api.fleet.thermostats[0], path)
            concrete = re.sub(r"\{[a-z_]+\}", "0" * 32, concrete)
            out.append((method, concrete))
    return out


# --- permissions and authentication ---------------------------------------------------------


def test_every_route_declares_a_permission(api: Api) -> None:
    seen = []
    for path, _route, permission in iter_routes(api.client.app.routes):  # type: ignore[attr-defined]
        seen.append(path)
        if path in PUBLIC_PATHS:
            continue
        assert permission is not None, f"{path} declares no permission"
    assert "/api/v1/units/{device_id}/commands" in seen


def test_route_walk_catches_a_route_without_permission(api: Api) -> None:
    """The walk above can fail: a route added without require() is reported."""
    app = api.client.app

    @app.get("/api/v1/forgotten")  # type: ignore[attr-defined,misc]
    def forgotten() -> dict[str, str]:
        return {}

    @app.get("/api/v1/declared", dependencies=[require(Permission.FLEET_READ)])  # type: ignore[attr-defined,misc]
    def declared() -> dict[str, str]:
        return {}

    found = {p: perm for p, _r, perm in iter_routes(app.routes)}  # type: ignore[attr-defined]
    assert found["/api/v1/forgotten"] is None
    assert found["/api/v1/declared"] == Permission.FLEET_READ


@pytest.mark.parametrize("credential", ["none", "garbage", "revoked", "basic"])
def test_every_non_public_route_requires_a_valid_token(api: Api, credential: str) -> None:
    headers = {
        "none": {},
        "garbage": _bearer("hth_0123456789abcdef." + "x" * 43),
        "revoked": _bearer(api.revoked),
        "basic": {"Authorization": "Basic YWRtaW46YWRtaW4="},
    }[credential]
    checked = 0
    for method, path in _routes(api):
        if path in PUBLIC_PATHS:
            continue
        r = api.client.request(method, path, headers=headers, json={"name": "x"})
        assert r.status_code == 401, (method, path)
        assert r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        checked += 1
    assert checked >= 10
    assert api.publisher.published == [] and api.revoker.calls == []


def test_unknown_paths_also_require_a_token(api: Api) -> None:
    assert api.client.get("/api/v1/nothing-here").status_code == 401
    assert api.client.get("/admin").status_code == 401
    r = api.get("/api/v1/nothing-here")
    assert (r.status_code, r.json()["error"]) == (404, "not_found")


def test_read_only_token_cannot_act(api: Api) -> None:
    dev = api.fleet.thermostats[0]
    r = api.post(f"/api/v1/units/{dev}/commands", api.reader,
                 json={"name": "set_target", "params": {"target": 20}})
    assert (r.status_code, r.json()["error"]) == (403, "forbidden")
    r = api.post(f"/api/v1/units/{dev}/revoke", api.reader)
    assert r.status_code == 403
    assert api.publisher.published == [] and api.revoker.calls == []
    assert api.get(f"/api/v1/units/{dev}", api.reader).status_code == 200


def test_each_permission_admits_only_its_routes(api: Api) -> None:
    with api.sf.begin() as s:
        fleet_only = auth.create_token(s, "fleet", permissions=[Permission.FLEET_READ])
    dev = api.fleet.thermostats[0]
    assert api.get("/api/v1/units", fleet_only).status_code == 200
    assert api.get(f"/api/v1/units/{dev}/telemetry", fleet_only).status_code == 403
    assert api.get("/api/v1/quarantine", fleet_only).status_code == 403
    assert api.get(f"/api/v1/commands/{'0' * 32}", fleet_only).status_code == 403


def test_health_is_public_and_has_security_headers(api: Api) -> None:
    for path in ("/healthz", "/api/v1/healthz"):
        r = api.client.get(path)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert r.headers["strict-transport-security"].startswith("max-age=")
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"


def test_health_reports_an_unavailable_database(api: Api) -> None:
    engine = api.sf.kw["bind"]
    dbapi = engine.dialect.loaded_dbapi

    @sa_event.listens_for(engine, "before_cursor_execute")
    def _down(*_a: Any) -> None:
        raise dbapi.OperationalError("database is gone")

    try:
        r = api.client.get("/healthz")
        assert (r.status_code, r.json()["status"]) == (503, "unavailable")
        r = api.get("/api/v1/units")
        assert (r.status_code, r.json()["error"]) == (503, "database_unavailable")
    finally:
        sa_event.remove(engine, "before_cursor_execute", _down)


def test_api_responses_have_security_headers(api: Api) -> None:
    for r in (api.get("/api/v1/units"), api.client.get("/api/v1/units")):
        assert r.headers["strict-transport-security"] == "max-age=63072000; includeSubDomains"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["content-security-policy"].startswith("default-src 'none'")
        assert r.headers["x-frame-options"] == "DENY"


def test_openapi_is_served_and_documents_bearer_auth(api: Api) -> None:
    doc = api.client.get("/api/v1/openapi.json").json()
    assert "/api/v1/units/{device_id}/commands" in doc["paths"]
    op = doc["paths"]["/api/v1/units"]["get"]
    assert op["security"] == [{"HTTPBearer": []}]
    assert api.client.get("/docs").status_code == 401  # no interactive docs (CDN scripts)


# --- fleet, state, telemetry, quarantine ----------------------------------------------------


def test_units_list_and_detail(api: Api) -> None:
    r = api.get("/api/v1/units", params={"limit": 2})
    body = r.json()
    assert r.status_code == 200 and len(body["units"]) == 2 and body["next"]
    rest = api.get("/api/v1/units", params={"after": body["next"], "limit": 50}).json()
    ids = [u["device_id"] for u in body["units"] + rest["units"]]
    assert ids == sorted(api.fleet.thermostats + api.fleet.locks) and rest["next"] is None
    assert "mqtt_password_hash" not in r.text
    locks = api.get("/api/v1/units", params={"model": "lock"}).json()["units"]
    assert {u["device_id"] for u in locks} == set(api.fleet.locks)
    dev = api.fleet.thermostats[0]
    detail = api.get(f"/api/v1/units/{dev}").json()
    assert detail["device_id"] == dev and detail["model"] == "thermostat"
    assert detail["certificate_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert "password" not in detail and "salt" not in str(detail)


@pytest.mark.parametrize("device_id", ["0" * 32, "not-an-id", "A" * 32, "x" * 64])
def test_unknown_unit_is_404(api: Api, device_id: str) -> None:
    for suffix in ("", "/state", "/telemetry", "/events"):
        r = api.get(f"/api/v1/units/{device_id}{suffix}")
        assert (r.status_code, r.json()["error"]) == (404, "not_found"), suffix
    r = api.post(f"/api/v1/units/{device_id}/commands", json={"name": "lock"})
    assert r.status_code == 404
    assert api.post(f"/api/v1/units/{device_id}/revoke").status_code == 404


def test_state_and_telemetry(api: Api) -> None:
    dev = api.fleet.thermostats[0]
    _ingest(api.sf, [(m.topic(dev), m.telemetry(dev, seq, {"temperature": 18.0 + seq}))
                     for seq in range(1, 8)])
    state = api.get(f"/api/v1/units/{dev}/state").json()
    assert (state["seq"], state["state"]) == (7, {"temperature": 25.0})
    assert state["last_seen_at"] is not None
    page = api.get(f"/api/v1/units/{dev}/telemetry", params={"limit": 3}).json()
    assert [i["seq"] for i in page["items"]] == [7, 6, 5]
    assert page["next_before_seq"] == 5
    page2 = api.get(f"/api/v1/units/{dev}/telemetry",
                    params={"limit": 3, "before_seq": page["next_before_seq"]}).json()
    assert [i["seq"] for i in page2["items"]] == [4, 3, 2]
    since = (m.TS + dt.timedelta(seconds=6)).isoformat()
    recent = api.get(f"/api/v1/units/{dev}/telemetry", params={"since": since}).json()
    assert [i["seq"] for i in recent["items"]] == [7, 6]
    assert recent["items"][0]["readings"] == {"temperature": 25.0}


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 51}, {"limit": "many"},
                                    {"since": "yesterday"}, {"since": "2025-06-01T12:00:00"},
                                    {"before_seq": -1}])
def test_telemetry_query_is_bounded_and_validated(api: Api, params: dict[str, Any]) -> None:
    r = api.get(f"/api/v1/units/{api.fleet.thermostats[0]}/telemetry", params=params)
    assert (r.status_code, r.json()["error"]) == (422, "invalid_request")


def test_events_endpoint(api: Api) -> None:
    dev = api.fleet.locks[0]
    _ingest(api.sf, [(m.topic(dev, "event"), m.event(dev, 1, "tamper", "case opened"))])
    items = api.get(f"/api/v1/units/{dev}/events").json()["items"]
    assert [(i["kind"], i["detail"]) for i in items] == [("tamper", "case opened")]


def test_quarantine_and_counts(api: Api) -> None:
    dev, other = api.fleet.thermostats[0], api.fleet.thermostats[1]
    _ingest(api.sf, [
        (m.topic(dev), b"{nope"),
        (m.topic(dev), m.telemetry(dev, 1, {"temperature": 900.0})),
        (m.topic(dev), m.telemetry(dev, 2)),
        (m.topic(other), m.telemetry(other, 1, {"temperature": 900.0})),
        (m.topic("f" * 32), m.telemetry("f" * 32, 1)),
    ])
    page = api.get("/api/v1/quarantine").json()
    assert [i["reason"] for i in page["items"]] == [
        "unknown_device", "out_of_range", "out_of_range", "malformed_json"]
    assert page["items"][-1]["payload_excerpt_b64"] == "e25vcGU="
    only = api.get("/api/v1/quarantine", params={"device_id": dev, "reason": "out_of_range"})
    assert len(only.json()["items"]) == 1
    counts = api.get("/api/v1/quarantine/counts").json()
    assert counts["by_reason"] == {"accepted": 1, "malformed_json": 1, "out_of_range": 2,
                                   "unknown_device": 1}
    by_unit = {(c["device_id"], c["reason"]): c["count"] for c in counts["by_unit"]}
    assert by_unit == {(dev, "malformed_json"): 1, (dev, "out_of_range"): 1,
                       (other, "out_of_range"): 1, ("", "unknown_device"): 1}


def test_broker_refusals_are_listed_per_reason_and_add_up(api: Api) -> None:
    empty = api.get("/api/v1/security/broker-refusals").json()
    assert empty["total"] == 0
    assert [r["reason"] for r in empty["by_reason"]] == list(REASONS)
    assert all(r["count"] == 0 and r["last_at"] is None and r["meaning"]
               for r in empty["by_reason"])
    first = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)
    for at, counts in ((first, {"identity_mismatch": 2, "auth_refused": 1}),
                       (first + dt.timedelta(minutes=5), {"identity_mismatch": 1})):
        with api.sf() as session:
            record_refusals(session, collections.Counter(counts), at)
            session.commit()
    body = api.get("/api/v1/security/broker-refusals").json()
    got = {r["reason"]: (r["count"], r["last_at"]) for r in body["by_reason"] if r["count"]}
    assert got == {"identity_mismatch": (3, "2026-11-25T12:05:00Z"),
                   "auth_refused": (1, "2026-11-25T12:00:00Z")}
    assert body["total"] == 4


# --- commands -------------------------------------------------------------------------------


def test_command_round_trip(api: Api) -> None:
    dev = api.fleet.thermostats[0]
    r = api.post(f"/api/v1/units/{dev}/commands",
                 json={"name": "set_target", "params": {"target": 21.5}, "ttl_seconds": 60})
    assert r.status_code == 202, r.text
    cid = r.json()["command_id"]
    [published] = api.publisher.published
    assert published.command_id == cid and published.params == {"target": 21.5}
    assert published.expires_at - published.issued_at == dt.timedelta(seconds=60)
    assert api.get(f"/api/v1/commands/{cid}").json()["status"] == "sent"
    _ingest(api.sf, [(m.topic(dev, "cmd/result"),
                      m.result(dev, cid, state={"target": 21.5}))])
    body = api.get(f"/api/v1/commands/{cid}").json()
    assert body["status"] == "succeeded" and body["result"]["state"] == {"target": 21.5}


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"name": "self_destruct"}, Reason.UNKNOWN_COMMAND),
        ({"name": "set_target", "params": {"target": 99}}, Reason.OUT_OF_RANGE),
        ({"name": "set_target", "params": {"target": "hot"}}, Reason.WRONG_TYPE),
        ({"name": "set_target", "params": {"target": 20, "boost": True}}, Reason.UNKNOWN_READING),
        ({"name": "set_target", "params": {}}, Reason.INVALID_SCHEMA),
        ({"name": "set_target", "params": {"target": 20}, "ttl_seconds": 10**6},
         Reason.OUT_OF_RANGE),
        ({"name": "set_target", "params": {"target": 20}, "ttl_seconds": 0}, "invalid_request"),
        ({"name": "set_target", "params": {"target": [20]}}, "invalid_request"),
        ({"name": "set_target", "params": {"target": 20}, "admin": True}, "invalid_request"),
        ({"name": "x" * 100}, "invalid_request"),
        ({}, "invalid_request"),
        ([], "invalid_request"),
    ],
)
def test_invalid_commands_get_422_with_a_reason(api: Api, body: Any, error: str) -> None:
    r = api.post(f"/api/v1/units/{api.fleet.thermostats[0]}/commands", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == error
    assert r.json()["detail"]
    assert api.publisher.published == []


def test_malformed_json_body(api: Api) -> None:
    r = api.post(f"/api/v1/units/{api.fleet.thermostats[0]}/commands", content=b"{nope",
                 headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (422, "invalid_request")


def test_command_to_revoked_unit_is_409(api: Api) -> None:
    dev = api.fleet.thermostats[0]
    with api.sf.begin() as s:
        fleet.mark_revoked(s, dev)
    r = api.post(f"/api/v1/units/{dev}/commands",
                 json={"name": "set_target", "params": {"target": 20}})
    assert (r.status_code, r.json()["error"]) == (409, "revoked")


def test_broker_failure_is_503(api: Api) -> None:
    api.publisher.fail = True
    r = api.post(f"/api/v1/units/{api.fleet.locks[0]}/commands", json={"name": "lock"})
    assert (r.status_code, r.json()["error"]) == (503, "broker_unavailable")


def test_unknown_command_id_is_404(api: Api) -> None:
    for cid in ("0" * 32, "nope"):
        r = api.get(f"/api/v1/commands/{cid}")
        assert (r.status_code, r.json()["error"]) == (404, "not_found")


def test_body_too_large_is_413(api: Api) -> None:
    url = f"/api/v1/units/{api.fleet.thermostats[0]}/commands"
    big = b'{"name": "lock", "pad": "' + b"x" * (64 * 1024) + b'"}'
    r = api.post(url, content=big, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"name": "lock", "pad": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    r = api.post(url, content=chunks(), headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
    assert api.publisher.published == []


def test_errors_are_json(api: Api) -> None:
    r = api.client.delete("/api/v1/units", headers=_bearer(api.admin))
    assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")
    assert r.headers["content-type"] == "application/json"


# --- revocation -----------------------------------------------------------------------------


def test_revoke_cuts_the_unit_off(api: Api) -> None:
    dev = api.fleet.thermostats[0]
    r = api.post(f"/api/v1/units/{dev}/revoke")
    assert r.status_code == 200
    assert r.json() == {"device_id": dev, "status": "revoked", "broker_revoked": True}
    [(device_id, cert)] = api.revoker.calls
    assert device_id == dev
    with api.sf() as s:
        unit = fleet.get_unit(s, dev)
        assert unit.status == "revoked"
        assert str(cert.serial_number) == unit.cert_serial
    assert api.get(f"/api/v1/units/{dev}").json()["status"] == "revoked"
    assert api.post(f"/api/v1/units/{dev}/revoke").status_code == 200  # idempotent


def test_revoke_fails_closed_when_the_broker_fails(api: Api) -> None:
    dev = api.fleet.thermostats[0]
    api.revoker.fail = True
    r = api.post(f"/api/v1/units/{dev}/revoke")
    assert (r.status_code, r.json()["error"]) == (503, "broker_unavailable")
    with api.sf() as s:
        assert fleet.get_unit(s, dev).status == "active"  # the operator sees it and retries


def test_revoke_without_a_broker_says_so(sf: sessionmaker[Session], imported: Fleet,
                                         tmp_path: Any) -> None:
    app = create_app(Settings(data_dir=tmp_path), session_factory=sf,
                     command_publisher=InMemoryCommandPublisher(), revoker=None)
    with sf.begin() as s:
        token = auth.create_token(s, "admin")
    with TestClient(app, base_url="https://testserver") as client:
        r = client.post(f"/api/v1/units/{imported.locks[0]}/revoke", headers=_bearer(token))
    assert r.json()["broker_revoked"] is False
    with sf() as s:
        assert fleet.get_unit(s, imported.locks[0]).status == "revoked"
        assert s.scalar(sa.select(sa.func.count()).select_from(sa.table("units"))) == 5
