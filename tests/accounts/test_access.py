"""Nobody reaches a unit that is not theirs: every route that names a device is walked as
user A against user B's unit (web pages and JSON API), every route declares who may call
it, and the operator API refuses a consumer's session token."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.accounts.models import UnitOwner
from hearth.service.accounts.routes import PERMISSIONS
from hearth.service.api import PUBLIC_PATHS, create_app, iter_routes
from hearth.service.commands import InMemoryCommandPublisher
from hearth.service.config import Settings
from hearth.service.web import iter_web_routes

from .conftest import BASE, Minted, api_token, consumer, hidden


def claim(client: TestClient, dev: str, code: str) -> None:
    token = hidden(client.get("/units/claim").text)
    r = client.post("/units/claim", data={"csrf_token": token, "device_id": dev,
                                          "setup_code": code})
    assert r.status_code == 201, r.text


def web_routes(app: Any) -> list[tuple[str, str, str | None]]:
    out = []
    for path, route, permission in iter_web_routes(app.routes):
        if isinstance(route, APIRoute):
            for method in sorted(route.methods):
                out.append((method, path, permission))
    return out


def test_every_route_declares_a_known_permission_and_device_routes_need_the_owner(
        app: Any) -> None:
    routes = [r for r in web_routes(app) if not r[1].startswith("/static")]
    assert routes
    for method, path, permission in routes:
        assert permission in PERMISSIONS, (method, path, permission)
        if "{device_id}" in path:
            assert permission == "unit:owner", (method, path)


def test_user_a_cannot_read_or_command_user_bs_units_through_any_route(
        app: Any, minted: Minted, publisher: InMemoryCommandPublisher) -> None:
    alice = consumer(app, "alice@example.org", "10.0.0.1")
    bob = consumer(app, "bob@example.org", "10.0.0.2")
    dev = minted.thermostats[0]
    claim(bob, dev, minted.codes[dev])
    bob_api = api_token(bob, "bob@example.org")
    sent = bob.post(f"/api/v1/account/units/{dev}/commands", headers={
        "Authorization": f"Bearer {bob_api}"}, json={"name": "set_target",
                                                     "params": {"target": 22}})
    assert sent.status_code == 202, sent.text
    bob_command = sent.json()["command_id"]
    alice_api = api_token(alice, "alice@example.org")
    published_before = len(publisher.published)

    walked = 0
    for method, path, _perm in web_routes(app):
        if "{device_id}" not in path:
            continue
        url = path.replace("{device_id}", dev).replace("{command_id}", bob_command)
        if url.startswith("/api/"):
            r = alice.request(method, url, headers={"Authorization": f"Bearer {alice_api}"},
                              json={"name": "set_target", "params": {"target": 30}})
        elif method == "GET":
            r = alice.get(url)
        else:
            token = hidden(alice.get("/units").text)
            r = alice.post(url, data={"csrf_token": token, "name": "set_target",
                                      "target": "30", "confirm": "1"})
        walked += 1
        assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
        assert "22" not in r.text and dev not in r.text.replace(url, "")
    assert walked >= 10
    assert len(publisher.published) == published_before  # nothing reached B's unit
    # B still owns it and sees it; A's listings never show it
    assert dev in bob.get("/units").text
    assert dev not in alice.get("/units").text
    assert dev not in alice.get("/units/state.json").text
    listed = alice.get("/api/v1/account/units", headers={"Authorization": f"Bearer {alice_api}"})
    assert listed.json() == {"units": []}


def test_signed_out_visitors_reach_nothing_private(app: Any, minted: Minted) -> None:
    bob = consumer(app, "bob@example.org", "10.0.0.2")
    dev = minted.thermostats[0]
    claim(bob, dev, minted.codes[dev])
    anon = TestClient(app, base_url=BASE)
    for method, path, permission in web_routes(app):
        if permission == "public":
            continue
        url = path.replace("{device_id}", dev).replace("{command_id}", "0" * 32)
        r = anon.request(method, url, follow_redirects=False)
        if url.startswith("/api/"):
            assert r.status_code == 401, (method, path)
        elif method == "GET" and not url.endswith(".json"):
            assert r.status_code == 303 and "/account/sign-in" in r.headers["location"], (
                method, path)
        else:
            assert r.status_code in (401, 403, 303), (method, path, r.status_code)
        assert dev not in r.text


def test_a_cookie_does_not_open_the_json_api_and_a_bearer_token_not_the_pages(
        app: Any, minted: Minted) -> None:
    bob = consumer(app, "bob@example.org")
    dev = minted.thermostats[0]
    claim(bob, dev, minted.codes[dev])
    assert bob.get("/api/v1/account/units").status_code == 401  # cookie only: refused
    token = api_token(bob, "bob@example.org")
    anon = TestClient(app, base_url=BASE)
    r = anon.get("/units", headers={"Authorization": f"Bearer {token}"},
                 follow_redirects=False)
    assert r.status_code == 303
    anon.cookies.set("__Host-hearth-session", token)
    assert anon.get("/units", follow_redirects=False).status_code == 303


def test_the_operator_api_refuses_consumer_sessions(
        app: Any, minted: Minted, tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    bob = consumer(app, "bob@example.org")
    dev = minted.thermostats[0]
    claim(bob, dev, minted.codes[dev])
    token = api_token(bob, "bob@example.org")
    api = create_app(Settings(data_dir=tmp_path), session_factory=sessions,
                     command_publisher=InMemoryCommandPublisher(), revoker=None)
    client = TestClient(api, base_url=BASE)
    cookie = bob.cookies.get("__Host-hearth-session")
    assert cookie
    walked = 0
    for path, route, _perm in iter_routes(api.routes):
        if path in PUBLIC_PATHS or not isinstance(route, APIRoute):
            continue
        url = re.sub(r"\{device_id\}", dev, path)
        url = re.sub(r"\{[a-z_]+\}", "0" * 32, url)
        for method in route.methods:
            for headers in ({"Authorization": f"Bearer {token}"},
                            {"Authorization": f"Bearer {cookie}"},
                            {"Cookie": f"__Host-hearth-session={cookie}"}, {}):
                r = client.request(method, url, headers=headers, json={})
                assert r.status_code == 401, (method, path, r.status_code)
                walked += 1
    assert walked >= 40


@pytest.mark.parametrize("who", ["owner", "other"])
def test_owner_commands_go_through_the_command_service(
        app: Any, minted: Minted, publisher: InMemoryCommandPublisher, who: str,
        sessions: sessionmaker[Session]) -> None:
    bob = consumer(app, "bob@example.org", "10.0.0.2")
    dev = minted.locks[0]
    claim(bob, dev, minted.codes[dev])
    actor = bob if who == "owner" else consumer(app, "eve@example.org", "10.0.0.3")
    page = actor.get("/units/claim")
    r = actor.post(f"/units/{dev}/commands", data={"csrf_token": hidden(page.text),
                                                   "name": "unlock"})
    names = [c.name for c in publisher.published if c.device_id == dev]
    if who == "owner":
        assert r.status_code == 200 and "unlock" in names
        # system commands cannot be sent through the owner's command route
        r2 = actor.post(f"/units/{dev}/commands", data={"csrf_token": hidden(page.text),
                                                        "name": "factory_reset"})
        assert r2.status_code == 400
        assert names.count("factory_reset") == 0
    else:
        assert r.status_code == 404 and "unlock" not in names
    with sessions() as s:
        assert s.get(UnitOwner, dev) is not None
