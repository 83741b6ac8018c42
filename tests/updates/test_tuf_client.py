"""The bare TUF client behind `hearth device tuf-client`: exit codes, layout, caching."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root

from hearth.device.updater import tuf_client_download, tuf_client_init, tuf_client_refresh
from tests.updates.support import RepoServer, World, make_world


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    w.publish("1.0.0")
    w.publish("1.1.0", model="lock")
    return w


@pytest.fixture
def server(world: World) -> Iterator[RepoServer]:
    srv = RepoServer(world.repo.path).start()
    yield srv
    srv.stop()


@pytest.fixture
def root_file(world: World, tmp_path: Path) -> Path:
    path = tmp_path / "trusted-root.json"
    path.write_bytes(world.repo.trusted_root())
    return path


def test_init_trusts_the_root_without_network(tmp_path: Path, root_file: Path,
                                              server: RepoServer) -> None:
    d = tmp_path / "d"
    assert tuf_client_init(d, root_file) == 0
    assert (d / "root.json").read_bytes() == root_file.read_bytes()
    assert server.requests == []


def test_init_refuses_a_root_below_its_threshold(tmp_path: Path, root_file: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    md = Metadata[Root].from_bytes(root_file.read_bytes())
    md.signatures.popitem()
    md.signatures.popitem()  # 1 of the 3 signatures left; the threshold is 2
    bad = tmp_path / "bad-root.json"
    bad.write_bytes(md.to_bytes())
    assert tuf_client_init(tmp_path / "d", bad) == 1
    assert "bad_signature" in capsys.readouterr().err
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"{not json")
    assert tuf_client_init(tmp_path / "d", garbage) == 1
    assert tuf_client_init(tmp_path / "d", tmp_path / "missing.json") == 1


def test_refresh_uses_non_versioned_names(tmp_path: Path, root_file: Path,
                                          server: RepoServer) -> None:
    d = tmp_path / "d"
    assert tuf_client_init(d, root_file) == 0
    assert tuf_client_refresh(d, server.metadata_url) == 0
    names = {p.name for p in d.iterdir() if p.is_file()}
    assert {"root.json", "timestamp.json", "snapshot.json", "targets.json"} <= names
    assert not any(n[0].isdigit() for n in names)
    # the consistent-snapshot repository is read through its versioned file names
    assert server.count(r"^/metadata/3\.snapshot\.json$") == 1
    assert server.count(r"^/metadata/3\.targets\.json$") == 1
    assert tuf_client_refresh(d, server.metadata_url) == 0
    assert server.count(r"^/metadata/3\.targets\.json$") == 1  # valid local copy reused


def test_refresh_fails_with_exit_1(tmp_path: Path, root_file: Path, server: RepoServer,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "d"
    assert tuf_client_init(d, root_file) == 0
    server.overrides["/metadata/timestamp.json"] = b"{}"
    assert tuf_client_refresh(d, server.metadata_url) == 1
    assert "refresh failed" in capsys.readouterr().err
    assert tuf_client_refresh(d, "http://127.0.0.1:9/metadata/") == 1  # nothing listening
    assert tuf_client_refresh(tmp_path / "never-initialised", server.metadata_url) == 1


def test_download_in_order_and_cached(tmp_path: Path, root_file: Path, server: RepoServer,
                                      world: World) -> None:
    d, td = tmp_path / "d", tmp_path / "td"
    names = ["thermostat/thermostat-1.0.0.tar", "lock/lock-1.1.0.tar"]
    assert tuf_client_init(d, root_file) == 0
    assert tuf_client_download(d, server.metadata_url, names, server.targets_url, td) == 0
    for name in names:
        stored = world.repo.target_file(name)
        assert (td / name.replace("/", "%2F")).read_bytes() == stored.read_bytes()
    first = server.count(r"^/targets/")
    assert first == 2
    # the second download finds both targets already there and fetches nothing
    assert tuf_client_download(d, server.metadata_url, names, server.targets_url, td) == 0
    assert server.count(r"^/targets/") == first
    # a local copy that no longer matches is fetched again
    (td / "lock%2Flock-1.1.0.tar").write_bytes(b"changed")
    assert tuf_client_download(d, server.metadata_url, names, server.targets_url, td) == 0
    assert server.count(r"^/targets/") == first + 1


def test_download_stops_at_the_first_failure(tmp_path: Path, root_file: Path,
                                             server: RepoServer, world: World,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    d, td = tmp_path / "d", tmp_path / "td"
    assert tuf_client_init(d, root_file) == 0
    names = ["thermostat/thermostat-1.0.0.tar", "nope/nope-1.0.0.tar", "lock/lock-1.1.0.tar"]
    assert tuf_client_download(d, server.metadata_url, names, server.targets_url, td) == 1
    assert "not found" in capsys.readouterr().err
    assert server.count(r"^/targets/.*thermostat") == 1
    assert server.count(r"^/targets/.*lock") == 0, "continued after a failure"


def test_download_of_a_tampered_target_fails(tmp_path: Path, root_file: Path,
                                             server: RepoServer, world: World,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    d, td = tmp_path / "d", tmp_path / "td"
    name = "thermostat/thermostat-1.0.0.tar"
    stored = world.repo.target_file(name)
    data = bytearray(stored.read_bytes())
    data[600] ^= 0xFF
    server.overrides[f"/targets/thermostat/{stored.name}"] = bytes(data)
    assert tuf_client_init(d, root_file) == 0
    assert tuf_client_download(d, server.metadata_url, [name], server.targets_url, td) == 1
    assert "hash_mismatch" in capsys.readouterr().err
    assert not (td / "thermostat%2Fthermostat-1.0.0.tar").exists()
    assert tuf_client_download(d, server.metadata_url, [], server.targets_url, td) == 1
