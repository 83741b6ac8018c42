"""The service's update routes: tokens, the repository files, the operator API, the public
support-period document and the MQTT responder's checks (in-process ASGI, no broker)."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from hearth import protocol
from hearth.errors import ConfigError
from hearth.service import auth, db
from hearth.service.api import PUBLIC_PATHS, create_app, iter_routes
from hearth.service.commands import InMemoryCommandPublisher
from hearth.service.config import Settings
from hearth.service.models import Unit
from hearth.service.updates import rollouts
from hearth.service.updates.api import create_api_router
from hearth.service.updates.files import create_files_router
from hearth.service.updates.responder import UpdateResponder
from hearth.service.updates.service import UpdateService
from hearth.service.updates.tokens import UpdateTokens
from hearth.service.web import create_web_app
from tests.updates.support import World, make_world


@dataclass
class Svc:
    world: World
    service: UpdateService
    sf: sessionmaker[Session]
    files: TestClient
    api: TestClient
    publisher: InMemoryCommandPublisher
    thermostat: str
    lock: str
    operator: str

    def token(self, device_id: str, model: str = "thermostat") -> str:
        return self.service.tokens.issue(device_id, model, now=self.service.now())[0]

    def bearer(self, device_id: str | None = None, model: str = "thermostat") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(device_id or self.thermostat, model)}"}


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Svc]:
    world = make_world(tmp_path)
    world.publish("1.0.0")
    world.publish("1.0.0", model="lock")
    engine = db.make_engine(f"sqlite:///{tmp_path / 'hearth.db'}")
    db.migrate(engine)
    sf = db.session_factory(engine)
    ids = {"thermostat": secrets.token_hex(16), "lock": secrets.token_hex(16)}
    now = dt.datetime.now(dt.UTC)
    with sf.begin() as s:
        for model, device_id in ids.items():
            s.add(Unit(device_id=device_id, model=model, certificate_pem="-", cert_serial="1",
                       mqtt_password_hash={}, status="active", imported_at=now, revoked_at=None,
                       last_seen_at=None, latest_seq=None, latest_ts=None, latest_state={}))
        operator = auth.create_token(s, "op")
    service = UpdateService(tmp_path / "service", sf)
    service.tick()
    publisher = InMemoryCommandPublisher()
    api_app = create_app(Settings(data_dir=tmp_path / "service"), session_factory=sf,
                         command_publisher=publisher, revoker=None,
                         routers=[create_api_router(service)])
    files_app = create_web_app(create_files_router(service), hsts=False)
    with TestClient(files_app) as files, TestClient(api_app) as api:
        yield Svc(world, service, sf, files, api, publisher, ids["thermostat"], ids["lock"],
                  operator)
    engine.dispose()


def _target_path(svc: Svc, name: str) -> str:
    rel = svc.world.repo.target_file(name).relative_to(svc.world.repo.targets_dir)
    return f"/updates/targets/{rel.as_posix()}"


# --- tokens ----------------------------------------------------------------------------------
def test_token_is_bound_to_unit_model_scope_and_expiry() -> None:
    tokens = UpdateTokens(b"k" * 32)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    token, expires = tokens.issue("a" * 32, "thermostat", now=now)
    claims = tokens.verify(token, now=now)
    assert claims is not None
    assert (claims.device_id, claims.model, claims.scope) == ("a" * 32, "thermostat",
                                                              "updates:read")
    assert expires - now <= dt.timedelta(minutes=15)
    assert tokens.verify(token, now=expires) is None  # expired
    forged = token.replace("a" * 32, "b" * 32)
    assert tokens.verify(forged, now=now) is None  # the MAC covers the device id
    assert UpdateTokens(b"x" * 32).verify(token, now=now) is None  # another service's key
    assert tokens.verify(token[:-2], now=now) is None
    with pytest.raises(ConfigError):  # a token may not outlive 15 minutes
        UpdateTokens(b"k" * 32, ttl=dt.timedelta(hours=1))


# --- the repository routes ---------------------------------------------------------------------
def test_downloads_need_a_valid_token_of_an_active_unit(svc: Svc) -> None:
    r = svc.files.get("/updates/metadata/timestamp.json")
    assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"]
    assert svc.files.get("/updates/metadata/timestamp.json",
                         headers={"Authorization": "Bearer hut_nope.x"}).status_code == 401
    expired = svc.service.tokens.issue(
        svc.thermostat, "thermostat", now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20))[0]
    assert svc.files.get("/updates/metadata/timestamp.json",
                         headers={"Authorization": f"Bearer {expired}"}).status_code == 401
    ok = svc.files.get("/updates/metadata/timestamp.json", headers=svc.bearer())
    assert ok.status_code == 200 and ok.headers["cache-control"] == "no-store"
    assert ok.content == (svc.world.repo.metadata_dir / "timestamp.json").read_bytes()
    assert "default-src 'self'" in ok.headers["content-security-policy"]
    with svc.sf.begin() as s:
        unit = s.get(Unit, svc.thermostat)
        assert unit is not None
        unit.status = "revoked"
    svc.service._units.clear()  # the unit cache lives a few seconds
    assert svc.files.get("/updates/metadata/timestamp.json",
                         headers=svc.bearer()).status_code == 403


@pytest.mark.parametrize("name", [
    "..%2Fupdate-keys%2Fx.pem", "%2E%2E", "1.root.json.bak", "timestamp.json%00",
    "..%2F..%2Fhearth.db", "0.root.json", ".lock",
])
def test_only_metadata_names_are_served(svc: Svc, name: str) -> None:
    r = svc.files.get(f"/updates/metadata/{name}", headers=svc.bearer())
    assert r.status_code == 404


def test_target_paths_are_strict_and_limited_to_the_units_model(svc: Svc) -> None:
    own = _target_path(svc, "thermostat/thermostat-1.0.0.tar")
    other = _target_path(svc, "lock/lock-1.0.0.tar")
    assert svc.files.get(own, headers=svc.bearer()).status_code == 200
    assert svc.files.get(other, headers=svc.bearer()).status_code == 403
    assert svc.files.get(other, headers=svc.bearer(svc.lock, "lock")).status_code == 200
    # a token claiming another model than the unit's is refused
    assert svc.files.get(other, headers=svc.bearer(svc.thermostat, "lock")).status_code == 403
    for bad in ("/updates/targets/thermostat/../lock/x.tar",
                "/updates/targets/thermostat%2F..%2F..%2Fupdate-keys",
                "/updates/targets/thermostat/thermostat-1.0.0.tar"):
        assert svc.files.get(bad, headers=svc.bearer()).status_code == 404, bad


def test_byte_ranges_resume_a_download(svc: Svc) -> None:
    path = _target_path(svc, "thermostat/thermostat-1.0.0.tar")
    full = svc.world.repo.target_file("thermostat/thermostat-1.0.0.tar").read_bytes()
    r = svc.files.get(path, headers={**svc.bearer(), "Range": "bytes=1000-"})
    assert r.status_code == 206 and r.content == full[1000:]
    assert r.headers["content-range"] == f"bytes 1000-{len(full) - 1}/{len(full)}"
    multi = svc.files.get(path, headers={**svc.bearer(), "Range": "bytes=0-1,5-9"})
    assert multi.status_code == 416
    served = svc.service.stats
    assert served.by_kind["targets"] == len(full) - 1000 and served.refused >= 1
    assert hashlib.sha256(svc.files.get(path, headers=svc.bearer()).content).hexdigest() == \
        hashlib.sha256(full).hexdigest()


# --- the operator API --------------------------------------------------------------------------
def test_support_periods_are_public_json_and_set_with_a_permission(svc: Svc) -> None:
    assert "/api/v1/support-periods" in PUBLIC_PATHS
    anon = svc.api.get("/api/v1/support-periods")
    assert anon.status_code == 200 and anon.json()["models"] == []
    body = {"end_date": "2031-12-31"}
    assert svc.api.put("/api/v1/support-periods/thermostat", json=body).status_code == 401
    with svc.sf.begin() as s:
        reader = auth.create_token(s, "reader", permissions=[auth.Permission.ROLLOUTS_READ])
    r = svc.api.put("/api/v1/support-periods/thermostat", json=body,
                    headers={"Authorization": f"Bearer {reader}"})
    assert r.status_code == 403
    r = svc.api.put("/api/v1/support-periods/thermostat", json=body,
                    headers={"Authorization": f"Bearer {svc.operator}"})
    assert r.status_code == 200 and r.json()["status"] == "supported"
    doc = svc.api.get("/api/v1/support-periods").json()
    assert doc["models"][0]["end_date"] == "2031-12-31"
    assert "minimum length of time" in doc["definition"]
    shorter = svc.api.put("/api/v1/support-periods/thermostat", json={"end_date": "2030-01-01"},
                          headers={"Authorization": f"Bearer {svc.operator}"})
    assert shorter.status_code == 422 and shorter.json()["error"] == "out_of_range"


def test_every_update_route_declares_a_permission(svc: Svc) -> None:
    routes = list(iter_routes(svc.api.app.routes))  # type: ignore[attr-defined]
    found = {p: perm for p, _r, perm in routes}
    ours = [(p, perm) for p, _r, perm in routes
            if any(k in p for k in ("rollout", "release", "support", "integrity", "/update"))]
    assert len(ours) >= 12
    for path, perm in ours:
        assert perm is not None or path in PUBLIC_PATHS, path
    assert found["/api/v1/units/{device_id}/integrity/acknowledge"] is \
        auth.Permission.ALERTS_ACKNOWLEDGE


def test_rollout_api_start_pause_resume_and_progress(svc: Svc) -> None:
    h = {"Authorization": f"Bearer {svc.operator}"}
    svc.world.publish("1.1.0", min_from="1.0.0")
    r = svc.api.post("/api/v1/rollouts", json={"model": "thermostat", "version": "1.1.0",
                                               "stages": [100], "min_sample": 1}, headers=h)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert svc.api.post(f"/api/v1/rollouts/{rid}/pause", headers=h).json()["status"] == "paused"
    again = svc.api.post(f"/api/v1/rollouts/{rid}/pause", headers=h)
    assert again.status_code == 422 and again.json()["error"] == "invalid_transition"
    assert svc.api.post(f"/api/v1/rollouts/{rid}/resume", headers=h).json()["status"] == "active"
    bad = svc.api.post("/api/v1/rollouts", headers=h,
                       json={"target_name": "thermostat/thermostat-1.0.0.tar", "stages": [0]})
    assert bad.status_code == 422
    assert svc.api.get("/api/v1/rollouts", headers=h).json()["rollouts"][0]["id"] == rid
    assert svc.api.get("/api/v1/releases", headers=h).json()["releases"][-1]["version"] == "1.1.0"
    pref = svc.api.put(f"/api/v1/units/{svc.thermostat}/update-preference", headers=h,
                       json={"automatic": False, "window_start": "02:00", "window_end": "04:00",
                             "tz": "Europe/Berlin"})
    assert pref.json()["window"] == "02:00-04:00 Europe/Berlin"
    view = svc.api.get(f"/api/v1/units/{svc.thermostat}/update", headers=h).json()
    assert view["automatic"] is False


def test_acknowledging_an_alert_sends_the_system_command(svc: Svc) -> None:
    h = {"Authorization": f"Bearer {svc.operator}"}
    with svc.sf.begin() as s:
        rollouts._record_alert(s, svc.thermostat, "tampered", dt.datetime.now(dt.UTC))
    assert len(svc.api.get("/api/v1/integrity-alerts", headers=h).json()["alerts"]) == 1
    r = svc.api.post(f"/api/v1/units/{svc.thermostat}/integrity/acknowledge", headers=h)
    assert r.status_code == 200 and r.json()["acknowledged"] == 1
    (cmd,) = svc.publisher.published
    assert (cmd.name, cmd.device_id) == ("acknowledge_alert", svc.thermostat)
    assert svc.api.get("/api/v1/integrity-alerts", headers=h).json()["alerts"] == []
    # the generic command route does not send system commands
    r = svc.api.post(f"/api/v1/units/{svc.thermostat}/commands", headers=h,
                     json={"name": "acknowledge_alert"})
    assert r.status_code == 422


# --- the responder -----------------------------------------------------------------------------
def _check(device_id: str, **kw: object) -> bytes:
    body = {"device_id": device_id, "request_id": secrets.token_hex(16),
            "ts": dt.datetime.now(dt.UTC).isoformat(), "version": "1.0.0", **kw}
    return protocol.to_wire(body)


def test_responder_answers_with_a_token_and_refuses_bad_checks(svc: Svc) -> None:
    responder = UpdateResponder(None, svc.service, min_interval=60)  # type: ignore[arg-type]
    topic = protocol.update_topic(svc.thermostat, "update/check")
    offer = responder.handle(topic, _check(svc.thermostat))
    assert offer is not None and offer.token.startswith("hut_") and offer.target is None
    assert svc.service.tokens.verify(offer.token, now=svc.service.now()) is not None
    assert responder.handle(topic, _check(svc.thermostat)) is None  # one per minute here
    assert responder.counts["rate_limited"] == 1
    with svc.sf() as s:
        first = rollouts.unit_state(s, svc.thermostat).last_check_at
    again = UpdateResponder(None, svc.service).handle(  # type: ignore[arg-type]
        topic, _check(svc.thermostat))
    assert again is not None and again.token  # a routine check: answered without a write
    with svc.sf() as s:
        assert rollouts.unit_state(s, svc.thermostat).last_check_at == first
    assert responder.handle(topic, _check(svc.lock)) is None  # not the topic's unit
    assert responder.handle(topic, b"{") is None
    assert responder.handle(protocol.device_topic(svc.thermostat, "event"),
                            _check(svc.thermostat)) is None
    assert responder.counts["device_mismatch"] == 1
    assert responder.counts["malformed_json"] == 1
    quarantined = UpdateResponder(None, svc.service)  # type: ignore[arg-type]
    refused = quarantined.handle(protocol.update_topic(svc.lock, "update/check"),
                                 _check(svc.lock, mode="quarantined"))
    assert refused is not None and refused.token == "" and refused.refused == "unit_quarantined"
