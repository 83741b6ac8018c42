"""Claiming a unit: typed code, prefix of the device id, QR image, setup URI; a wrong code
never reveals whether the unit exists; a claimed unit cannot be claimed again; the unit
learns its owner over its link (a verifier, never the credential)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from hearth import protocol
from hearth.labels import label_png
from hearth.pki import MakerPKI
from hearth.service.accounts.claims import ClaimRefused, Ownership
from hearth.service.accounts.models import UnitOwner
from hearth.service.accounts.service import AccountsService
from hearth.service.commands import InMemoryCommandPublisher
from hearth.service.models import Unit, UnitStatus
from hearth.setupcode import new_setup_code, setup_uri

from .conftest import Minted, api_token, consumer, hidden, new_client, sign_up


def account(service: AccountsService, email: str) -> str:
    return service.sign_up(email, "correct horse battery staple", address="10.0.0.1")


def claim_form(client: TestClient, device_id: str, code: str) -> Any:
    token = hidden(client.get("/units/claim").text)
    return client.post("/units/claim", data={"csrf_token": token, "device_id": device_id,
                                             "setup_code": code})


def test_typed_code_with_the_first_8_characters_claims_the_unit(
        app: Any, minted: Minted, publisher: InMemoryCommandPublisher) -> None:
    c = consumer(app, "alice@example.org")
    dev = minted.thermostats[0]
    r = claim_form(c, dev[:8].upper(), minted.codes[dev].lower().replace("-", " "))
    assert r.status_code == 201, r.text
    assert dev[:8] in r.text
    units = c.get("/units").text
    assert dev in units


def test_the_unit_learns_its_owner_as_a_verifier_never_the_credential(
        service: AccountsService, minted: Minted, publisher: InMemoryCommandPublisher,
        sessions: sessionmaker[Session], engine: Any, tmp_path: Path) -> None:
    who = account(service, "alice@example.org")
    dev = minted.thermostats[0]
    result = service.ownership.claim(who, dev, minted.codes[dev], address="10.0.0.1")
    bind = [c for c in publisher.published if c.name == "bind_owner"]
    assert len(bind) == 1 and bind[0].device_id == dev
    assert bind[0].params["verifier"] == protocol.owner_verifier(result.credential)
    assert result.credential not in str(bind[0].params)
    # the credential is nowhere in the database (a dump of every table)
    with sessions() as s:
        dump = "".join(str(row) for table in ("unit_owners", "commands", "accounts")
                       for row in s.execute(sa.text(f"SELECT * FROM {table}")))  # noqa: S608
    assert result.credential not in dump and minted.codes[dev] not in dump
    assert protocol.owner_verifier(result.credential) in dump


def test_wrong_code_and_unknown_unit_get_the_same_answer_after_one_verification(
        service: AccountsService, minted: Minted, monkeypatch: pytest.MonkeyPatch) -> None:
    who = account(service, "mallory@example.org")
    calls: list[str] = []
    real = Ownership._verify

    def counting(self: Ownership, stored: str, code: str) -> bool:
        calls.append(stored)
        return real(self, stored, code)

    monkeypatch.setattr(Ownership, "_verify", counting)
    dev = minted.thermostats[1]
    answers = []
    for device_ref in (dev, secrets.token_hex(16), dev[:8], "0123abcd"):
        calls.clear()
        with pytest.raises(ClaimRefused) as e:
            service.ownership.claim(who, device_ref, new_setup_code(), address=None)
        answers.append((e.value.reason, e.value.detail))
        assert len(calls) == 1, "exactly one argon2id verification per attempt"
    assert len(set(answers)) == 1 and answers[0][0] == "claim_failed"


def test_a_typo_is_caught_by_the_check_symbol_and_costs_nothing(
        service: AccountsService, minted: Minted, sessions: sessionmaker[Session]) -> None:
    who = account(service, "alice@example.org")
    dev = minted.thermostats[0]
    code = minted.codes[dev]
    typo = code[:-1] + ("0" if code[-1] != "0" else "1")
    with pytest.raises(ClaimRefused) as e:
        service.ownership.claim(who, dev, typo, address=None)
    assert e.value.reason == "invalid_setup_code"
    with sessions() as s:
        assert s.scalar(sa.text("SELECT count(*) FROM throttles WHERE key LIKE 'claim:%'")) == 0


def test_someone_elses_unit_cannot_be_claimed(app: Any, minted: Minted) -> None:
    alice = consumer(app, "alice@example.org", "10.0.0.1")
    bob = consumer(app, "bob@example.org", "10.0.0.2")
    dev = minted.thermostats[0]
    assert claim_form(alice, dev, minted.codes[dev]).status_code == 201
    taken = claim_form(bob, dev, minted.codes[dev])
    assert taken.status_code == 409 and "already claimed" in taken.text
    wrong = claim_form(bob, dev, new_setup_code())
    assert wrong.status_code == 400 and "do not match" in wrong.text
    again = claim_form(alice, dev, minted.codes[dev])
    assert again.status_code == 409 and "already yours" in again.text
    assert dev not in bob.get("/units").text


def test_released_unit_can_be_claimed_again_and_the_old_owner_loses_it(
        app: Any, minted: Minted, publisher: InMemoryCommandPublisher) -> None:
    alice = consumer(app, "alice@example.org", "10.0.0.1")
    bob = consumer(app, "bob@example.org", "10.0.0.2")
    dev = minted.thermostats[0]
    assert claim_form(alice, dev, minted.codes[dev]).status_code == 201
    page = alice.get(f"/units/{dev}")
    r = alice.post(f"/units/{dev}/release", data={"csrf_token": hidden(page.text)})
    assert r.status_code == 200 and "released" in r.text
    assert alice.get(f"/units/{dev}").status_code == 404
    assert any(c.name == "unbind_owner" for c in publisher.published)
    assert claim_form(bob, dev, minted.codes[dev]).status_code == 201


def test_claim_by_uploading_a_photo_of_the_label(app: Any, minted: Minted) -> None:
    c = consumer(app, "alice@example.org")
    dev = minted.thermostats[2]
    png = (minted.directory / "labels" / f"{dev}.png").read_bytes()
    token = hidden(c.get("/units/claim").text)
    r = c.post("/units/claim/qr", data={"csrf_token": token},
               files={"label": ("label.png", png, "image/png")})
    assert r.status_code == 201, r.text
    assert dev in c.get("/units").text


@pytest.mark.parametrize(("data", "reason"), [
    (b"not an image at all", "invalid_image"),
    (b"", "invalid_image"),
    (label_png("0" * 32, new_setup_code(), "thermostat")[:200], "invalid_image"),
])
def test_bad_uploads_are_refused_clearly(app: Any, data: bytes, reason: str) -> None:
    c = consumer(app, "alice@example.org")
    token = hidden(c.get("/units/claim").text)
    r = c.post("/units/claim/qr", data={"csrf_token": token},
               files={"label": ("label.png", data, "image/png")})
    assert r.status_code == 400 and reason in r.text


def test_an_image_without_a_qr_code_is_refused(app: Any) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (200, 200), 255).save(buf, format="PNG")
    c = consumer(app, "alice@example.org")
    token = hidden(c.get("/units/claim").text)
    r = c.post("/units/claim/qr", data={"csrf_token": token},
               files={"label": ("white.png", buf.getvalue(), "image/png")})
    assert r.status_code == 400 and "no_qr_code" in r.text


def test_api_claim_with_the_setup_uri(app: Any, minted: Minted) -> None:
    c = new_client(app)
    assert sign_up(c, "api@example.org").status_code == 303
    token = api_token(c, "api@example.org")
    dev = minted.locks[0]
    r = c.post("/api/v1/account/units", json={"setup_uri": setup_uri(dev, minted.codes[dev])},
               headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["device_id"] == dev and len(body["local_credential"]) == 43
    assert len(body["certificate_sha256"]) == 64
    listed = c.get("/api/v1/account/units", headers={"Authorization": f"Bearer {token}"})
    assert [u["device_id"] for u in listed.json()["units"]] == [dev]


def test_revoked_units_and_units_without_a_code_hash_cannot_be_claimed(
        service: AccountsService, minted: Minted, sessions: sessionmaker[Session]) -> None:
    who = account(service, "alice@example.org")
    revoked, no_hash = minted.thermostats[0], minted.thermostats[1]
    with sessions.begin() as s:
        s.execute(sa.update(Unit).where(Unit.device_id == revoked).values(
            status=UnitStatus.REVOKED.value))
        s.execute(sa.update(Unit).where(Unit.device_id == no_hash).values(setup_code_hash=None))
    for dev in (revoked, no_hash):
        with pytest.raises(ClaimRefused) as e:
            service.ownership.claim(who, dev, minted.codes[dev], address=None)
        assert e.value.reason == "claim_failed"
    with sessions() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(UnitOwner)) == 0


def test_the_fleet_import_stores_the_code_hash_and_refuses_a_bad_one(
        minted: Minted, sessions: sessionmaker[Session], session_pki: MakerPKI) -> None:
    from hearth.factory import load_manifest
    from hearth.service import fleet

    with sessions() as s:
        hashes = {r[0]: r[1] for r in s.execute(sa.select(Unit.device_id, Unit.setup_code_hash))}
    assert set(hashes) == set(minted.codes)
    assert all(h and h.startswith("$argon2id$") for h in hashes.values())
    manifest = load_manifest(minted.directory)
    manifest["units"][0]["setup_code_hash"] = minted.codes[manifest["units"][0]["device_id"]]
    with sessions() as s, pytest.raises(fleet.ImportRefused) as e:
        fleet.import_manifest(s, manifest, device_ca_cert=session_pki.device_ca.cert)
    assert e.value.reason == "invalid_setup_code_hash"
