"""The web foundation: strict CSP and security headers everywhere, no inline script or
style, autoescaping, CSRF, every route declaring who may call it, and the composition with
the operator API."""

from __future__ import annotations

import re
from importlib import resources

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from hearth.service.web import (
    CONTENT_SECURITY_POLICY,
    SecretPathFilter,
    compose,
    create_web_app,
    iter_web_routes,
)

from .conftest import FrozenClock, file_via_form, status_token_from

PAGES = ["/security/policy", "/security/report", "/security/advisories", "/products",
         "/products/lock", "/security/triage/login", "/.well-known/security.txt",
         "/.well-known/csaf/white/", "/api/v1/disclosure/challenge"]


@pytest.mark.parametrize("path", PAGES)
def test_every_response_has_the_security_headers(client: TestClient, path: str) -> None:
    r = client.post(path) if "challenge" in path else client.get(path)
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'self'", "frame-ancestors 'none'", "form-action 'self'",
                      "base-uri 'none'", "object-src 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "max-age" in r.headers["strict-transport-security"]


def test_unknown_paths_get_headers_too(client: TestClient) -> None:
    r = client.get("/no/such/page")
    assert r.status_code == 404 and r.headers["content-security-policy"] == (
        CONTENT_SECURITY_POLICY)


def test_templates_have_no_inline_script_style_or_handlers() -> None:
    for package in ("hearth.service.web", "hearth.service.disclosure"):
        for t in (resources.files(package) / "templates").iterdir():
            html = t.read_text(encoding="utf-8")
            assert not re.search(r"<script|<style|\sstyle=|\son[a-z]+=|javascript:", html,
                                 re.I), t.name
            assert "|safe" not in html.replace(" ", "") and "autoescape false" not in html


def test_autoescape_is_on_and_the_safe_filter_is_gone() -> None:
    import jinja2

    from hearth.service.web import Templates
    from hearth.service.web.csrf import CsrfProtection
    from hearth.service.web.signing import Signer

    t = Templates(csrf=CsrfProtection(Signer(b"k" * 32), allowed_origins=set()))
    with pytest.raises(jinja2.TemplateAssertionError):
        t.env.from_string("{{ x | safe }}")
    assert t.env.from_string("{{ x }}").render(x="<b>") == "&lt;b&gt;"


def test_static_files(client: TestClient) -> None:
    page = client.get("/security/policy").text
    css = re.search(r'href="(/static/hearth\.css\?v=[0-9a-f]+)"', page)
    assert css
    r = client.get(css.group(1))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    assert "immutable" in r.headers["cache-control"]
    assert client.get("/static/../pyproject.toml").status_code == 404
    assert client.get("/static/nope.css").status_code == 404


def test_every_route_declares_who_may_call_it(client: TestClient) -> None:
    app = client.app
    assert isinstance(app, FastAPI)
    routes = list(iter_web_routes(app.routes))
    assert len(routes) > 30
    declared = {p for _, _, p in routes if p}
    assert declared == {"public", "reporter", "disclosure:triage"}
    undeclared = [path for path, _, perm in routes
                  if perm is None and not path.endswith("openapi.json")]
    assert undeclared == []
    for path, _, perm in routes:
        if "/triage/" in path and not path.endswith("/login"):
            assert perm == "disclosure:triage", path


def test_create_web_app_refuses_an_undeclared_route() -> None:
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/oops")
    def oops() -> dict[str, str]:
        return {}

    with pytest.raises(RuntimeError, match="declares no permission"):
        create_web_app(router)


def test_compose_routes_by_path(client: TestClient) -> None:
    api = FastAPI()

    @api.get("/api/v1/units")
    def units() -> JSONResponse:
        return JSONResponse({"from": "api"})

    @api.get("/healthz")
    def health() -> JSONResponse:
        return JSONResponse({"from": "api"})

    web = client.app
    with TestClient(compose(api, web), base_url="https://hearth.example") as both:
        assert both.get("/api/v1/units").json() == {"from": "api"}
        assert both.get("/healthz").json() == {"from": "api"}
        assert both.get("/security/policy").status_code == 200
        assert both.post("/api/v1/disclosure/challenge").status_code == 200


def test_status_links_are_redacted_from_access_logs(client: TestClient,
                                                    clock: FrozenClock) -> None:
    import logging

    token = status_token_from(file_via_form(client, clock))
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1", "GET", f"/security/status/{token}?new=1", "1.1",
                                200), None)
    assert SecretPathFilter().filter(record)
    assert token not in record.getMessage()
    assert "/security/status/[redacted]?new=1" in record.getMessage()
