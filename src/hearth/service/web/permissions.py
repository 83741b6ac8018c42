"""Declaring who may call a web route (checked at app build time and by a test)."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

__all__ = ["declare", "route_declaration"]


class _Declared:
    """Dependency recording the permission a web route needs (see :func:`declare`)."""

    def __init__(self, permission: str) -> None:
        self.permission = permission

    def __call__(self, request: Request) -> None:
        request.state.permission = self.permission


def declare(permission: str) -> Any:
    """``Depends`` marker: the route is callable by ``permission`` (e.g. ``"public"``).

    The route itself enforces anything beyond ``public``; this makes the decision explicit
    and checkable."""
    return Depends(_Declared(permission))


def route_declaration(route: BaseRoute) -> str | None:
    if not isinstance(route, APIRoute):
        return None
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, _Declared):
            return dep.call.permission
        stack.extend(dep.dependencies)
    return None
