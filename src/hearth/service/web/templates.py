"""Jinja2 rendering for the companion web app: autoescaping everywhere, CSRF built in.

:class:`Templates` looks templates up in the capability's own package first, then in
``hearth.service.web`` (which holds ``base.html``). Autoescaping is on for every template
whatever its name (``autoescape=True``, not extension-based), undefined variables raise,
and the ``|safe`` filter is removed so untrusted text cannot be marked safe by accident.
Every render puts a ``csrf_token`` in the context and sets the CSRF cookie when needed.

Example::

    templates = Templates("hearth.service.disclosure", csrf=csrf, site_name="Acme")
    return templates.render(request, "policy.html", {"deadline": ...})
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from hearth.service.web.csrf import CsrfProtection
from hearth.service.web.security import apply_security_headers
from hearth.service.web.static import static_url

__all__ = ["Templates"]


def _format_time(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _format_date(value: dt.datetime | dt.date | None) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        value = value.astimezone(dt.UTC).date()
    return value.isoformat()


class Templates:
    """A Jinja2 environment for one capability (``package`` holds ``templates/``)."""

    def __init__(
        self,
        *packages: str,
        csrf: CsrfProtection,
        site_name: str = "Hearth",
        hsts: bool = False,
        globals: Mapping[str, Any] | None = None,
    ) -> None:
        loaders: list[jinja2.BaseLoader] = [jinja2.PackageLoader(p, "templates") for p in packages]
        loaders.append(jinja2.PackageLoader("hearth.service.web", "templates"))
        self.env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.pop("safe", None)
        self.env.filters["time"] = _format_time
        self.env.filters["date"] = _format_date
        self.env.globals.update(
            {"static_url": static_url, "site_name": site_name, **(globals or {})}
        )
        self._csrf = csrf
        self._hsts = hsts

    def render(
        self,
        request: Request,
        name: str,
        context: Mapping[str, Any] | None = None,
        *,
        status_code: int = 200,
        no_store: bool = False,
    ) -> HTMLResponse:
        """Render ``name`` with ``context`` (+ ``csrf_token``, ``path``) as an HTML response.

        ``no_store`` marks pages that show secrets or private data (never cached).
        """
        token, new_cookie = self._csrf.issue(request)
        ctx = {"csrf_token": token, "path": request.url.path, **(context or {})}
        body = self.env.get_template(name).render(ctx)
        response = HTMLResponse(body, status_code=status_code)
        if new_cookie is not None:
            self._csrf.set_cookie(response, new_cookie)
        if no_store:
            response.headers["Cache-Control"] = "no-store"
        return apply_security_headers(response, hsts=self._hsts)
