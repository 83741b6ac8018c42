"""The unit's local API: offline control over HTTPS on the home network (guidelines 1, 5, 6).

This is the only socket a unit listens on (``docs/device-ports.md``). It exists so the
owner's app can control the unit when the internet or the cloud is down, and it accepts:

* only TLS (1.2 or newer) with the unit's own key and certificate - a plain-HTTP request
  gets no answer, the handshake simply fails. The owner's app pins the certificate the
  service showed it at claim time (:class:`LocalClient` compares the SHA-256 fingerprint
  before it sends anything), so no web PKI and no hostname is involved;
* ``Authorization: Bearer <credential>`` where the credential is the owner's local-access
  credential (issued at claim time, delivered to the unit as a verifier by ``bind_owner``)
  or - only while the unit is unclaimed - its own setup code. Nothing else: no default
  password, no unauthenticated endpoint.

Guessing is throttled: after ``free_failures`` failed attempts each further attempt must
wait ``backoff_base * 2**n`` seconds (at most ``backoff_cap``), counted for the unit as a
whole, so spreading guesses over addresses does not help. During a wait no setup code is
checked at all (429). The owner's credential (256 bits) is always checked, so a neighbour
guessing setup codes cannot lock the owner out. Requests are small (``max_body``), at most
``max_connections`` are served at once, and a client must finish its TLS handshake within
``handshake_timeout`` seconds.

Endpoints (JSON)::

    GET  /v1/status     device id, model, claimed or not, current readings
    POST /v1/commands   {"name": ..., "params": {...}}: one of the model's commands

Example::

    api = LocalApi(identity, owner=OwnerStore(unit_dir), app=app,
                   config=LocalApiConfig(host="0.0.0.0", port=8444))
    api.start()
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hearth.device.apps import DeviceApp
from hearth.device.apps._base import check_command
from hearth.device.identity import UnitIdentity
from hearth.device.owner import OwnerStore
from hearth.errors import DeviceError, ValidationError

__all__ = ["DEFAULT_PORT", "LocalApi", "LocalApiConfig", "LocalClient", "parse_listen"]

DEFAULT_PORT = 8444
_log = logging.getLogger("hearth.device.localapi")


@dataclass(frozen=True)
class LocalApiConfig:
    """Where the local API listens and how hard it is to guess at. ``port=0``: any free
    port (tests)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_body: int = 4096
    max_connections: int = 8
    free_failures: int = 5
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    handshake_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0..65535")
        if self.max_body < 256 or self.max_connections < 1 or self.free_failures < 0:
            raise ValueError("max_body >= 256, max_connections >= 1, free_failures >= 0")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ValueError("0 < backoff_base <= backoff_cap")


class _Guard:
    """Failed-attempt counter with exponential backoff (one per unit)."""

    def __init__(self, config: LocalApiConfig, clock: Callable[[], float]) -> None:
        self._c = config
        self._clock = clock
        self._lock = threading.Lock()
        self.failures = 0
        self._last = 0.0

    def wait(self) -> float:
        with self._lock:
            if self.failures < self._c.free_failures:
                return 0.0
            exponent = min(self.failures - self._c.free_failures, 30)
            delay = min(self._c.backoff_cap, self._c.backoff_base * (1 << exponent))
            return max(0.0, self._last + delay - self._clock())

    def fail(self) -> None:
        with self._lock:
            self.failures += 1
            self._last = self._clock()

    def succeed(self) -> None:
        with self._lock:
            self.failures = 0


class LocalApi:
    """The unit's HTTPS server. :meth:`start` binds and serves on a thread."""

    def __init__(
        self,
        identity: UnitIdentity,
        *,
        owner: OwnerStore,
        app: DeviceApp,
        config: LocalApiConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.owner = owner
        self.app = app
        self.config = config or LocalApiConfig()
        self.guard = _Guard(self.config, clock)
        self.refused: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        try:
            cert_file, key_file = identity.keystore.tls_credentials()
        except DeviceError as e:
            raise DeviceError("the local API needs a key Python's TLS can use; this key "
                              f"store cannot provide one ({e})") from e
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION
        ctx.load_cert_chain(str(cert_file), str(key_file))
        self._ctx = ctx

    @property
    def port(self) -> int:
        if self._server is None:
            raise DeviceError("the local API is not started")
        port: int = self._server.server_address[1]
        return port

    def count(self, reason: str) -> None:
        with self._stats_lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def start(self) -> None:
        if self._server is not None:
            return
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        server_cls = type("_BoundServer", (_Server,), {"address_family": family})
        try:
            self._server = server_cls((self.config.host, self.config.port), self)
        except OSError as e:
            raise DeviceError(f"the local API cannot listen on {self.config.host}:"
                              f"{self.config.port}: {e.strerror}") from e
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="hearth-localapi", daemon=True)
        self._thread.start()
        _log.info("local API listening on %s:%d (TLS)", self.config.host, self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- authentication ----------------------------------------------------------------

    def authenticate(self, header: str | None) -> tuple[int, str]:
        """``(200, "owner"|"setup")`` or ``(401|429, reason)``."""
        scheme, _, credential = (header or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential or len(credential) > 128:
            self.count("no_credential")
            return 401, "no_credential"
        if self.owner.claimed:
            if self.owner.check_owner_credential(credential):
                return 200, "owner"
            self.guard.fail()
            self.count("wrong_credential")
            return 401, "wrong_credential"
        if self.guard.wait() > 0:
            self.count("rate_limited")
            return 429, "rate_limited"
        if self.owner.check_setup_code(credential):
            self.guard.succeed()
            return 200, "setup"
        self.guard.fail()
        self.count("wrong_credential")
        return 401, "wrong_credential"

    # -- endpoints -----------------------------------------------------------------------

    def status(self, who: str) -> dict[str, Any]:
        return {"device_id": self.identity.device_id, "model": self.identity.model.name,
                "claimed": self.owner.claimed, "access": who, "readings": self.app.readings()}

    def command(self, body: Mapping[str, Any]) -> dict[str, Any]:
        name, params = body.get("name"), body.get("params", {})
        if not isinstance(name, str) or not isinstance(params, dict):
            raise ValidationError("invalid_schema", "send {\"name\": ..., \"params\": {...}}")
        check_command(self.identity.model, name, params)  # the model's commands only
        self.app.execute(name, params)
        return {"status": "succeeded", "readings": self.app.readings()}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: LocalApi) -> None:
        self.api = api
        self._slots = threading.BoundedSemaphore(api.config.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.api.count("too_many_connections")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake here, on the connection's own thread, under a deadline."""
        request.settimeout(self.api.config.handshake_timeout)
        try:
            tls = self.api._ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.api.count("tls_refused")
            return
        try:
            _Handler(tls, client_address, self)
        finally:
            try:
                tls.close()
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "hearth-unit"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return  # requests may carry credentials in headers; never logged

    def _send(self, status: int, body: Mapping[str, Any],
              headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _auth(self) -> str | None:
        api = self.server.api
        status, who = api.authenticate(self.headers.get("Authorization"))
        if status == 200:
            return who
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {
            "Retry-After": str(int(api.guard.wait()) + 1)}
        self._send(status, {"error": who}, headers)
        return None

    def do_GET(self) -> None:
        if self.path != "/v1/status":
            self._send(404, {"error": "not_found"})
            return
        who = self._auth()
        if who is not None:
            self._send(200, self.server.api.status(who))

    def do_POST(self) -> None:
        api = self.server.api
        if self.path != "/v1/commands":
            self._send(404, {"error": "not_found"})
            return
        who = self._auth()
        if who is None:
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > api.config.max_body:
            if length.isdigit() and int(length) <= 16 * api.config.max_body:
                self.rfile.read(int(length))  # drain a little, so the client reads the 413
            self._send(413, {"error": "request_too_large"})
            return
        try:
            body = json.loads(self.rfile.read(int(length)))
            if not isinstance(body, dict):
                raise ValueError("not an object")
            self._send(200, api.command(body))
        except ValidationError as e:
            self._send(400, {"error": e.reason, "detail": e.detail})
        except (ValueError, UnicodeDecodeError):
            self._send(400, {"error": "malformed_json"})


class LocalClient:
    """The owner's side: HTTPS to the unit, pinned to the certificate fingerprint the
    service gave at claim time (checked before any request is sent)."""

    def __init__(self, host: str, port: int, *, fingerprint: str, credential: str,
                 timeout: float = 5.0) -> None:
        self.host, self.port = host, port
        self._fp = fingerprint.lower().replace(":", "")
        self._credential = credential
        self._timeout = timeout

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None
                ) -> tuple[int, dict[str, Any]]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin below replaces the web PKI
        conn = http.client.HTTPSConnection(self.host, self.port, context=ctx,
                                           timeout=self._timeout)
        try:
            conn.connect()
            assert conn.sock is not None
            der = conn.sock.getpeercert(binary_form=True)
            if der is None or hashlib.sha256(der).hexdigest() != self._fp:
                raise DeviceError("the unit's certificate does not match the pinned one")
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Authorization": f"Bearer {self._credential}"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = json.loads(resp.read() or b"{}")
            return resp.status, payload if isinstance(payload, dict) else {}
        finally:
            conn.close()


def parse_listen(text: str) -> LocalApiConfig | None:
    """``"HOST:PORT"`` (IPv6 as ``[::1]:8444``) -> a config; ``"off"`` -> ``None``."""
    text = text.strip()
    if text.lower() == "off":
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValidationError("invalid_listen", "give HOST:PORT (for example 0.0.0.0:8444) "
                              "or 'off'")
    return LocalApiConfig(host=host, port=int(port))
