"""The integration recipe handed to the lead: the operator API and the web app behind one
ASGI app with :func:`hearth.service.web.compose`, on the same database."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from hearth.service.api import create_app
from hearth.service.commands import InMemoryCommandPublisher
from hearth.service.config import Settings
from hearth.service.disclosure import create_router
from hearth.service.disclosure.service import DisclosureService
from hearth.service.web import compose, create_web_app

from .conftest import BASE


def test_operator_api_and_web_app_compose(tmp_path: Path, sessions: sessionmaker[Session],
                                          service: DisclosureService, team_token: str) -> None:
    api = create_app(Settings(data_dir=tmp_path), session_factory=sessions,
                     command_publisher=InMemoryCommandPublisher(), revoker=None)
    app = compose(api, create_web_app(create_router(service)))
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/api/v1/units").status_code == 401  # still the operator API's rules
        assert c.get("/api/v1/units", headers={
            "Authorization": f"Bearer {team_token}"}).status_code == 200
        assert c.get("/healthz").status_code == 200
        assert c.get("/.well-known/security.txt").status_code == 200  # public, no token
        assert c.get("/security/report").status_code == 200
        assert c.post("/api/v1/disclosure/challenge").status_code == 200
        r = c.get("/api/v1/disclosure/triage/reports",
                  headers={"Authorization": f"Bearer {team_token}"})
        assert r.status_code == 200 and r.json() == {"reports": []}
