"""A/B slots: install, commit, rollback, interruption at every step (a real child process
killed with SIGKILL), a full disk, and boot-time integrity with fallback and safe mode."""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Targets

import hearth.updates.bundle as bundle_mod
from hearth.device.slots import SlotManager, verify_active
from hearth.updates.bundle import Delivery
from hearth.updates.errors import UpdateError, UpdateReason
from tests.device.update_worker import kill_at
from tests.updates.support import World, bare_unit, make_world


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = make_world(tmp_path)
    w.publish("1.0.0")
    return w


@pytest.fixture
def unit(world: World, tmp_path: Path) -> Path:
    unit = bare_unit(tmp_path / "unit")
    world.provision(unit, "thermostat/thermostat-1.0.0.tar")
    return unit


def _install(world: World, unit: Path, version: str, **kw: object) -> str:
    name = f"thermostat/thermostat-{version}.tar"
    return SlotManager(unit).install(world.repo.target_file(name), world.repo.delivery(name),
                                     **kw)  # type: ignore[arg-type]


def _updated_to(world: World, unit: Path, version: str) -> None:
    """Publish, install, boot on trial and commit ``version``."""
    world.publish(version)
    _install(world, unit, version)
    slots = SlotManager(unit)
    assert slots.boot().trial
    slots.commit()


def test_factory_image_is_committed_in_slot_a(unit: Path) -> None:
    slots = SlotManager(unit)
    result = slots.boot()
    assert (result.slot, result.version, result.trial, result.safe_mode) == ("a", "1.0.0",
                                                                              False, False)
    assert result.app_dir == unit / "slots" / "a" / "app"
    assert (result.app_dir / "app.py").read_text().startswith("from lib")
    state = json.loads((unit / "slots" / "state.json").read_text())
    assert {k: state[k] for k in ("active", "pending", "committed", "versions",
                                  "boot_attempts")} == {
        "active": "a", "pending": None, "committed": "a",
        "versions": {"a": "1.0.0", "b": None}, "boot_attempts": 0}
    assert verify_active(unit).ok


def test_install_boot_commit(world: World, unit: Path) -> None:
    world.publish("1.1.0")
    assert _install(world, unit, "1.1.0") == "b"
    slots = SlotManager(unit)
    assert slots.state().pending == "b" and slots.installed_version() == "1.0.0"
    trial = slots.boot()
    assert (trial.slot, trial.version, trial.trial) == ("b", "1.1.0", True)
    assert slots.commit() == "b"
    after = slots.boot()
    assert (after.slot, after.version, after.trial) == ("b", "1.1.0", False)
    assert slots.state().last_result["result"] == "committed"  # type: ignore[index]
    world.publish("1.2.0")
    assert _install(world, unit, "1.2.0") == "a"  # always the slot not running


def test_failed_health_check_rolls_back(world: World, unit: Path) -> None:
    world.publish("1.1.0")
    _install(world, unit, "1.1.0")
    slots = SlotManager(unit)
    assert slots.boot().trial
    assert slots.rollback("health_check") == "a"
    result = slots.boot()
    assert (result.slot, result.version, result.trial) == ("a", "1.0.0", False)
    last = slots.state().last_result
    assert last is not None and (last["version"], last["result"], last["reason"]) == (
        "1.1.0", "rolled_back", "health_check")


def test_pending_slot_reverts_after_max_boot_attempts(world: World, unit: Path) -> None:
    world.publish("1.1.0")
    _install(world, unit, "1.1.0")
    slots = SlotManager(unit, max_boot_attempts=3)
    for attempt in (1, 2, 3):
        result = slots.boot()  # the new version crashes before its health check passes
        assert result.trial and result.slot == "b"
        assert slots.state().boot_attempts == attempt
    result = slots.boot()
    assert (result.slot, result.version, result.rolled_back) == ("a", "1.0.0", "boot_attempts")


def test_install_refuses_rollback_and_unmet_minimum(world: World, unit: Path) -> None:
    with pytest.raises(UpdateError) as e:
        _install(world, unit, "1.0.0")
    assert e.value.reason is UpdateReason.NOT_NEWER
    world.publish("0.9.0")
    with pytest.raises(UpdateError) as e:
        _install(world, unit, "0.9.0")
    assert e.value.reason is UpdateReason.NOT_NEWER
    world.publish("2.0.0", min_from="1.5.0")
    with pytest.raises(UpdateError) as e:
        _install(world, unit, "2.0.0")
    assert e.value.reason is UpdateReason.MIN_FROM_VERSION
    assert SlotManager(unit).state().versions == {"a": "1.0.0", "b": None}


def test_install_is_idempotent_and_one_at_a_time(world: World, unit: Path) -> None:
    world.publish("1.1.0")
    world.publish("1.2.0")
    assert _install(world, unit, "1.1.0") == "b"
    assert _install(world, unit, "1.1.0") == "b"  # a retry after the switch: nothing to do
    with pytest.raises(UpdateError) as e:
        _install(world, unit, "1.2.0")
    assert e.value.reason is UpdateReason.SLOT_BUSY


def test_install_refuses_a_bundle_that_is_not_the_signed_target(world: World, unit: Path,
                                                                tmp_path: Path) -> None:
    name = world.publish("1.1.0")
    evil = tmp_path / "evil.tar"
    data = bytearray(world.repo.target_file(name).read_bytes())
    data[700] ^= 1
    evil.write_bytes(bytes(data))
    with pytest.raises(UpdateError) as e:
        SlotManager(unit).install(evil, world.repo.delivery(name))
    assert e.value.reason is UpdateReason.HASH_MISMATCH
    assert not (unit / "slots" / "b").exists()


def test_install_refuses_another_models_release(world: World, unit: Path) -> None:
    name = world.publish("1.1.0", model="lock")
    with pytest.raises(UpdateError) as e:
        SlotManager(unit).install(world.repo.target_file(name), world.repo.delivery(name))
    assert e.value.reason is UpdateReason.WRONG_MODEL


def test_install_refuses_a_delivery_signed_by_an_unknown_key(world: World, unit: Path) -> None:
    name = world.publish("1.1.0")
    delivery = world.repo.delivery(name)
    md = Metadata[Targets].from_bytes(delivery.targets_metadata)
    md.sign(CryptoSigner.generate_ed25519())
    forged = Delivery(name, delivery.root_version, md.to_bytes())
    with pytest.raises(UpdateError) as e:
        SlotManager(unit).install(world.repo.target_file(name), forged)
    assert e.value.reason is UpdateReason.BAD_SIGNATURE


# --- interruption with kill -9 ----------------------------------------------------------------
INSTALL_STEPS = ["forget:temp-written", "forget", "extract:lib/control.py", "extracted",
                 "slot-replaced", "switch:temp-written"]


@pytest.mark.parametrize("point", INSTALL_STEPS)
def test_kill_during_install_boots_the_committed_version(world: World, unit: Path,
                                                         tmp_path: Path, point: str) -> None:
    _updated_to(world, unit, "1.1.0")  # b committed; a holds 1.0.0 and is overwritten next
    name = world.publish("1.2.0", extra_bytes=200_000)
    bundle, delivery = tmp_path / "dl.tar", tmp_path / "delivery.json"
    bundle.write_bytes(world.repo.target_file(name).read_bytes())
    delivery.write_bytes(world.repo.delivery(name).to_bytes())
    steps = kill_at(tmp_path, point, op="install", unit=str(unit), bundle=str(bundle),
                    delivery=str(delivery))
    assert steps[-1] == point
    # the restart: the unit boots the committed version, untouched
    result = SlotManager(unit).boot()
    assert (result.slot, result.version, result.trial, result.safe_mode) == ("b", "1.1.0",
                                                                              False, False)
    assert not result.tampered
    assert not list((unit / "slots").glob(".*.staging"))
    # and the update simply runs again
    assert SlotManager(unit).install(bundle, Delivery.parse(delivery.read_bytes())) == "a"
    trial = SlotManager(unit).boot()
    assert (trial.slot, trial.version, trial.trial) == ("a", "1.2.0", True)


def test_kill_right_after_the_switch_boots_the_new_version_on_trial(
    world: World, unit: Path, tmp_path: Path
) -> None:
    name = world.publish("1.1.0")
    delivery = tmp_path / "delivery.json"
    delivery.write_bytes(world.repo.delivery(name).to_bytes())
    steps = kill_at(tmp_path, "switch", op="install", unit=str(unit),
                    bundle=str(world.repo.target_file(name)), delivery=str(delivery))
    assert "extracted" in steps
    result = SlotManager(unit).boot()
    assert (result.slot, result.version, result.trial) == ("b", "1.1.0", True)


def test_kill_between_switch_and_commit_reverts_by_itself(world: World, unit: Path,
                                                          tmp_path: Path) -> None:
    world.publish("1.1.0")
    _install(world, unit, "1.1.0")
    for _ in range(3):  # the new version starts and is killed before its health check passes
        kill_at(tmp_path, "running", op="boot", unit=str(unit))
    assert SlotManager(unit).state().boot_attempts == 3
    result = SlotManager(unit).boot()
    assert (result.slot, result.version, result.trial, result.rolled_back) == (
        "a", "1.0.0", False, "boot_attempts")


def test_kill_while_writing_the_commit_keeps_a_bootable_unit(world: World, unit: Path,
                                                             tmp_path: Path) -> None:
    world.publish("1.1.0")
    _install(world, unit, "1.1.0")
    kill_at(tmp_path, "boot-attempt:temp-written", op="boot", unit=str(unit))
    result = SlotManager(unit).boot()  # the attempt was not recorded: this is attempt 1
    assert (result.slot, result.trial) == ("b", True)
    assert SlotManager(unit).state().boot_attempts == 1


# --- a full disk ------------------------------------------------------------------------------
def test_disk_full_during_extract_leaves_the_unit_bootable(
    world: World, unit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = world.publish("1.1.0", extra_bytes=300_000)
    real = bundle_mod._write_exclusive

    def full_disk(target: Path, reader: IO[bytes]) -> str:
        if target.name == "data.bin":
            with target.open("wb") as f:
                f.write(reader.read(4096))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, reader)

    monkeypatch.setattr(bundle_mod, "_write_exclusive", full_disk)
    with pytest.raises(UpdateError) as e:
        SlotManager(unit).install(world.repo.target_file(name), world.repo.delivery(name))
    assert e.value.reason is UpdateReason.NO_SPACE
    assert not list((unit / "slots").glob(".*.staging")), "partial files not cleaned up"
    result = SlotManager(unit).boot()
    assert (result.slot, result.version, result.trial) == ("a", "1.0.0", False)
    monkeypatch.undo()
    assert _install(world, unit, "1.1.0") == "b"  # space freed: the retry succeeds


@pytest.fixture
def small_flash(tmp_path: Path) -> Iterator[Path]:
    """A real 512 KiB file system (tmpfs) for the unit's flash; skipped where mounting is
    not permitted (the injected-ENOSPC test above covers the same path everywhere)."""
    mnt = tmp_path / "flash"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0755", "tmpfs",
                           str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: " + proc.stderr.decode()[:200])
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk_leaves_the_unit_bootable(world: World, small_flash: Path) -> None:
    unit = bare_unit(small_flash / "unit")
    world.provision(unit, "thermostat/thermostat-1.0.0.tar")
    name = world.publish("1.1.0", extra_bytes=1024 * 1024)  # twice the flash
    with pytest.raises(UpdateError) as e:
        SlotManager(unit).install(world.repo.target_file(name), world.repo.delivery(name))
    assert e.value.reason is UpdateReason.NO_SPACE
    assert not list((unit / "slots").glob(".*.staging"))
    result = SlotManager(unit).boot()
    assert (result.slot, result.version, result.safe_mode) == ("a", "1.0.0", False)
    world.publish("1.2.0")
    assert _install(world, unit, "1.2.0") == "b"


# --- boot-time integrity ----------------------------------------------------------------------
def test_tampered_active_slot_falls_back_and_alerts(world: World, unit: Path) -> None:
    _updated_to(world, unit, "1.1.0")  # b: 1.1.0 committed, a: 1.0.0 still verifies
    (unit / "slots" / "b" / "app" / "lib" / "control.py").write_text("import os  # evil\n")
    slots = SlotManager(unit)
    result = slots.boot()
    assert (result.slot, result.version, result.safe_mode) == ("a", "1.0.0", False)
    assert result.tampered == ("b",)
    assert result.problems["b"] == ("lib/control.py",)
    assert result.quarantined
    alert = slots.state().alert
    assert alert is not None and alert["kind"] == "tampered" and alert["slots"] == ["b"]
    # the quarantine outlives a restart, until an operator acts
    again = slots.boot()
    assert again.slot == "a" and again.quarantined and not again.tampered
    slots.acknowledge_alert()
    assert not slots.boot().quarantined


def test_both_slots_tampered_gives_safe_mode(world: World, unit: Path) -> None:
    _updated_to(world, unit, "1.1.0")
    (unit / "slots" / "a" / "app" / "app.py").write_text("evil = True\n")
    (unit / "slots" / "b" / "app" / "evil.py").write_text("evil = True\n")
    result = SlotManager(unit).boot()
    assert result.safe_mode and result.slot is None and result.app_dir is None
    assert set(result.tampered) == {"a", "b"} and result.quarantined
    assert result.problems["b"] == ("evil.py (unexpected)",)
    assert SlotManager(unit).boot().safe_mode  # stays there


def test_single_tampered_slot_without_fallback_is_safe_mode(unit: Path) -> None:
    (unit / "slots" / "a" / "app" / "lib" / "data.bin").unlink()
    result = SlotManager(unit).boot()
    assert result.safe_mode and result.problems["a"] == ("lib/data.bin (missing)",)


@pytest.mark.parametrize("attack", ["symlink", "manifest", "delivery", "chmod-dir"])
def test_other_tampering_is_detected(world: World, unit: Path, attack: str) -> None:
    app = unit / "slots" / "a" / "app"
    if attack == "symlink":
        (app / "app.py").unlink()
        (app / "app.py").symlink_to("/etc/hostname")
    elif attack == "manifest":
        path = unit / "slots" / "a" / "manifest.json"
        path.write_bytes(path.read_bytes().replace(b'"1.0.0"', b'"9.0.0"', 1))
    elif attack == "delivery":
        path = unit / "slots" / "a" / "delivery.json"
        obj = json.loads(path.read_bytes())
        obj["targets"]["signed"]["expires"] = "2099-01-01T00:00:00Z"
        path.write_text(json.dumps(obj))
    else:
        (app / "lib").rename(app / "lib2")
    check = SlotManager(unit).verify_slot("a")
    assert not check.ok and check.problems
    assert SlotManager(unit).boot().safe_mode


def test_tampered_trial_slot_is_abandoned(world: World, unit: Path) -> None:
    world.publish("1.1.0")
    _install(world, unit, "1.1.0")
    (unit / "slots" / "b" / "app" / "app.py").write_text("evil = True\n")
    result = SlotManager(unit).boot()
    assert (result.slot, result.version, result.rolled_back, result.tampered) == (
        "a", "1.0.0", "tampered", ("b",))
    assert SlotManager(unit).state().pending is None


def test_unreadable_state_recovers_to_a_verified_slot(world: World, unit: Path) -> None:
    _updated_to(world, unit, "1.1.0")
    (unit / "slots" / "state.json").write_text("{garbage")
    result = SlotManager(unit).boot()
    assert (result.slot, result.version, result.quarantined) == ("b", "1.1.0", True)
    assert SlotManager(unit).state().committed == "b"


def test_an_unprovisioned_unit_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UpdateError) as e:
        SlotManager(bare_unit(tmp_path / "u")).boot()
    assert e.value.reason is UpdateReason.NOT_PROVISIONED


def test_a_tampered_committed_slot_can_be_repaired_with_the_same_version(
    world: World, unit: Path
) -> None:
    (unit / "slots" / "a" / "app" / "app.py").write_text("evil = True\n")
    assert SlotManager(unit).boot().safe_mode
    assert SlotManager(unit).state().needs_repair
    assert _install(world, unit, "1.0.0") == "b"  # the operator re-sends the same release
    slots = SlotManager(unit)
    result = slots.boot()
    assert (result.slot, result.version, result.trial, result.quarantined) == (
        "b", "1.0.0", True, True)
    slots.commit()
    slots.acknowledge_alert()
    assert not slots.boot().quarantined
    with pytest.raises(UpdateError) as e:  # no longer a repair: the same version is refused
        _install(world, unit, "1.0.0")
    assert e.value.reason is UpdateReason.NOT_NEWER


def test_finish_trial_commits_or_rolls_back(world: World, unit: Path) -> None:
    world.publish("1.1.0")
    world.publish("1.2.0")
    _install(world, unit, "1.1.0")
    slots = SlotManager(unit)
    assert slots.boot().trial
    assert slots.finish_trial(lambda: True) == "b"
    assert slots.installed_version() == "1.1.0"
    _install(world, unit, "1.2.0")
    assert slots.boot().trial

    def crashes() -> bool:
        raise RuntimeError("the new version cannot reach the broker")

    assert slots.finish_trial(crashes) == "b"  # back to 1.1.0: restart into it
    assert slots.boot().version == "1.1.0"
    assert slots.finish_trial(lambda: False) == "b"  # nothing on trial: nothing changes
