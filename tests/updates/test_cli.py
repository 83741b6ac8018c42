"""The command line: `hearth device tuf-client ...` exit codes exactly as the issue specifies,
and the maker's `hearth release ...` flow (root keys outside the data, bundle, publish,
refresh, status, support period), through `hearth.cli.main`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hearth.cli import main
from hearth.updates.bundle import verify_bundle
from tests.updates.support import RepoServer, World, make_world


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    w.publish("1.0.0")
    w.publish("1.1.0")
    return w


@pytest.fixture
def server(world: World) -> Iterator[RepoServer]:
    srv = RepoServer(world.repo.path).start()
    yield srv
    srv.stop()


def test_tuf_client_command_exit_codes(world: World, server: RepoServer, tmp_path: Path) -> None:
    root = tmp_path / "root.json"
    root.write_bytes(world.repo.trusted_root())
    md, td = tmp_path / "md", tmp_path / "targets"
    base = ["device", "tuf-client", "--metadata-dir", str(md)]
    assert main([*base, "init", str(root)]) == 0
    assert (md / "root.json").exists() and server.requests == []
    assert main([*base, "--metadata-url", server.metadata_url, "refresh"]) == 0
    assert (md / "timestamp.json").exists()
    names = ["--target-name", "thermostat/thermostat-1.0.0.tar",
             "--target-name", "thermostat/thermostat-1.1.0.tar"]
    dl = [*base, "--metadata-url", server.metadata_url, *names,
          "--target-base-url", server.targets_url, "--target-dir", str(td), "download"]
    assert main(dl) == 0
    assert len(list(td.iterdir())) == 2
    fetched = server.count(r"^/targets/")
    assert main(dl) == 0 and server.count(r"^/targets/") == fetched  # not fetched again
    missing = [*base, "--metadata-url", server.metadata_url, "--target-name", "nope/x.tar",
               "--target-base-url", server.targets_url, "--target-dir", str(td), "download"]
    assert main(missing) == 1
    assert main([*base, "--metadata-url", "http://127.0.0.1:9/", "refresh"]) == 1
    assert main([*base, "refresh"]) == 1  # no --metadata-url
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{")
    assert main(["device", "tuf-client", "--metadata-dir", str(tmp_path / "m2"), "init",
                 str(garbage)]) == 1


def test_release_flow_from_root_keys_to_support_period(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    data, keys = tmp_path / "data", tmp_path / "offline"
    d = ["--data-dir", str(data)]
    assert main(["release", "root", "init", "--keys", str(data / "keys"), *d]) == 1
    assert "must not live in the service's data" in capsys.readouterr().err
    assert main(["release", "root", "init", "--keys", str(keys), *d]) == 0
    assert main(["release", "init", "--keys", str(keys), *d]) == 0
    bundle = tmp_path / "t-1.0.0.tar"
    assert main(["release", "bundle", "--reference", "--model", "thermostat", "--version",
                 "1.0.0", "--out", str(bundle)]) == 0
    assert set(verify_bundle(bundle).files) == {"app.py", "thermostat.py"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["release", "bundle", str(empty), "--model", "thermostat", "--version",
                 "1.0.0", "--out", str(tmp_path / "x.tar")]) == 2  # no app.py
    assert main(["release", "publish", str(bundle), "--model", "thermostat", "--version",
                 "1.0.0", *d]) == 0
    assert main(["release", "publish", str(bundle), "--model", "thermostat", "--version",
                 "1.0.0", *d]) == 1  # a version is published once
    assert main(["release", "publish", str(bundle), "--model", "lock", "--version", "1.0.0",
                 *d]) == 1  # the manifest says thermostat
    capsys.readouterr()
    assert main(["release", "status", *d]) == 0
    out = capsys.readouterr().out
    assert "root version 1" in out and "thermostat/thermostat-1.0.0.tar" in out
    assert main(["release", "refresh", "--force", *d]) == 0
    assert main(["release", "root", "rotate", "--keys", str(keys), *d]) == 0
    assert (data / "updates" / "metadata" / "2.root.json").exists()
    assert main(["release", "support", "--model", "thermostat", "--end-date", "2031-12-31",
                 *d]) == 0
    assert main(["release", "support", "--model", "thermostat", "--end-date", "2030-01-01",
                 *d]) == 2  # never shortened
    assert main(["release", "support", "--model", "thermostat", "--end-date", "soon",
                 *d]) == 2
    index = json.loads((keys / "root-keys.json").read_text())
    assert index["threshold"] == 2 and len(index["keys"]) == 3
