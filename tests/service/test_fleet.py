"""Fleet import: only units that really come from our factory get in; re-import is a no-op."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.orm import Session, sessionmaker

from hearth.errors import NotFoundError, ValidationError
from hearth.factory import load_manifest, mint
from hearth.pki import MakerPKI, _name, cert_to_pem, generate_key, new_device_id
from hearth.service import fleet
from hearth.service.models import CommandRow, Unit, UnitStatus
from tests.service.conftest import Fleet


def _import(
    sf: sessionmaker[Session], manifest: dict[str, Any], pki: MakerPKI
) -> fleet.ImportResult:
    with sf.begin() as s:
        return fleet.import_manifest(s, manifest, device_ca_cert=pki.device_ca.cert)


def _count(sf: sessionmaker[Session]) -> int:
    with sf() as s:
        return int(s.scalar(sa.select(sa.func.count()).select_from(Unit)) or 0)


def _refused(sf: sessionmaker[Session], manifest: dict[str, Any], pki: MakerPKI) -> str:
    with pytest.raises(fleet.ImportRefused) as info:
        _import(sf, manifest, pki)
    assert _count(sf) == 0, "a refused manifest must import nothing"
    return info.value.reason


def test_valid_manifest_is_imported(sf: sessionmaker[Session], minted: Fleet,
                                    session_pki: MakerPKI) -> None:
    result = _import(sf, minted.copy_manifest(), session_pki)
    assert (result.imported, result.unchanged) == (5, 0)
    with sf() as s:
        unit = fleet.get_unit(s, minted.thermostats[0])
        assert unit.model == "thermostat"
        assert unit.status == UnitStatus.ACTIVE
        assert unit.imported_at.tzinfo == dt.UTC
        cert = x509.load_pem_x509_certificate(unit.certificate_pem.encode())
        assert unit.cert_serial == str(cert.serial_number)
        assert set(unit.mqtt_password_hash) == {"password", "salt", "iterations"}
        assert len(fleet.list_units(s)) == 5


def test_reimport_is_a_no_op(sf: sessionmaker[Session], minted: Fleet,
                             session_pki: MakerPKI) -> None:
    _import(sf, minted.copy_manifest(), session_pki)
    result = _import(sf, minted.copy_manifest(), session_pki)
    assert (result.imported, result.unchanged) == (0, 5)
    assert _count(sf) == 5


def test_manifest_secrets_are_never_stored(sf: sessionmaker[Session], minted: Fleet,
                                           session_pki: MakerPKI) -> None:
    _import(sf, minted.copy_manifest(), session_pki)
    with sf() as s:
        dump = repr([
            (u.certificate_pem, u.mqtt_password_hash, u.latest_state)
            for u in s.scalars(sa.select(Unit))
        ])
    for device_id in minted.thermostats + minted.locks:
        secret = (minted.directory / device_id / "mqtt.secret").read_text().strip()
        assert secret not in dump


def test_tampered_certificate_is_refused(sf: sessionmaker[Session], minted: Fleet,
                                         session_pki: MakerPKI) -> None:
    manifest = minted.copy_manifest()
    unit = manifest["units"][0]
    cert = x509.load_pem_x509_certificate(unit["certificate"].encode())
    der = cert.public_bytes(Encoding.DER)
    cn = unit["device_id"].encode()
    forged = unit["device_id"][0] + ("0" if unit["device_id"][1] != "0" else "1")
    forged += unit["device_id"][2:]
    tampered = der.replace(cn, forged.encode())
    assert tampered != der
    unit["device_id"] = forged
    unit["certificate"] = cert_to_pem(x509.load_der_x509_certificate(tampered)).decode()
    assert _refused(sf, manifest, session_pki) == "untrusted_certificate"


def test_certificate_from_another_ca_is_refused(sf: sessionmaker[Session], minted: Fleet,
                                                session_pki: MakerPKI, tmp_path: Path) -> None:
    rogue = MakerPKI.create(tmp_path / "rogue")
    # Same default organisation, so even the issuer *name* matches: only the key differs.
    assert rogue.device_ca.cert.subject == session_pki.device_ca.cert.subject
    mint(rogue, model="thermostat", count=1, out=tmp_path / "rogue-out", labels=False)
    foreign = load_manifest(tmp_path / "rogue-out")["units"][0]
    manifest = minted.copy_manifest()
    manifest["units"].append(foreign)
    assert _refused(sf, manifest, session_pki) == "untrusted_certificate"


def test_common_name_must_be_the_device_id(sf: sessionmaker[Session], minted: Fleet,
                                           session_pki: MakerPKI) -> None:
    manifest = minted.copy_manifest()
    a, b = manifest["units"][0], manifest["units"][1]
    a["certificate"], b["certificate"] = b["certificate"], a["certificate"]
    assert _refused(sf, manifest, session_pki) == "certificate_mismatch"


def test_unknown_model_is_refused(sf: sessionmaker[Session], minted: Fleet,
                                  session_pki: MakerPKI) -> None:
    manifest = minted.copy_manifest()
    manifest["units"][2]["model"] = "toaster"
    assert _refused(sf, manifest, session_pki) == "unknown_model"


@pytest.mark.parametrize("device_id", ["", "ABCDEF" * 6, "1" * 31, "../etc/passwd", 42])
def test_bad_device_id_is_refused(sf: sessionmaker[Session], minted: Fleet,
                                  session_pki: MakerPKI, device_id: object) -> None:
    manifest = minted.copy_manifest()
    manifest["units"][0]["device_id"] = device_id
    assert _refused(sf, manifest, session_pki) == "invalid_device_id"


def test_duplicate_device_id_in_manifest_is_refused(sf: sessionmaker[Session], minted: Fleet,
                                                    session_pki: MakerPKI) -> None:
    manifest = minted.copy_manifest()
    manifest["units"].append(dict(manifest["units"][0]))
    assert _refused(sf, manifest, session_pki) == "duplicate_device_id"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h.pop("salt"),
        lambda h: h.update(extra=1),
        lambda h: h.update(iterations="101"),
        lambda h: h.update(iterations=0),
        lambda h: h.update(password="not base64!"),
        # a plaintext password where the hash belongs: not a 64-byte PBKDF2-SHA512 digest
        lambda h: h.update(password=base64.b64encode(b"correct horse battery").decode()),
    ],
)
def test_password_hash_must_be_a_hash(sf: sessionmaker[Session], minted: Fleet,
                                      session_pki: MakerPKI, mutate: Any) -> None:
    manifest = minted.copy_manifest()
    mutate(manifest["units"][0]["mqtt_password_hash"])
    assert _refused(sf, manifest, session_pki) == "invalid_password_hash"


def test_ca_certificate_cannot_pose_as_a_unit(sf: sessionmaker[Session], minted: Fleet,
                                             session_pki: MakerPKI) -> None:
    manifest = minted.copy_manifest()
    unit = manifest["units"][0]
    ca_like = session_pki.device_ca.sign(subject=_name(unit["device_id"], "Hearth Maker"),
                                         public_key=generate_key().public_key(),
                                         validity=dt.timedelta(days=30), is_ca=True,
                                         ca_path_length=0)
    unit["certificate"] = cert_to_pem(ca_like).decode()
    assert _refused(sf, manifest, session_pki) == "invalid_certificate"


def test_expired_certificate_is_refused(sf: sessionmaker[Session], minted: Fleet,
                                        session_pki: MakerPKI) -> None:
    manifest = minted.copy_manifest()
    unit = manifest["units"][0]
    old = session_pki.issue_device_cert(
        unit["device_id"], generate_key().public_key(), validity=dt.timedelta(days=1),
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    unit["certificate"] = cert_to_pem(old).decode()
    assert _refused(sf, manifest, session_pki) == "certificate_expired"


@pytest.mark.parametrize("certificate", [None, "", "garbage", "-----BEGIN CERTIFICATE-----\nAAAA\n"
                                         "-----END CERTIFICATE-----\n"])
def test_unparseable_certificate_is_refused(sf: sessionmaker[Session], minted: Fleet,
                                            session_pki: MakerPKI, certificate: object) -> None:
    manifest = minted.copy_manifest()
    manifest["units"][0]["certificate"] = certificate
    assert _refused(sf, manifest, session_pki) == "invalid_certificate"


def test_two_certificates_in_one_field_are_refused(sf: sessionmaker[Session], minted: Fleet,
                                                   session_pki: MakerPKI) -> None:
    manifest = minted.copy_manifest()
    manifest["units"][0]["certificate"] += manifest["units"][1]["certificate"]
    assert _refused(sf, manifest, session_pki) == "invalid_certificate"


def test_conflicting_certificate_for_a_registered_id_is_refused(
    sf: sessionmaker[Session], minted: Fleet, session_pki: MakerPKI
) -> None:
    _import(sf, minted.copy_manifest(), session_pki)
    manifest = minted.copy_manifest()
    unit = manifest["units"][0]
    other = session_pki.issue_device_cert(unit["device_id"], generate_key().public_key())
    unit["certificate"] = cert_to_pem(other).decode()
    with pytest.raises(fleet.ImportRefused) as info:
        _import(sf, manifest, session_pki)
    assert info.value.reason == "conflict"
    with sf() as s:
        kept = fleet.get_unit(s, unit["device_id"]).certificate_pem
    assert kept == minted.manifest["units"][0]["certificate"]


def test_every_problem_is_reported(sf: sessionmaker[Session], minted: Fleet,
                                  session_pki: MakerPKI) -> None:
    manifest = minted.copy_manifest()
    manifest["units"][1]["model"] = "toaster"
    manifest["units"][3]["certificate"] = "garbage"
    with pytest.raises(fleet.ImportRefused) as info:
        _import(sf, manifest, session_pki)
    assert [(p.index, p.reason) for p in info.value.problems] == [
        (1, "unknown_model"), (3, "invalid_certificate")]
    assert "1 more" in info.value.detail


@pytest.mark.parametrize("manifest", [{}, {"format": 2, "units": []}, {"format": 1},
                                      {"format": 1, "units": {}}, {"format": 1, "units": [1]}])
def test_malformed_manifest_is_refused(sf: sessionmaker[Session], session_pki: MakerPKI,
                                       manifest: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _import(sf, manifest, session_pki)


def test_revoked_unit_stays_revoked_on_reimport(sf: sessionmaker[Session], imported: Fleet,
                                               session_pki: MakerPKI) -> None:
    device_id = imported.thermostats[0]
    with sf.begin() as s:
        s.add(CommandRow(command_id="c" * 32, device_id=device_id, name="set_target",
                         params={"target": 20.0}, issued_at=dt.datetime.now(dt.UTC),
                         expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5),
                         status="sent", result=None, completed_at=None))
    with sf.begin() as s:
        unit = fleet.mark_revoked(s, device_id)
        assert unit.status == UnitStatus.REVOKED and unit.revoked_at is not None
        first_revoked_at = unit.revoked_at
    with sf.begin() as s:
        assert fleet.mark_revoked(s, device_id).revoked_at == first_revoked_at  # idempotent
    result = _import(sf, imported.copy_manifest(), session_pki)
    assert result.unchanged == 5
    with sf() as s:
        assert fleet.get_unit(s, device_id).status == UnitStatus.REVOKED
        command = s.get(CommandRow, "c" * 32)
        assert command is not None and command.status == "failed"
        assert command.result is not None and command.result["reason"] == "revoked"


def test_list_units_pages_and_filters(sf: sessionmaker[Session], imported: Fleet) -> None:
    with sf() as s:
        first = fleet.list_units(s, limit=2)
        rest = fleet.list_units(s, limit=10, after=first[-1].device_id)
        ids = [u.device_id for u in first + rest]
        assert ids == sorted(imported.thermostats + imported.locks)
        assert {u.device_id for u in fleet.list_units(s, model="lock")} == set(imported.locks)
        assert fleet.list_units(s, status=UnitStatus.REVOKED) == []


@pytest.mark.parametrize("device_id", ["0" * 32, "nope", ""])
def test_get_unknown_unit(sf: sessionmaker[Session], device_id: str) -> None:
    with sf() as s, pytest.raises(NotFoundError):
        fleet.get_unit(s, device_id)
    with sf() as s, pytest.raises(NotFoundError):
        fleet.mark_revoked(s, device_id)


def test_new_units_can_be_added_to_a_registered_fleet(
    sf: sessionmaker[Session], imported: Fleet, session_pki: MakerPKI, tmp_path: Path
) -> None:
    mint(session_pki, model="lock", count=1, out=tmp_path / "more", labels=False)
    more = load_manifest(tmp_path / "more")
    manifest = imported.copy_manifest()
    manifest["units"] += more["units"]
    result = _import(sf, manifest, session_pki)
    assert (result.imported, result.unchanged) == (1, 5)
    assert new_device_id() != more["units"][0]["device_id"]
