"""``hearth up``: the whole service on one machine (the embedded default).

One :class:`Stack` runs, in one process:

* the database (SQLite in the data directory, or PostgreSQL), migrated to head;
* the maker PKI (created on first start) and a supervised Mosquitto broker
  (:class:`hearth.service.broker.Broker`) configured from the fleet registry;
* ``ingest_workers`` ingest workers on the broker's shared subscription;
* the command publisher (``hearth-control`` identity);
* the HTTPS API (uvicorn, TLS 1.2+, its own certificate from the service CA) and, on the
  same listener, the public web app (vulnerability disclosure policy and intake,
  security.txt, advisories in CSAF 2.0, product pages);
* a reconciler that keeps the broker in step with the registry every few seconds: units
  imported with ``hearth fleet import`` while the service runs become able to connect,
  units revoked from the CLI lose their session, expired commands are marked so.

On first start a random operator API token is created and returned once by
:meth:`Stack.start` (only its hash is stored). Ctrl-C (SIGINT) or SIGTERM stops
everything: API first, then ingest (flushing what it holds), then the broker.
"""

from __future__ import annotations

import collections
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from cryptography import x509
from fastapi import APIRouter
from sqlalchemy.orm import Session
from starlette.types import ASGIApp

from hearth._fsutil import atomic_write, write_secret
from hearth.errors import HearthError
from hearth.pki import MakerPKI, cert_from_pem, cert_to_pem, generate_key, key_to_pem
from hearth.service import auth, db, fleet
from hearth.service.accounts.wiring import AccountsService, accounts_router, build_accounts
from hearth.service.api import create_app
from hearth.service.broker import Broker, BrokerUnit
from hearth.service.broker_log import LogWatch
from hearth.service.broker_log import record as record_refusals
from hearth.service.commands import CommandService, MqttCommandPublisher
from hearth.service.config import Settings
from hearth.service.disclosure import DisclosureConfig, DisclosureService, create_router
from hearth.service.ingest import IngestCore, IngestWorker
from hearth.service.models import Unit, UnitStatus
from hearth.service.updates.service import UpdateService
from hearth.service.web import SecretPathFilter, compose, create_web_app

__all__ = ["Stack", "StartInfo"]

log = logging.getLogger("hearth.runner")

RECONCILE_INTERVAL = 2.0
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class StartInfo:
    api_url: str
    mqtt_host: str
    mqtt_port: int
    operator_token: str | None = field(repr=False)
    """The operator API token, only on the very first start; ``None`` afterwards."""
    units: int


class _Revoker:
    """Connects the API's revoke route to the broker."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def revoke(self, device_id: str, cert: x509.Certificate) -> None:
        self._broker.revoke(device_id, cert)


def broker_units(units: list[Unit]) -> list[BrokerUnit]:
    return [
        BrokerUnit(u.device_id, dict(u.mqtt_password_hash), enabled=u.status == UnitStatus.ACTIVE)
        for u in units
    ]


class Stack:
    """The service, the ingest workers and the broker, started and stopped together."""

    def __init__(self, settings: Settings, *, ingest_workers: int = 1) -> None:
        if not 1 <= ingest_workers <= 64:
            raise HearthError("ingest_workers must be 1..64")
        self.settings = settings
        self._n_workers = ingest_workers
        self.engine = db.make_engine(settings.database_url)
        self.session_factory = db.session_factory(self.engine)
        self.pki: MakerPKI | None = None
        self.broker: Broker | None = None
        self.workers: list[IngestWorker] = []
        self.publisher: MqttCommandPublisher | None = None
        self.updates: UpdateService | None = None
        self._server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None
        self.accounts: AccountsService | None = None
        self.broker_log: LogWatch | None = None
        self._unrecorded_refusals: collections.Counter[str] = collections.Counter()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> StartInfo:
        """Start everything; returns when the API answers and the broker serves mTLS.

        Raises:
            HearthError: a part could not start (the message says which and why).
        """
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        db.migrate(self.engine)
        with self.session_factory() as session:
            token = auth.ensure_first_token(session)
            session.commit()
            units = _all_units(session)
        self.pki = MakerPKI.load_or_create(s.pki_dir)
        self.broker = Broker(
            s.data_dir / "broker", self.pki, host=s.mqtt_host, port=s.mqtt_port,
            units=broker_units(units),
            ingest_sessions=[f"hearth-ingest-{i}" for i in range(self._n_workers)],
        )
        # from the end of what earlier runs logged: only this run's refusals are new
        self.broker_log = LogWatch(self.broker.log_path)
        try:
            self.broker.start()
            self.publisher = MqttCommandPublisher(self.broker.identity("hearth-control"))
            self.publisher.start()
            self.updates = UpdateService(s.data_dir, self.session_factory)
            self.updates.start(self.broker.identity("hearth-updates"))
            ingest_identity = self.broker.identity("hearth-ingest")
            for i in range(self._n_workers):
                core = IngestCore(
                    self.session_factory, batch_size=s.ingest_batch_size,
                    flush_interval=s.ingest_flush_ms / 1000,
                    excerpt_bytes=s.quarantine_excerpt_bytes,
                )
                worker = IngestWorker(ingest_identity, core, client_id=f"hearth-ingest-{i}")
                worker.start()
                self.workers.append(worker)
            self._start_api()
        except BaseException:
            self.stop()
            raise
        self._reconciler = threading.Thread(target=self._reconcile_loop, name="hearth-reconcile",
                                            daemon=True)
        self._reconciler.start()
        return StartInfo(
            api_url=f"https://{_url_host(s.http_host)}:{self.http_port}",
            mqtt_host=s.mqtt_host, mqtt_port=s.mqtt_port, operator_token=token,
            units=len(units),
        )

    def stop(self) -> None:
        """Stop everything (API, reconciler, ingest, publisher, broker). Idempotent."""
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._server_thread is not None:
            self._server_thread.join(timeout=10)
            self._server_thread = None
        if self._reconciler is not None:
            self._reconciler.join(timeout=10)
            self._reconciler = None
        for worker in self.workers:
            worker.stop()
        self.workers = []
        if self.updates is not None:
            self.updates.stop()
            self.updates = None
        if self.publisher is not None:
            self.publisher.stop()
            self.publisher = None
        if self.broker is not None:
            self.broker.stop()
        self.engine.dispose()

    def wait(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Block until :meth:`stop` is called, the API server exits or ``should_stop()``."""
        while not self._stop.is_set():
            if should_stop is not None and should_stop():
                return
            if self._server_thread is not None and not self._server_thread.is_alive():
                return
            self._stop.wait(0.2)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTPS API ----------------------------------------------------------------------------
    @property
    def http_port(self) -> int:
        return self.settings.http_port

    def _http_cert(self) -> tuple[Path, Path]:
        """The API's server certificate (service CA), reissued when close to expiry."""
        assert self.pki is not None
        d = self.settings.data_dir / "http"
        cert_path, key_path = d / "server.pem", d / "server.key"
        if cert_path.exists() and key_path.exists():
            cert = cert_from_pem(cert_path.read_bytes())
            remaining = cert.not_valid_after_utc.timestamp() - time.time()
            if remaining > 30 * 86400:
                return cert_path, key_path
        key = generate_key()
        names = sorted({*SERVER_NAMES, self.settings.http_host})
        cert = self.pki.issue_server_cert(key.public_key(), names)
        write_secret(key_path, key_to_pem(key))
        atomic_write(cert_path, cert_to_pem(cert) + cert_to_pem(self.pki.service_ca.cert))
        return cert_path, key_path

    def _secret_key(self) -> str:
        """The web app's signing key: ``HEARTH_SECRET_KEY`` or a random one kept (0600)
        in the data directory - outside the database, stable across restarts."""
        if self.settings.extra.get("HEARTH_SECRET_KEY"):
            return self.settings.extra["HEARTH_SECRET_KEY"]
        path = self.settings.data_dir / "secrets" / "web-signing.key"
        if not path.exists():
            write_secret(path, secrets.token_hex(32).encode())
        return path.read_text().strip()

    def _web_app(self) -> ASGIApp:
        """The public web app (disclosure policy, report intake, advisories, products)."""
        env = dict(self.settings.extra)
        host = self.settings.http_host
        public_host = "localhost" if host in ("127.0.0.1", "::1") else _url_host(host)
        base = env.get("HEARTH_BASE_URL") or f"https://{public_host}:{self.settings.http_port}"
        env.setdefault("HEARTH_BASE_URL", base)
        env.setdefault("HEARTH_DISCLOSURE_ORGANISATION", "Hearth Maker")
        env.setdefault("HEARTH_DISCLOSURE_CONTACTS", f"{base}/security/report")
        env["HEARTH_SECRET_KEY"] = self._secret_key()
        self.accounts = build_accounts(self.settings, env, self.session_factory, self.publisher)
        disclosure = DisclosureService(DisclosureConfig.from_env(env), self.session_factory,
                                       support_period=self._support_period(),
                                       team_session=self.accounts.security_actor)
        update_pages = self._update_routers(disclosure.config)
        logging.getLogger("uvicorn.access").addFilter(SecretPathFilter())
        return create_web_app(create_router(disclosure), accounts_router(self.accounts),
                              *update_pages)

    # -- signed updates (hearth.service.updates) -------------------------------------------------
    def _support_period(self) -> Callable[[str], object] | None:
        from hearth.service.updates.web import support_period_provider

        return support_period_provider(self.updates) if self.updates is not None else None

    def _update_routers(self, config: DisclosureConfig) -> list[APIRouter]:
        """The repository routes (update token) and the operator updates page."""
        from hearth.service.updates.files import create_files_router
        from hearth.service.updates.web import create_web_router

        if self.updates is None:
            return []
        return [create_files_router(self.updates),
                create_web_router(self.updates, secret_key=config.secret_key,
                                  base_url=config.base_url,
                                  secure_cookies=config.secure_cookies,
                                  site_name=config.organisation)]

    def _api_routers(self) -> list[APIRouter]:
        from hearth.service.updates.api import create_api_router

        return [create_api_router(self.updates)] if self.updates is not None else []

    def _start_api(self) -> None:
        assert self.broker is not None and self.publisher is not None
        api = create_app(
            self.settings, session_factory=self.session_factory,
            command_publisher=self.publisher, revoker=_Revoker(self.broker),
            routers=self._api_routers(),
        )
        app = compose(api, self._web_app())
        cert_path, key_path = self._http_cert()
        config = uvicorn.Config(
            app, host=self.settings.http_host, port=self.settings.http_port,
            ssl_certfile=str(cert_path), ssl_keyfile=str(key_path),
            log_level="warning", access_log=False, server_header=False, lifespan="off",
        )
        config.load()
        assert config.ssl is not None
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        server = uvicorn.Server(config)
        self._server = server
        thread = threading.Thread(target=server.run, name="hearth-api", daemon=True)
        self._server_thread = thread
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive():
                raise HearthError(
                    f"the HTTPS API could not start on {self.settings.http_host}:"
                    f"{self.settings.http_port} (port in use?)"
                )
            if time.monotonic() > deadline:
                raise HearthError("the HTTPS API did not start within 15 s")
            time.sleep(0.05)

    # -- registry -> broker --------------------------------------------------------------------
    def reconcile(self) -> None:
        """Bring the broker in step with the registry (imports, revocations, expiry)."""
        assert self.broker is not None
        with self.session_factory() as session:
            units = _all_units(session)
        with self.session_factory() as session:
            # A write transaction of its own, taken up front: upgrading a read transaction
            # to a write fails at once in SQLite when ingest committed in between.
            db.begin_write(session)
            CommandService.expire_due(session)
            session.commit()
        known = self.broker.units
        new = [u for u in units if u.device_id not in known and u.status == UnitStatus.ACTIVE]
        if new:
            log.info("registering %d newly imported unit(s) with the broker", len(new))
            self.broker.add_units_live(broker_units(new))
        for unit in units:
            b = known.get(unit.device_id)
            if unit.status == UnitStatus.REVOKED and b is not None and b.enabled:
                log.info("revoking unit %s at the broker", unit.device_id)
                self.broker.revoke(unit.device_id, cert_from_pem(unit.certificate_pem.encode()))
        if self.accounts is not None:  # owner bindings and resets the units must still hear
            self.accounts.reconcile()
        self.count_broker_refusals()

    def count_broker_refusals(self) -> None:
        """Add what the broker refused since the last call to ``broker_refusals``."""
        if self.broker_log is None:
            return
        counts = self._unrecorded_refusals
        counts.update(self.broker_log.read())  # kept until written: a failed write loses none
        if not counts:
            return
        with self.session_factory() as session:
            db.begin_write(session)
            record_refusals(session, counts, db.utcnow())
            session.commit()
        log.info("broker refused: %s", ", ".join(f"{r} {n}" for r, n in sorted(counts.items())))
        counts.clear()

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(RECONCILE_INTERVAL):
            try:
                self.reconcile()
            except HearthError as e:
                log.warning("reconcile failed: %s", e)
            except Exception:
                log.exception("reconcile failed")


def _all_units(session: Session) -> list[Unit]:
    out: list[Unit] = []
    after: str | None = None
    while True:
        page = fleet.list_units(session, limit=1000, after=after)
        out.extend(page)
        if len(page) < 1000:
            return out
        after = page[-1].device_id


def _url_host(host: str) -> str:
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return host
    return f"[{host}]"
