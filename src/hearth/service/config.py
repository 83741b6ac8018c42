"""Service configuration: one frozen, validated settings object read from ``HEARTH_*``.

Every limit the service enforces lives here as a typed default, so "what are the limits?"
has one answer. Settings are validated when they are built (:meth:`Settings.__post_init__`),
which is at process start: a bad value stops the service with a :class:`ConfigError` that
names the variable, instead of failing later on the first request.

Environment variables (all optional)::

    HEARTH_DATA_DIR                  ./hearth-data
    HEARTH_DATABASE_URL              sqlite:///<data_dir>/hearth.db
                                     (PostgreSQL: postgresql+psycopg://user@host/db)
    HEARTH_HTTP_HOST / _PORT         127.0.0.1 / 8443
    HEARTH_MQTT_HOST / _PORT         127.0.0.1 / 8883
    HEARTH_INGEST_BATCH_SIZE         2000    most messages per database transaction
    HEARTH_INGEST_FLUSH_MS           200     longest a message waits before its batch is written
    HEARTH_API_MAX_BODY_BYTES        65536   largest request body
    HEARTH_API_MAX_PAGE              1000    most rows one list request returns
    HEARTH_COMMAND_MAX_TTL_SECONDS   3600    longest life an operator may give a command

Example::

    settings = Settings.from_env()          # raises ConfigError on bad input
    engine = make_engine(settings.database_url)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from hearth.errors import ConfigError

__all__ = ["ENV_PREFIX", "INGEST_BATCH_SIZE", "INGEST_FLUSH_MS", "Settings"]

ENV_PREFIX = "HEARTH_"

INGEST_BATCH_SIZE = 2000
INGEST_FLUSH_MS = 200
"""The ingest's batches: written when this many messages wait, or when the oldest has
waited this long. Under load a batch is what arrived while the previous one was being
written; each batch costs a transaction and one lock and update of every unit in it, so
bigger batches cost far less per message (in-process, 200 units: writing took 71 µs of
client and server CPU per message in batches of 350, 32 in batches of 2,000; ADR 0004),
for at most a fifth of a second more before telemetry is stored and acknowledged."""

_SUPPORTED_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql+psycopg")


def _normalise_database_url(raw: str) -> str:
    try:
        url = make_url(raw)
    except ArgumentError as e:
        raise ConfigError(f"HEARTH_DATABASE_URL is not a database URL: {e}") from None
    if url.drivername == "postgresql":  # the only PostgreSQL driver Hearth ships is psycopg 3
        url = url.set(drivername="postgresql+psycopg")
    if url.drivername not in _SUPPORTED_DRIVERS:
        raise ConfigError(
            f"HEARTH_DATABASE_URL uses {url.drivername!r}; supported: sqlite, postgresql+psycopg"
        )
    if url.drivername.startswith("sqlite") and not url.database:
        raise ConfigError("HEARTH_DATABASE_URL: an in-memory SQLite database loses all data; "
                          "give a file path")
    return url.render_as_string(hide_password=False)


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid>"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated service settings. Build with :meth:`from_env` or directly (tests).

    Raises :class:`ConfigError` from the constructor when a value is out of range.
    ``repr`` hides any password in the database URL.
    """

    data_dir: Path = Path("hearth-data")
    database_url: str = ""
    """Empty means SQLite in ``data_dir/hearth.db`` (filled in by the constructor)."""
    http_host: str = "127.0.0.1"
    http_port: int = 8443
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 8883
    ingest_batch_size: int = INGEST_BATCH_SIZE
    ingest_flush_ms: int = INGEST_FLUSH_MS
    api_max_body_bytes: int = 64 * 1024
    api_max_page: int = 1000
    command_max_ttl_seconds: int = 3600
    quarantine_excerpt_bytes: int = 512
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)
    """``HEARTH_*`` variables this class does not know (other parts of Hearth read them)."""

    def __post_init__(self) -> None:
        data_dir = Path(self.data_dir).expanduser().absolute()
        object.__setattr__(self, "data_dir", data_dir)
        url = self.database_url or str(URL.create("sqlite", database=str(data_dir / "hearth.db")))
        object.__setattr__(self, "database_url", _normalise_database_url(url))
        for name in ("http_port", "mqtt_port"):
            _check_range(name, getattr(self, name), 1, 65535)
        for name in ("http_host", "mqtt_host"):
            value = getattr(self, name)
            if not value or len(value) > 253 or any(c.isspace() for c in value):
                raise ConfigError(f"HEARTH_{name.upper()} must be a host name or address")
        _check_range("ingest_batch_size", self.ingest_batch_size, 1, 10_000)
        _check_range("ingest_flush_ms", self.ingest_flush_ms, 1, 60_000)
        _check_range("api_max_body_bytes", self.api_max_body_bytes, 1024, 16 * 1024 * 1024)
        _check_range("api_max_page", self.api_max_page, 1, 100_000)
        _check_range("command_max_ttl_seconds", self.command_max_ttl_seconds, 1, 7 * 86400)
        _check_range("quarantine_excerpt_bytes", self.quarantine_excerpt_bytes, 0, 16 * 1024)

    def __repr__(self) -> str:
        def show(name: str) -> str:
            value = getattr(self, name)
            return repr(_redact(value) if name == "database_url" else value)

        shown = ", ".join(f"{f.name}={show(f.name)}" for f in dataclasses.fields(self) if f.repr)
        return f"Settings({shown})"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read ``HEARTH_*`` variables from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        extra: dict[str, str] = {}
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        for key, raw in env.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX):].lower()
            f = known.get(name)
            if f is None:
                extra[key] = raw
                continue
            values[name] = _convert(key, raw, f.type)
        return cls(**values, extra=extra)  # type: ignore[arg-type]


def _convert(key: str, raw: str, typ: object) -> object:
    raw = raw.strip()
    if typ in (int, "int"):
        try:
            return int(raw, 10)
        except ValueError:
            raise ConfigError(f"{key} must be an integer, not {raw[:40]!r}") from None
    if typ in (Path, "Path"):
        if not raw:
            raise ConfigError(f"{key} must not be empty")
        return Path(raw)
    return raw


def _check_range(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"HEARTH_{name.upper()} must be an integer in {lo}..{hi}, not {value!r}")
