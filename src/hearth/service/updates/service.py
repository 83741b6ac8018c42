"""The updates capability's runtime object: repository, tokens, the answer to a unit's
update check, and the background work (re-signing, releases, unit events).

:class:`UpdateService` is built once by :class:`hearth.service.runner.Stack` and handed to
the repository routes (:mod:`.files`), the operator API (:mod:`.api`), the web pages
(:mod:`.web`) and the MQTT responder (:mod:`.responder`).

Background work (one thread, every ``tick_interval`` seconds):

* ``Repository.refresh_if_due()`` - re-signs the timestamp (1 day) and the other online
  roles at half-life, so honest metadata never expires on a unit;
* mirrors newly published releases (``hearth release publish`` while the service runs);
* applies the update events units sent (:func:`.rollouts.process_events`): rollout
  outcomes and halting, unit versions, integrity alerts.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sqlalchemy.orm import Session, sessionmaker

from hearth.errors import HearthError
from hearth.protocol import UpdateCheck, UpdateOffer
from hearth.service.db import begin_write, utcnow
from hearth.service.models import Unit, UnitStatus
from hearth.service.updates import rollouts
from hearth.service.updates.tokens import DEFAULT_TTL, UpdateTokens
from hearth.updates.errors import UpdateError
from hearth.updates.quickstart import repository_paths
from hearth.updates.repository import Repository

if TYPE_CHECKING:
    from hearth.service.mqtt import MqttIdentity
    from hearth.service.updates.responder import UpdateResponder

__all__ = ["ServedStats", "UpdateService"]

log = logging.getLogger("hearth.updates")

UNIT_CACHE_SECONDS = 5.0


@dataclass
class ServedStats:
    """What the repository routes served (for monitoring and ``bench/rollout.py``)."""

    requests: int = 0
    refused: int = 0
    """Requests without a valid token, of a unit not active, or with a bad range."""
    not_found: int = 0
    """Names that do not exist (ngclient asks for the next root version every time)."""
    bytes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += nbytes
            self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes

    def refuse(self) -> None:
        with self._lock:
            self.refused += 1

    def missing(self) -> None:
        with self._lock:
            self.not_found += 1


class UpdateService:
    """Everything the update routes, pages and the responder need, built once at start."""

    def __init__(
        self,
        data_dir: Path,
        sessions: sessionmaker[Session],
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        token_ttl: dt.timedelta = DEFAULT_TTL,
        tick_interval: float = 2.0,
        refresh_interval: float = 300.0,
    ) -> None:
        self.data_dir = data_dir
        self.sessions = sessions
        self.clock = clock
        self.tokens = UpdateTokens.from_data_dir(data_dir, ttl=token_ttl)
        self.repo_path, self._online_keys = repository_paths(data_dir)
        self._repo: Repository | None = None
        self.tick_interval = tick_interval
        self.refresh_interval = refresh_interval
        self.stats = ServedStats()
        self._units: dict[str, tuple[float, str | None]] = {}
        self._units_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_refresh = 0.0
        self._synced: int | None = -1
        self.responder: UpdateResponder | None = None

    def now(self) -> dt.datetime:
        return self.clock().astimezone(dt.UTC)

    # -- repository ----------------------------------------------------------------------------
    @property
    def repository(self) -> Repository | None:
        """The repository, or ``None`` until one was created (``hearth release init``)."""
        if self._repo is None and (self.repo_path / "metadata" / "1.root.json").exists():
            self._repo = Repository(self.repo_path, online_keys_dir=self._online_keys,
                                    clock=self.clock)
        return self._repo

    def unit_model(self, device_id: str) -> str | None:
        """The model of an *active* unit (cached a few seconds: one lookup per download
        burst, and a revocation still takes effect within seconds)."""
        import time

        now = time.monotonic()
        with self._units_lock:
            hit = self._units.get(device_id)
            if hit is not None and hit[0] > now:
                return hit[1]
        with self.sessions() as session:
            unit = session.get(Unit, device_id)
            model = unit.model if unit is not None and unit.status == UnitStatus.ACTIVE else None
        with self._units_lock:
            if len(self._units) > 100_000:
                self._units.clear()
            self._units[device_id] = (now + UNIT_CACHE_SECONDS, model)
        return model

    # -- a unit's update check -----------------------------------------------------------------
    def handle_check(self, check: UpdateCheck) -> UpdateOffer:
        """The answer to one :class:`UpdateCheck` (already parsed; its device id is the
        broker-authenticated sender). A unit that is unknown or revoked, or not in
        ``normal``/``trial`` mode, gets no token."""
        now = self.now()
        support_end: dt.date | None = None
        support_status: Literal["supported", "ending_soon", "ended", "undefined"] = "undefined"

        def offer(*, refused: str = "", token: str = "", expires: dt.datetime | None = None,
                  target: str | None = None, available: str | None = None) -> UpdateOffer:
            return UpdateOffer(device_id=check.device_id, request_id=check.request_id, ts=now,
                               token=token, token_expires_at=expires, target=target,
                               available=available, support_end=support_end,
                               support_status=support_status, refused=refused)

        with self.sessions() as session:  # most checks change nothing: no write lock then
            unit = session.get(Unit, check.device_id)
            if unit is None or unit.status != UnitStatus.ACTIVE:
                return offer(refused="unit_not_active")
            if check.mode == "normal" and rollouts.check_is_routine(
                    session, unit, version=check.version, running=check.running, now=now):
                period = rollouts.support_period(session, unit.model)
                if period is not None:
                    support_end, support_status = period.end_date, period.status(now).value
                token, expires = self.tokens.issue(check.device_id, unit.model, now=now)
                return offer(token=token, expires=expires)
        with self.sessions.begin() as session:
            begin_write(session)
            unit = session.get(Unit, check.device_id)
            if unit is None or unit.status != UnitStatus.ACTIVE:
                return offer(refused="unit_not_active")
            state = rollouts.record_check(session, unit.device_id, version=check.version,
                                          running=check.running, mode=check.mode, now=now)
            rollouts.note_version(session, unit.device_id, check.version, now=now)
            period = rollouts.support_period(session, unit.model)
            if period is not None:
                support_end, support_status = period.end_date, period.status(now).value
            if check.mode not in ("normal", "trial"):
                return offer(refused=f"unit_{check.mode}")
            assignment = (rollouts.assignment_for(session, unit, state, now=now)
                          if check.mode == "normal" else rollouts.Assignment(None, None))
            model = unit.model
        token, expires = self.tokens.issue(check.device_id, model, now=now)
        return offer(token=token, expires=expires, target=assignment.target,
                     available=assignment.available)

    # -- background work -----------------------------------------------------------------------
    def tick(self) -> None:
        """One round of background work (also callable from tests)."""
        import time

        repo = self.repository
        if repo is not None and time.monotonic() >= self._next_refresh:
            try:
                resigned = repo.refresh_if_due()
                if resigned:
                    log.info("re-signed %s", ", ".join(resigned))
            except UpdateError as e:
                log.error("could not re-sign the update metadata: %s", e)
            self._next_refresh = time.monotonic() + self.refresh_interval
        published = self._published_version(repo)
        releases_due = repo is not None and published != self._synced
        with self.sessions() as session:  # read first: no write lock when there is no work
            pending = rollouts.events_pending(session)
        if not pending and not releases_due:
            return
        with self.sessions.begin() as session:
            begin_write(session)
            if repo is not None and releases_due:
                try:
                    rollouts.sync_releases(session, repo.releases(), now=self.now())
                    self._synced = published
                except UpdateError as e:
                    log.error("could not read the releases: %s", e)
            for _ in range(100):  # at most 50,000 events per round
                if rollouts.process_events(session) == 0:
                    break

    @staticmethod
    def _published_version(repo: Repository | None) -> int | None:
        """The targets version the repository's timestamp names (changes on a publish)."""
        if repo is None:
            return None
        try:
            return repo.snapshot_version()
        except UpdateError:
            return None

    def start(self, identity: MqttIdentity | None = None) -> None:
        """Start the background thread and, with a broker ``identity``, the responder."""
        if identity is not None:
            from hearth.service.updates.responder import UpdateResponder

            self.responder = UpdateResponder(identity, self)
            self.responder.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="hearth-updates", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.responder is not None:
            self.responder.stop()
            self.responder = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except HearthError as e:
                log.warning("update work failed: %s", e)
            except Exception:
                log.exception("update work failed")
            if self._stop.wait(self.tick_interval):
                return
