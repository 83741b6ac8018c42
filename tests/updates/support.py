"""Test helpers for the update system: a controllable clock, bundles, and a real HTTP(S)
server that serves a repository directory the way the service will (``/metadata/``,
``/targets/``), with a request log, byte ranges, a bearer token, and hooks an attack test
uses to replace what is served."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hearth.device.slots import provision_factory_image
from hearth.device.updater import install_trusted_root
from hearth.pki import MakerPKI, cert_to_pem, generate_key, key_to_pem
from hearth.updates.bundle import build_bundle, target_name_for
from hearth.updates.keys import OfflineRootKeys, init_root
from hearth.updates.repository import Repository

APP_FILES = {
    "app.py": "from lib import control\n\nVERSION = {version!r}\n",
    "lib/__init__.py": "",
    "lib/control.py": "def step(t):\n    return t  # {version}\n",
    "lib/data.bin": "",
}


class Clock:
    """A settable UTC clock for the repository."""

    def __init__(self, now: dt.datetime | None = None) -> None:
        self.now = now or dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta


def make_app(directory: Path, version: str, *, extra_bytes: int = 0) -> Path:
    """A small application tree; ``extra_bytes`` of incompressible data make it bigger."""
    for rel, text in APP_FILES.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(version=version))
    (directory / "lib" / "data.bin").write_bytes(os.urandom(extra_bytes))
    return directory


def make_bundle(
    tmp: Path,
    version: str,
    *,
    model: str = "thermostat",
    min_from: str = "0.0.0",
    extra_bytes: int = 0,
) -> Path:
    app = make_app(tmp / f"src-{model}-{version}", version, extra_bytes=extra_bytes)
    out = tmp / "bundles" / f"{model}-{version}.tar"
    build_bundle(app, model=model, version=version, min_from_version=min_from, out=out)
    return out


@dataclass
class World:
    """A repository with its offline root keys, and helpers to publish and provision."""

    tmp: Path
    root_keys: OfflineRootKeys
    repo: Repository
    clock: Clock

    def publish(
        self, version: str, *, model: str = "thermostat", min_from: str = "0.0.0",
        extra_bytes: int = 0,
    ) -> str:
        bundle = make_bundle(self.tmp, version, model=model, min_from=min_from,
                             extra_bytes=extra_bytes)
        self.repo.publish(bundle, model=model, version=version, min_from_version=min_from)
        return target_name_for(model, version)

    def provision(self, unit_dir: Path, target_name: str) -> None:
        """What factory.mint will do: trust anchor, then the factory image in slot A."""
        install_trusted_root(unit_dir, self.repo.trusted_root())
        provision_factory_image(unit_dir, self.repo.target_file(target_name),
                                self.repo.delivery(target_name))


def make_world(tmp: Path, *, clock: Clock | None = None) -> World:
    clock = clock or Clock()
    keys = init_root(tmp / "offline-root", threshold=2, count=3)
    repo = Repository.create(tmp / "service" / "updates",
                             online_keys_dir=tmp / "service" / "update-keys",
                             root_keys=keys, clock=clock)
    return World(tmp, keys, repo, clock)


def bare_unit(directory: Path, model: str = "thermostat") -> Path:
    """A unit directory with only what the update code reads (unit.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "unit.json").write_text(json.dumps({"format": 1, "model": model}))
    return directory


# --- the server -----------------------------------------------------------------------------------
@dataclass
class Request:
    path: str
    range: str | None
    authorized: bool
    bytes_sent: int = 0


@dataclass
class RepoServer:
    """Serves ``root/metadata`` at ``/metadata/`` and ``root/targets`` at ``/targets/``."""

    root: Path
    token: str | None = None
    tls: ssl.SSLContext | None = None
    requests: list[Request] = field(default_factory=list)
    overrides: dict[str, bytes] = field(default_factory=dict)
    """Serve these bytes for a URL path instead of the file (an attacker on the path)."""
    endless: set[str] = field(default_factory=set)
    """URL paths answered with an endless stream of bytes."""
    _httpd: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        scheme = "https" if self.tls else "http"
        name = "localhost" if self.tls else str(host)
        return f"{scheme}://{name}:{port}"

    @property
    def metadata_url(self) -> str:
        return f"{self.base}/metadata/"

    @property
    def targets_url(self) -> str:
        return f"{self.base}/targets/"

    def count(self, pattern: str) -> int:
        return sum(1 for r in self.requests if re.search(pattern, r.path))

    def start(self) -> RepoServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                authorized = server.token is None or (
                    self.headers.get("Authorization") == f"Bearer {server.token}"
                )
                req = Request(self.path, self.headers.get("Range"), authorized)
                server.requests.append(req)
                if not authorized:
                    self._send(401, b"unauthorized")
                    return
                if self.path in server.endless:
                    self._endless(req)
                    return
                data = server.overrides.get(self.path)
                if data is None:
                    data = self._file()
                if data is None:
                    self._send(404, b"not found")
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", req.range or "")
                if m and int(m.group(1)) < len(data):
                    start = int(m.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                elif m:
                    self._send(416, b"")
                    return
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                req.bytes_sent = len(body)

            def _file(self) -> bytes | None:
                for prefix, sub in (("/metadata/", "metadata"), ("/targets/", "targets")):
                    if self.path.startswith(prefix):
                        rel = self.path[len(prefix):]
                        if ".." in rel or rel.startswith("/"):
                            return None
                        path = server.root / sub / rel
                        return path.read_bytes() if path.is_file() else None
                return None

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _endless(self, req: Request) -> None:
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b"\0" * 65536
                try:
                    while req.bytes_sent < 512 * 1024 * 1024:  # a bound for the test itself
                        self.wfile.write(chunk)
                        req.bytes_sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                    pass
                self.close_connection = True

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        if self.tls is not None:
            httpd.socket = self.tls.wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()


def server_tls(pki: MakerPKI, directory: Path) -> ssl.SSLContext:
    """A TLS server context with a certificate for localhost from the maker's service CA."""
    key = generate_key()
    cert = pki.issue_server_cert(key.public_key(), ["localhost", "127.0.0.1"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.pem").write_bytes(cert_to_pem(cert) + cert_to_pem(pki.service_ca.cert))
    (directory / "server.key").write_bytes(key_to_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(directory / "server.pem", directory / "server.key")
    return ctx

