"""Small helpers shared by all tests: waiting with a deadline, free ports, a plain-TCP probe."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    This is how tests wait: never a bare sleep. Returns the truthy value.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate!r}")
        time.sleep(interval)  # polling interval, not a wait for an outcome


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def plain_mqtt_connect(host: str, port: int) -> bytes:
    """Send an MQTT CONNECT over plain TCP (no TLS) to ``host:port``; return what came
    back (``b""`` when the server closed or reset the connection)."""
    packet = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 0])
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(packet)
        try:
            return s.recv(16)
        except OSError:
            return b""
