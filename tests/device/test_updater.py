"""The unit's updater against a real repository served over HTTPS with a bearer token:
one test per attack the issue names, plus the happy path and resumed downloads."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Timestamp

from hearth.device.slots import SlotManager
from hearth.device.updater import HttpsFetcher, UnitUpdater, install_trusted_root
from hearth.pki import MakerPKI
from hearth.updates.bundle import read_manifest
from hearth.updates.errors import UpdateError, UpdateReason
from hearth.updates.keys import OnlineKeys
from tests.device.update_worker import kill_at
from tests.updates.support import RepoServer, World, make_bundle, make_world, server_tls

TOKEN = "short-lived-token-for-tests"
FACTORY = "thermostat/thermostat-1.0.0.tar"


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    w.publish("1.0.0")
    return w


@pytest.fixture
def server(world: World, session_pki: MakerPKI, tmp_path: Path) -> Iterator[RepoServer]:
    srv = RepoServer(world.repo.path, token=TOKEN,
                     tls=server_tls(session_pki, tmp_path / "tls")).start()
    yield srv
    srv.stop()


@pytest.fixture
def unit(world: World, unit_dir: Path) -> Path:
    """A unit minted by the factory (its ca.pem is the maker root), provisioned with 1.0.0."""
    world.provision(unit_dir, FACTORY)
    return unit_dir


def _updater(unit: Path, server: RepoServer, **kw: object) -> UnitUpdater:
    kw.setdefault("token", lambda: TOKEN)
    return UnitUpdater(unit, metadata_url=server.metadata_url,
                       target_base_url=server.targets_url, **kw)  # type: ignore[arg-type]


def _refused(unit: Path, server: RepoServer, reason: UpdateReason,
             target: str | None = None) -> UpdateError:
    """The update fails with ``reason`` and the unit is left exactly as it was."""
    before = SlotManager(unit).state()
    with pytest.raises(UpdateError) as e:
        _updater(unit, server).update(target)
    assert e.value.reason is reason, e.value
    after = SlotManager(unit).state()
    assert (after.pending, after.versions) == (before.pending, before.versions)
    assert not (unit / "slots" / "b").exists() or before.versions["b"] is not None
    return e.value


def _online_signer(world: World, role: str) -> CryptoSigner:
    root = Metadata[Root].from_bytes(world.repo.trusted_root()).signed
    key = root.get_key(root.roles[role].keyids[0])
    return OnlineKeys(world.tmp / "service" / "update-keys").signer(key)


def _timestamp(world: World) -> Metadata[Timestamp]:
    return Metadata[Timestamp].from_bytes(
        (world.repo.metadata_dir / "timestamp.json").read_bytes())


def _target_url_path(world: World, name: str) -> str:
    return "/targets/" + world.repo.target_file(name).relative_to(world.repo.targets_dir) \
        .as_posix()


# --- the happy path ---------------------------------------------------------------------------
def test_update_over_https_with_a_token(world: World, unit: Path, server: RepoServer) -> None:
    world.publish("1.1.0")
    result = _updater(unit, server).update()
    assert (result.status, result.version, result.slot) == ("installed", "1.1.0", "b")
    assert all(r.authorized for r in server.requests)
    assert server.count(r"^/targets/thermostat/[0-9a-f]{64}\.thermostat-1\.1\.0\.tar$") == 1
    slots = SlotManager(unit)
    boot = slots.boot()
    assert (boot.slot, boot.version, boot.trial) == ("b", "1.1.0", True)
    slots.commit()
    assert _updater(unit, server).update().status == "up_to_date"
    assert not list((unit / "update" / "downloads").iterdir())


def test_downloads_require_the_token(world: World, unit: Path, server: RepoServer) -> None:
    world.publish("1.1.0")
    with pytest.raises(UpdateError) as e:
        _updater(unit, server, token=None).check()
    assert e.value.reason is UpdateReason.DOWNLOAD_FAILED and "401" in e.value.detail
    assert server.requests and not any(r.authorized for r in server.requests)


def test_tls_is_verified_against_the_units_ca(world: World, unit: Path, server: RepoServer,
                                              pki: MakerPKI, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(pki.root_pem())
    with pytest.raises(UpdateError) as e:
        _updater(unit, server, ca_file=other_ca).check()
    assert e.value.reason is UpdateReason.DOWNLOAD_FAILED
    assert server.requests == []  # nothing reached the application, not even the token


def test_the_token_goes_only_to_the_update_service() -> None:
    fetcher = HttpsFetcher(token=lambda: TOKEN, token_origins=["https://svc.example:8443/x/"])
    assert fetcher._headers("https://svc.example:8443/updates/targets/a") == {
        "Authorization": f"Bearer {TOKEN}"}
    assert fetcher._headers("https://cdn.example/updates/targets/a") == {}
    with pytest.raises(Exception, match="plain http"):
        fetcher._headers("http://svc.example/updates/metadata/timestamp.json")
    assert fetcher._headers("http://127.0.0.1:8080/metadata/1.root.json") == {}
    with pytest.raises(ValueError):
        HttpsFetcher(token=lambda: TOKEN)  # a token with nowhere it may go


def test_min_from_version_is_honoured_step_by_step(world: World, unit: Path,
                                                    server: RepoServer) -> None:
    world.publish("1.5.0", min_from="1.0.0")
    world.publish("2.0.0", min_from="1.5.0")
    offer = _updater(unit, server).check()
    assert offer is not None and offer.version == "1.5.0"
    with pytest.raises(UpdateError) as e:
        _updater(unit, server).check("thermostat/thermostat-2.0.0.tar")
    assert e.value.reason is UpdateReason.MIN_FROM_VERSION
    _updater(unit, server).update()
    SlotManager(unit).boot()
    SlotManager(unit).commit()
    offer = _updater(unit, server).check()
    assert offer is not None and offer.version == "2.0.0"


def test_a_version_that_failed_here_is_not_offered_again(world: World, unit: Path,
                                                        server: RepoServer) -> None:
    name = world.publish("1.1.0")
    _updater(unit, server).update()
    SlotManager(unit).boot()
    SlotManager(unit).rollback("health_check")
    assert _updater(unit, server).check() is None
    offer = _updater(unit, server).check(name)  # an operator may still assign it explicitly
    assert offer is not None and offer.version == "1.1.0"


# --- one test per attack ------------------------------------------------------------------------
def test_tampered_bundle_is_refused(world: World, unit: Path, server: RepoServer) -> None:
    name = world.publish("1.1.0")
    stored = world.repo.target_file(name)
    data = bytearray(stored.read_bytes())
    data[1000] ^= 0x01  # same length, one bit changed
    stored.write_bytes(bytes(data))
    _refused(unit, server, UpdateReason.HASH_MISMATCH)
    assert not list((unit / "update" / "downloads").glob("*.part")), "bad data kept"


def test_unsigned_metadata_is_refused(world: World, unit: Path, server: RepoServer) -> None:
    world.publish("1.1.0")
    ts = _timestamp(world)
    ts.signed.version += 1
    ts.signatures.clear()
    server.overrides["/metadata/timestamp.json"] = ts.to_bytes()
    _refused(unit, server, UpdateReason.BAD_SIGNATURE)


def test_wrongly_signed_metadata_is_refused(world: World, unit: Path,
                                            server: RepoServer) -> None:
    world.publish("1.1.0")
    ts = _timestamp(world)
    ts.signed.version += 1
    ts.sign(CryptoSigner.generate_ed25519())  # a key root does not list for timestamp
    server.overrides["/metadata/timestamp.json"] = ts.to_bytes()
    _refused(unit, server, UpdateReason.BAD_SIGNATURE)
    # nor does the key of another role do: the snapshot key cannot sign the timestamp
    ts.sign(_online_signer(world, "snapshot"))
    server.overrides["/metadata/timestamp.json"] = ts.to_bytes()
    _refused(unit, server, UpdateReason.BAD_SIGNATURE)


def test_metadata_rollback_is_refused(world: World, unit: Path, server: RepoServer) -> None:
    old_timestamp = (world.repo.metadata_dir / "timestamp.json").read_bytes()
    world.publish("1.1.0")
    assert _updater(unit, server).check() is not None  # the unit now trusts timestamp v3
    server.overrides["/metadata/timestamp.json"] = old_timestamp  # v2: valid, signed, older
    e = _refused(unit, server, UpdateReason.METADATA_ROLLBACK)
    assert "timestamp" in e.detail.lower() or "version" in e.detail.lower()


def test_bundle_rollback_is_refused(world: World, unit: Path, server: RepoServer) -> None:
    world.publish("1.1.0")
    _updater(unit, server).update()
    SlotManager(unit).boot()
    SlotManager(unit).commit()  # the unit runs 1.1.0
    old = world.publish("0.9.0")  # correctly signed, but older than what the unit runs
    assert _updater(unit, server).check() is None
    _refused(unit, server, UpdateReason.NOT_NEWER, FACTORY)
    _refused(unit, server, UpdateReason.NOT_NEWER, old)


def test_frozen_metadata_is_refused(world: World, unit: Path, server: RepoServer) -> None:
    world.publish("1.1.0")
    # the repository stops re-signing: what is served expired two days ago
    world.clock.advance(-dt.timedelta(days=3))
    world.repo.refresh_timestamp()
    e = _refused(unit, server, UpdateReason.EXPIRED_METADATA)
    assert "timestamp" in e.detail.lower()


def test_frozen_snapshot_is_refused(world: World, unit: Path, server: RepoServer) -> None:
    world.clock.advance(-dt.timedelta(days=8))
    world.publish("1.1.0")  # snapshot expires a day ago; a fresh timestamp points at it
    world.clock.advance(dt.timedelta(days=8))
    world.repo.refresh_timestamp()
    e = _refused(unit, server, UpdateReason.EXPIRED_METADATA)
    assert "snapshot" in e.detail.lower()


@pytest.mark.parametrize("swap", ["old-targets", "old-snapshot", "foreign-snapshot",
                                  "foreign-timestamp"])
def test_mix_and_match_metadata_is_refused(world: World, unit: Path, server: RepoServer,
                                           tmp_path: Path, swap: str) -> None:
    md = world.repo.metadata_dir
    world.publish("1.1.0")  # now targets v3, snapshot v3, timestamp v3
    other = make_world(tmp_path / "other")  # another repository, with its own keys
    other.publish("1.0.0")
    other.publish("1.1.0")  # the same file names and versions as ours
    if swap == "old-targets":  # targets of an older state under the current version's name
        server.overrides["/metadata/3.targets.json"] = (md / "2.targets.json").read_bytes()
        _refused(unit, server, UpdateReason.HASH_MISMATCH)
    elif swap == "old-snapshot":
        server.overrides["/metadata/3.snapshot.json"] = (md / "2.snapshot.json").read_bytes()
        _refused(unit, server, UpdateReason.HASH_MISMATCH)
    elif swap == "foreign-snapshot":
        server.overrides["/metadata/3.snapshot.json"] = \
            (other.repo.metadata_dir / "3.snapshot.json").read_bytes()
        _refused(unit, server, UpdateReason.HASH_MISMATCH)
    else:  # a whole consistent set from elsewhere: the timestamp's signature gives it away
        for name in ("timestamp.json", "3.snapshot.json", "3.targets.json"):
            server.overrides[f"/metadata/{name}"] = (other.repo.metadata_dir / name).read_bytes()
        _refused(unit, server, UpdateReason.BAD_SIGNATURE)


def test_oversized_download_is_cut_at_the_signed_length(world: World, unit: Path,
                                                        server: RepoServer) -> None:
    name = world.publish("1.1.0")
    path = _target_url_path(world, name)
    length = world.repo.target_file(name).stat().st_size
    server.overrides[path] = world.repo.target_file(name).read_bytes() + b"\0" * 100_000
    _refused(unit, server, UpdateReason.TOO_LARGE)
    for part in (unit / "update" / "downloads").glob("*.part"):
        assert part.stat().st_size <= length


def test_endless_data_is_cut_off(world: World, unit: Path, server: RepoServer) -> None:
    name = world.publish("1.1.0")
    path = _target_url_path(world, name)
    server.endless.add(path)
    _refused(unit, server, UpdateReason.TOO_LARGE)
    (req,) = [r for r in server.requests if r.path == path]
    assert req.bytes_sent < 16 * 1024 * 1024  # the unit hung up, the server did not finish
    # the same for metadata: an endless timestamp stops at the 16 KiB timestamp limit
    server.endless.add("/metadata/timestamp.json")
    _refused(unit, server, UpdateReason.TOO_LARGE)


def test_another_models_bundle_is_refused(world: World, unit: Path, server: RepoServer) -> None:
    lock = world.publish("1.1.0", model="lock")
    assert _updater(unit, server).check() is None  # never chosen
    _refused(unit, server, UpdateReason.WRONG_MODEL, lock)


def test_another_models_bundle_under_this_models_name_is_refused(
    world: World, unit: Path, server: RepoServer
) -> None:
    # a signed entry that claims "thermostat" but carries a lock bundle (a maker's mistake,
    # or a stolen targets key): the manifest inside gives it away at install
    lock_bundle = make_bundle(world.tmp, "1.1.0", model="lock")
    _manifest, raw = read_manifest(lock_bundle)
    world.repo._add_target("thermostat/thermostat-1.1.0.tar", lock_bundle, custom={
        "model": "thermostat", "version": "1.1.0", "min_from_version": "0.0.0",
        "manifest_sha256": hashlib.sha256(raw).hexdigest()})
    _refused(unit, server, UpdateReason.WRONG_MODEL)
    assert SlotManager(unit).boot().slot == "a"


# --- interruption ---------------------------------------------------------------------------------
def test_download_resumes_after_kill_9(world: World, unit: Path, server: RepoServer,
                                       tmp_path: Path) -> None:
    name = world.publish("1.1.0", extra_bytes=400_000)
    length = world.repo.target_file(name).stat().st_size
    kill_at(tmp_path, "download:chunk", op="download", unit=str(unit),
            metadata_url=server.metadata_url, targets_url=server.targets_url, token=TOKEN)
    (part,) = (unit / "update" / "downloads").glob("*.part")
    have = part.stat().st_size
    assert 0 < have < length
    assert SlotManager(unit).boot().slot == "a"  # the unit still runs what it ran
    result = _updater(unit, server).update()
    assert (result.status, result.slot) == ("installed", "b")
    path = _target_url_path(world, name)
    last = [r for r in server.requests if r.path == path][-1]
    assert last.range == f"bytes={have}-"
    assert last.bytes_sent == length - have


def test_root_rotation_is_followed_and_still_verifies_at_boot(
    world: World, unit: Path, server: RepoServer
) -> None:
    world.repo.rotate_root(root_keys=world.root_keys, rotate_online=["targets"])
    world.publish("1.1.0")  # signed with the new targets key that root v2 introduced
    _updater(unit, server).update()
    assert (unit / "update" / "metadata" / "root_history" / "2.root.json").exists()
    slots = SlotManager(unit)
    assert slots.verify_slot("a").ok  # delivered under root v1
    result = slots.boot()  # delivered under root v2: chain anchor v1 -> v2 verified
    assert (result.slot, result.version, result.tampered) == ("b", "1.1.0", ())


def test_trusted_root_must_be_valid(world: World, tmp_path: Path) -> None:
    root = Metadata[Root].from_bytes(world.repo.trusted_root())
    weak = copy.deepcopy(root)
    for keyid in list(weak.signatures)[:2]:
        del weak.signatures[keyid]
    with pytest.raises(UpdateError) as e:
        install_trusted_root(tmp_path / "u", weak.to_bytes())
    assert e.value.reason is UpdateReason.BAD_SIGNATURE
    with pytest.raises(UpdateError) as e:
        install_trusted_root(tmp_path / "u", b"{}")
    assert e.value.reason is UpdateReason.BAD_ROOT
    assert install_trusted_root(tmp_path / "u", root.to_bytes()) == 1
    assert (tmp_path / "u" / "update" / "metadata" / "root.json").exists()
