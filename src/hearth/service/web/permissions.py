"""Declaring who may call a web route (checked at app build time and by a test)."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

__all__ = ["declare", "find_marker", "route_declaration"]

_M = TypeVar("_M")


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


def find_marker(route: BaseRoute, kind: type[_M]) -> _M | None:
    """The first dependency of ``route`` (searched through nested dependencies) that is an
    instance of ``kind`` - how a test finds the permission a route declares."""
    if not isinstance(route, APIRoute):
        return None
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, kind):
            return dep.call
        stack.extend(dep.dependencies)
    return None


def route_declaration(route: BaseRoute) -> str | None:
    marker = find_marker(route, _Declared)
    return marker.permission if marker is not None else None
