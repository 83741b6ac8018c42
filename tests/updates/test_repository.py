"""The TUF repository: offline threshold root, online keys, consistent snapshots,
automatic timestamp re-signing, root rotation - checked with python-tuf's own client."""

from __future__ import annotations

import datetime as dt
import json
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets, Timestamp
from tuf.ngclient import Updater

from hearth.errors import ConfigError
from hearth.updates.errors import UpdateError, UpdateReason
from hearth.updates.keys import OfflineRootKeys, init_root
from hearth.updates.repository import Repository
from tests.updates.support import Clock, RepoServer, World, make_bundle, make_world


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


@pytest.fixture
def server(world: World) -> Iterator[RepoServer]:
    srv = RepoServer(world.repo.path).start()
    yield srv
    srv.stop()


def _client(tmp_path: Path, world: World, server: RepoServer, name: str = "client") -> Updater:
    md = tmp_path / name
    md.mkdir(exist_ok=True)
    return Updater(str(md), server.metadata_url, str(tmp_path / f"{name}-t"),
                   server.targets_url, bootstrap=world.repo.trusted_root())


def test_offline_root_keys_are_private_files_outside_the_service(world: World) -> None:
    keys_dir = world.tmp / "offline-root"
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    pems = sorted(keys_dir.glob("root-*.pem"))
    assert len(pems) == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in pems)
    service = world.tmp / "service"
    root_ids = {k.keyid for k in world.root_keys.keys}
    online = list((service / "update-keys").glob("*.pem"))
    assert len(online) == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in online)
    assert not root_ids & {p.stem for p in online}, "a root private key is in the service data"
    with pytest.raises(ConfigError):
        init_root(keys_dir, threshold=2, count=3)  # never overwrites root keys


def test_root_key_files_readable_by_others_are_refused(world: World) -> None:
    pem = next((world.tmp / "offline-root").glob("root-*.pem"))
    pem.chmod(0o644)
    with pytest.raises(ConfigError):
        OfflineRootKeys.load(world.tmp / "offline-root")


def test_passphrase_protected_root_keys(tmp_path: Path) -> None:
    init_root(tmp_path / "k", threshold=1, count=1, passphrase=b"correct horse")
    assert b"ENCRYPTED" in next((tmp_path / "k").glob("*.pem")).read_bytes()
    with pytest.raises(ConfigError):
        OfflineRootKeys.load(tmp_path / "k", passphrase=b"wrong")
    assert len(OfflineRootKeys.load(tmp_path / "k", passphrase=b"correct horse").signers) == 1


def test_threshold_root_signing_two_of_three(tmp_path: Path) -> None:
    keys = init_root(tmp_path / "offline", threshold=2, count=3)
    one = OfflineRootKeys.load(tmp_path / "offline", only=[keys.keys[0].keyid])
    assert len(one.signers) == 1
    with pytest.raises(UpdateError) as e:
        Repository.create(tmp_path / "r1", online_keys_dir=tmp_path / "k1", root_keys=one)
    assert e.value.reason is UpdateReason.THRESHOLD_NOT_MET
    assert not list((tmp_path / "k1").glob("*.pem")), "failed create left online keys behind"

    two = OfflineRootKeys.load(tmp_path / "offline",
                               only=[keys.keys[1].keyid, keys.keys[2].keyid])
    repo = Repository.create(tmp_path / "r2", online_keys_dir=tmp_path / "k2", root_keys=two)
    root = Metadata[Root].from_bytes(repo.trusted_root())
    assert root.signed.roles["root"].threshold == 2
    assert len(root.signatures) == 2
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)

    # one signature is not enough for a client either
    del root.signatures[keys.keys[1].keyid]
    (tmp_path / "md").mkdir()
    with pytest.raises(UnsignedMetadataError, match="signed by 1/2 keys"):
        Updater(str(tmp_path / "md"), "http://127.0.0.1:9/", bootstrap=root.to_bytes())


def test_consistent_snapshot_layout(world: World) -> None:
    name = world.publish("1.0.0")
    md_dir = world.repo.metadata_dir
    names = sorted(p.name for p in md_dir.iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "2.snapshot.json",
                     "2.targets.json", "root.json", "timestamp.json"]
    assert Metadata[Root].from_bytes((md_dir / "1.root.json").read_bytes()).signed \
        .consistent_snapshot is True
    ts = Metadata[Timestamp].from_bytes((md_dir / "timestamp.json").read_bytes()).signed
    assert ts.snapshot_meta.version == 2 and ts.snapshot_meta.hashes and ts.snapshot_meta.length
    targets = Metadata[Targets].from_bytes((md_dir / "2.targets.json").read_bytes()).signed
    tf = targets.targets[name]
    assert tf.custom["model"] == "thermostat" and tf.custom["version"] == "1.0.0"
    assert tf.custom["min_from_version"] == "0.0.0"
    stored = world.repo.target_file(name)
    assert stored.name == f"{tf.hashes['sha256']}.thermostat-1.0.0.tar"
    assert stored.parent == world.repo.targets_dir / "thermostat"
    assert re.fullmatch(r"[0-9a-f]{64}\.thermostat-1\.0\.0\.tar", stored.name)
    assert [p.name for p in world.repo.targets_dir.rglob("*") if p.is_file()] == [stored.name]


def test_publish_checks_the_bundle_and_refuses_duplicates(world: World) -> None:
    bundle = make_bundle(world.tmp, "1.0.0")
    with pytest.raises(UpdateError) as e:
        world.repo.publish(bundle, model="thermostat", version="1.0.1", min_from_version="0.0.0")
    assert e.value.reason is UpdateReason.BAD_BUNDLE
    with pytest.raises(UpdateError) as e:
        world.repo.publish(bundle, model="toaster", version="1.0.0", min_from_version="0.0.0")
    assert e.value.reason is UpdateReason.WRONG_MODEL
    world.repo.publish(bundle, model="thermostat", version="1.0.0", min_from_version="0.0.0")
    with pytest.raises(UpdateError) as e:
        world.repo.publish(bundle, model="thermostat", version="1.0.0", min_from_version="0.0.0")
    assert e.value.reason is UpdateReason.CONFLICT
    assert [r.info.version for r in world.repo.releases("thermostat")] == ["1.0.0"]


def test_client_downloads_a_published_bundle(world: World, server: RepoServer,
                                             tmp_path: Path) -> None:
    name = world.publish("1.0.0")
    client = _client(tmp_path, world, server)
    client.refresh()
    info = client.get_targetinfo(name)
    assert info is not None
    path = client.download_target(info)
    assert Path(path).read_bytes() == world.repo.target_file(name).read_bytes()
    assert server.count(r"^/targets/thermostat/[0-9a-f]{64}\.thermostat-1\.0\.0\.tar$") == 1
    assert server.count(r"^/metadata/2\.snapshot\.json$") == 1


def test_timestamp_is_re_signed_at_half_life(world: World, server: RepoServer,
                                             tmp_path: Path) -> None:
    clock = world.clock
    assert not world.repo.timestamp_due()
    assert world.repo.refresh_if_due() == []
    before = Metadata[Timestamp].from_bytes(
        (world.repo.metadata_dir / "timestamp.json").read_bytes()).signed
    assert before.expires - clock.now <= dt.timedelta(days=1)
    clock.advance(dt.timedelta(hours=13))
    assert world.repo.timestamp_due()
    assert world.repo.refresh_if_due() == ["timestamp"]
    after = Metadata[Timestamp].from_bytes(
        (world.repo.metadata_dir / "timestamp.json").read_bytes()).signed
    assert after.version == before.version + 1
    assert after.expires > before.expires
    assert not world.repo.timestamp_due()
    assert world.repo.next_refresh() == after.expires - dt.timedelta(hours=12)
    # snapshot (7 days) and targets (90 days) are re-signed the same way when they age
    clock.advance(dt.timedelta(days=4))
    assert world.repo.refresh_if_due() == ["snapshot", "timestamp"]
    client = _client(tmp_path, world, server)
    client.refresh()  # a real client accepts the re-signed chain


def test_root_rotation_with_threshold_of_old_and_new_keys(world: World, server: RepoServer,
                                                          tmp_path: Path) -> None:
    name = world.publish("1.0.0")
    first_root = world.repo.trusted_root()
    new_keys = init_root(world.tmp / "new-offline", threshold=2, count=3)
    # the new root must be signed by 2 old AND 2 new keys
    one_old = OfflineRootKeys.load(world.tmp / "offline-root", only=[world.root_keys.keys[0].keyid])
    with pytest.raises(UpdateError) as e:
        world.repo.rotate_root(root_keys=one_old, new_root_keys=new_keys)
    assert e.value.reason is UpdateReason.THRESHOLD_NOT_MET
    assert world.repo.root_version() == 1
    old_online = {p.stem for p in (world.tmp / "service" / "update-keys").glob("*.pem")}
    version = world.repo.rotate_root(root_keys=world.root_keys, new_root_keys=new_keys,
                                     rotate_online=["targets", "timestamp"])
    assert version == 2
    now_online = {p.stem for p in (world.tmp / "service" / "update-keys").glob("*.pem")}
    assert len(now_online) == 3 and len(old_online - now_online) == 2  # replaced keys deleted
    root2 = Metadata[Root].from_bytes(world.repo.trusted_root()).signed
    assert set(root2.roles["root"].keyids) == {k.keyid for k in new_keys.keys}

    md = tmp_path / "md"
    md.mkdir()
    client = Updater(str(md), server.metadata_url, str(tmp_path / "t"), server.targets_url,
                     bootstrap=first_root)
    client.refresh()  # follows 1.root.json -> 2.root.json, then the newly signed roles
    assert json.loads((md / "root.json").read_bytes())["signed"]["version"] == 2
    assert client.get_targetinfo(name) is not None
    # the next rotation needs the new keys: the old ones no longer suffice
    with pytest.raises(UpdateError):
        world.repo.rotate_root(root_keys=world.root_keys)


def test_repository_clock_must_be_aware(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        make_world(tmp_path, clock=Clock(dt.datetime(2030, 1, 1)))  # naive


def test_prune_keeps_what_clients_can_still_ask_for(world: World, server: RepoServer,
                                                    tmp_path: Path) -> None:
    for v in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        world.publish(v)
    assert world.repo.prune(keep=2) == 6  # targets and snapshot versions 1, 2 and 3
    names = {p.name for p in world.repo.metadata_dir.iterdir()}
    assert {"4.targets.json", "5.targets.json", "4.snapshot.json", "5.snapshot.json",
            "1.root.json", "timestamp.json"} <= names
    assert "3.targets.json" not in names
    client = _client(tmp_path, world, server)
    client.refresh()
    assert client.get_targetinfo("thermostat/thermostat-1.0.0.tar") is not None
    with pytest.raises(ConfigError):
        world.repo.prune(keep=1)
