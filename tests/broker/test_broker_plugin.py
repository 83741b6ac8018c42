"""Building and finding Hearth's Mosquitto identity plugin (certificate CN = username).

What the plugin does inside the broker is tested against a real Mosquitto in
``test_broker.py`` (a unit's certificate with another unit's secret is refused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hearth.errors import BrokerError
from hearth.service import broker_plugin
from hearth.service.broker_plugin import PLUGIN_FILE, identity_plugin_path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("HEARTH_MOSQUITTO_IDENTITY_PLUGIN", raising=False)
    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builds_once_into_a_private_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = identity_plugin_path()
    assert path.name == PLUGIN_FILE and path.is_relative_to(cache)
    assert b"mosquitto_plugin_init" in path.read_bytes()
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert not list(path.parent.glob(".build-*"))  # nothing half-written left behind

    def no_compiler(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the cached plugin must be reused, not rebuilt")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert identity_plugin_path() == path


def test_no_compiler_is_a_clear_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(BrokerError, match="apt-get install gcc mosquitto-dev"):
        identity_plugin_path()


def test_failed_build_is_reported_and_leaves_no_file(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int mosquitto_plugin_version(void) { return }\n")
    monkeypatch.setattr(broker_plugin, "SOURCE", broken)
    with pytest.raises(BrokerError, match=r"failed \(.*error"):
        identity_plugin_path()
    assert not list(cache.rglob("*.so"))


def test_plugin_another_user_could_replace_is_refused(cache: Path) -> None:
    path = identity_plugin_path()
    path.chmod(0o775)
    with pytest.raises(BrokerError, match="writable by another user"):
        identity_plugin_path()
    path.chmod(0o755)
    path.parent.chmod(0o777)
    with pytest.raises(BrokerError, match="writable by another user"):
        identity_plugin_path()
    path.parent.chmod(0o700)
    (cache / "mosquitto").chmod(0o770)  # could rename the build directory away
    with pytest.raises(BrokerError, match="writable by another user"):
        identity_plugin_path()
    (cache / "mosquitto").chmod(0o700)
    assert identity_plugin_path() == path


def test_prebuilt_plugin_from_the_environment(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEARTH_MOSQUITTO_IDENTITY_PLUGIN", str(tmp_path / "missing.so"))
    with pytest.raises(BrokerError, match="is not a file"):
        identity_plugin_path()
    built = tmp_path / "prebuilt"
    built.mkdir(mode=0o700)
    monkeypatch.delenv("HEARTH_MOSQUITTO_IDENTITY_PLUGIN")
    shutil.copy(identity_plugin_path(), built / PLUGIN_FILE)
    os.chmod(built / PLUGIN_FILE, 0o700)
    monkeypatch.setenv("HEARTH_MOSQUITTO_IDENTITY_PLUGIN", str(built / PLUGIN_FILE))
    assert identity_plugin_path() == built / PLUGIN_FILE
