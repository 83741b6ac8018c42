"""Settings: defaults, HEARTH_* parsing, clear errors, no password in repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from hearth.errors import ConfigError
from hearth.service.config import Settings


def test_defaults(tmp_path: Path) -> None:
    s = Settings.from_env({"HEARTH_DATA_DIR": str(tmp_path)})
    assert s.data_dir == tmp_path
    assert s.database_url == f"sqlite:///{tmp_path / 'hearth.db'}"
    assert (s.http_host, s.http_port, s.mqtt_host, s.mqtt_port) == (
        "127.0.0.1", 8443, "127.0.0.1", 8883)
    assert s.is_sqlite
    assert s.api_max_body_bytes == 64 * 1024


def test_env_overrides() -> None:
    s = Settings.from_env({
        # pragma: allowlist nextline secret
        "HEARTH_DATABASE_URL": "postgresql://hearth:pw@db.example/hearth",
        "HEARTH_HTTP_PORT": " 9443 ",
        "HEARTH_INGEST_BATCH_SIZE": "50",
        "HEARTH_SOMETHING_ELSE": "x",
        "PATH": "/bin",
    })
    # pragma: allowlist nextline secret
    assert s.database_url == "postgresql+psycopg://hearth:pw@db.example/hearth"
    assert s.http_port == 9443
    assert s.ingest_batch_size == 50
    assert s.extra == {"HEARTH_SOMETHING_ELSE": "x"}
    assert not s.is_sqlite


def test_repr_hides_the_database_password() -> None:
    s = Settings(database_url="postgresql+psycopg://hearth:s3cret-pw@db/hearth")
    assert "s3cret-pw" not in repr(s)
    assert "***" in repr(s)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"HEARTH_HTTP_PORT": "http"}, "HEARTH_HTTP_PORT must be an integer"),
        ({"HEARTH_HTTP_PORT": "0"}, "HEARTH_HTTP_PORT"),
        ({"HEARTH_MQTT_PORT": "70000"}, "HEARTH_MQTT_PORT"),
        ({"HEARTH_DATABASE_URL": "mysql://x/y"}, "supported"),
        ({"HEARTH_DATABASE_URL": "::nonsense::"}, "HEARTH_DATABASE_URL"),
        ({"HEARTH_DATABASE_URL": "sqlite://"}, "in-memory"),
        ({"HEARTH_INGEST_BATCH_SIZE": "0"}, "HEARTH_INGEST_BATCH_SIZE"),
        ({"HEARTH_API_MAX_BODY_BYTES": "10"}, "HEARTH_API_MAX_BODY_BYTES"),
        ({"HEARTH_HTTP_HOST": "a b"}, "HEARTH_HTTP_HOST"),
        ({"HEARTH_DATA_DIR": ""}, "HEARTH_DATA_DIR"),
    ],
)
def test_invalid_config_is_refused_with_a_clear_message(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Settings.from_env(env)


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.http_port = 1  # type: ignore[misc]
