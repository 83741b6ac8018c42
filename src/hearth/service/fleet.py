"""The fleet registry: importing factory manifests, listing and revoking units.

A factory manifest (:mod:`hearth.factory`) lists every minted unit with its certificate and
the *hash* of its broker password. Importing it is all-or-nothing: every unit is checked
first and one bad unit refuses the whole manifest (a manifest with a forged or foreign
certificate in it cannot be trusted for the others either). Each unit must have

* a device id of 128 random bits (32 lowercase hex digits) and a known model;
* exactly one PEM certificate that is signed by the device CA (signature *and* issuer name
  checked with the CA's public key), is not a CA itself, allows client authentication, is
  currently valid, and whose common name is the device id;
* a broker password hash in the dynamic-security format (base64 PBKDF2-SHA512 digest, salt,
  iterations) - a hash, never the password;
* optionally ``setup_code_hash``: an argon2id hash (bounded cost parameters) of the setup
  code, stored for claiming (:mod:`hearth.service.accounts`). A unit registered without one
  gets it from a later import of the same unit.

Re-importing the same manifest is a no-op; a *different* certificate for an id that is
already registered is refused (ids are never reassigned), and re-importing a revoked unit
does not bring it back.

Functions take a session and do not commit: the caller owns the transaction.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy.orm import Session

from hearth.errors import NotFoundError, ValidationError
from hearth.pki import DEVICE_ID_RE
from hearth.protocol import MODELS
from hearth.service.db import utcnow
from hearth.service.models import (
    OPEN_COMMAND_STATUSES,
    CommandRow,
    CommandStatus,
    Unit,
    UnitStatus,
)

__all__ = [
    "ImportRefused",
    "ImportResult",
    "UnitProblem",
    "get_unit",
    "import_manifest",
    "list_units",
    "mark_revoked",
]

MANIFEST_FORMAT = 1
MAX_UNITS_PER_MANIFEST = 1_000_000
MAX_CERT_PEM_BYTES = 8 * 1024
_PBKDF2_SHA512_BYTES = 64
_MAX_ITERATIONS = 10_000_000
_QUERY_CHUNK = 500


@dataclass(frozen=True)
class ImportResult:
    imported: int
    """Units added by this import."""
    unchanged: int
    """Units that were already registered with the same certificate (re-import)."""

    @property
    def total(self) -> int:
        return self.imported + self.unchanged


@dataclass(frozen=True)
class UnitProblem:
    index: int
    device_id: str
    reason: str
    detail: str


class ImportRefused(ValidationError):
    """A manifest was refused; ``problems`` lists every bad unit (nothing was imported)."""

    def __init__(self, problems: Sequence[UnitProblem]) -> None:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(
            first.reason, f"unit #{first.index} {first.device_id}: {first.detail}{more}"
        )
        self.problems = tuple(problems)


@dataclass(frozen=True)
class _Checked:
    device_id: str
    model: str
    cert_pem: str
    cert_der: bytes
    serial: str
    password_hash: dict[str, Any]
    setup_code_hash: str | None = None


_ARGON2_MAX_MEMORY_KIB = 256 * 1024
_ARGON2_MAX_TIME = 10


def _check_setup_code_hash(value: object) -> str | None:
    """An argon2id hash with sane cost (a manifest must not make every claim cost minutes)."""
    if value is None:
        return None
    from argon2 import Type, extract_parameters
    from argon2.exceptions import InvalidHashError

    if not isinstance(value, str) or len(value) > 256 or not value.startswith("$argon2id$"):
        raise ValueError("setup_code_hash must be an argon2id hash")
    try:
        params = extract_parameters(value)
    except (InvalidHashError, ValueError):
        raise ValueError("setup_code_hash is not a valid argon2id hash") from None
    if (params.type is not Type.ID or not 8 <= params.memory_cost <= _ARGON2_MAX_MEMORY_KIB
            or not 1 <= params.time_cost <= _ARGON2_MAX_TIME or params.parallelism > 8
            or params.salt_len < 8):
        raise ValueError("setup_code_hash has out-of-range argon2 parameters")
    return value


def _problem(index: int, device_id: object, reason: str, detail: str) -> UnitProblem:
    shown = device_id if isinstance(device_id, str) and DEVICE_ID_RE.match(device_id) else "?"
    return UnitProblem(index, shown, reason, detail)


def _check_password_hash(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"password", "salt", "iterations"}:
        raise ValueError("must have exactly password, salt and iterations")
    iterations = value["iterations"]
    if isinstance(iterations, bool) or not isinstance(iterations, int):
        raise ValueError("iterations must be an integer")
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError("iterations out of range")
    try:
        digest = base64.b64decode(value["password"], validate=True)
        salt = base64.b64decode(value["salt"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ValueError("password and salt must be base64") from None
    if len(digest) != _PBKDF2_SHA512_BYTES:
        raise ValueError("password must be a PBKDF2-SHA512 digest (a hash, not a password)")
    if not 8 <= len(salt) <= 64:
        raise ValueError("salt must be 8..64 bytes")
    return {"password": value["password"], "salt": value["salt"], "iterations": iterations}


class _CertFailure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _check_certificate(
    pem: object, device_id: str, ca: x509.Certificate, now: dt.datetime
) -> x509.Certificate:
    """The parsed certificate; raises :class:`_CertFailure` with a reason and detail."""
    if not isinstance(pem, str) or len(pem) > MAX_CERT_PEM_BYTES:
        raise _CertFailure("invalid_certificate", "certificate must be one PEM string")
    if pem.count("-----BEGIN") != 1:
        raise _CertFailure("invalid_certificate", "exactly one PEM certificate expected")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise _CertFailure("invalid_certificate", "certificate does not parse") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise _CertFailure(
            "untrusted_certificate", "certificate is not signed by the device CA"
        ) from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != device_id:
        raise _CertFailure("certificate_mismatch", "certificate common name is not the device id")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise _CertFailure(
            "invalid_certificate", "certificate lacks basic constraints or key usage"
        ) from None
    if basic.ca:
        raise _CertFailure("invalid_certificate", "a CA certificate cannot be a unit")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise _CertFailure("invalid_certificate", "certificate is not for client authentication")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise _CertFailure("certificate_expired", "certificate is not currently valid")
    return cert


def _check_manifest(
    manifest: Mapping[str, Any], ca: x509.Certificate, now: dt.datetime
) -> tuple[list[_Checked], list[UnitProblem]]:
    if not isinstance(manifest, Mapping) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValidationError("invalid_manifest",
                              f"not a Hearth manifest (format {MANIFEST_FORMAT})")
    units = manifest.get("units")
    if not isinstance(units, list):
        raise ValidationError("invalid_manifest", "manifest has no units list")
    if len(units) > MAX_UNITS_PER_MANIFEST:
        raise ValidationError("invalid_manifest", f"at most {MAX_UNITS_PER_MANIFEST} units")
    checked: list[_Checked] = []
    problems: list[UnitProblem] = []
    seen: set[str] = set()
    for index, unit in enumerate(units):
        if not isinstance(unit, dict):
            problems.append(_problem(index, None, "invalid_manifest", "unit is not an object"))
            continue
        device_id = unit.get("device_id")
        if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
            problems.append(_problem(index, device_id, "invalid_device_id",
                                     "device id must be 32 lowercase hex digits"))
            continue
        if device_id in seen:
            problems.append(_problem(index, device_id, "duplicate_device_id",
                                     "device id appears twice in the manifest"))
            continue
        seen.add(device_id)
        model = unit.get("model")
        if not isinstance(model, str) or model not in MODELS:
            problems.append(_problem(index, device_id, "unknown_model",
                                     f"unknown model; known: {', '.join(sorted(MODELS))}"))
            continue
        try:
            cert = _check_certificate(unit.get("certificate"), device_id, ca, now)
        except _CertFailure as e:
            problems.append(_problem(index, device_id, e.reason, e.detail))
            continue
        try:
            password_hash = _check_password_hash(unit.get("mqtt_password_hash"))
        except ValueError as e:
            problems.append(_problem(index, device_id, "invalid_password_hash", str(e)))
            continue
        try:
            setup_code_hash = _check_setup_code_hash(unit.get("setup_code_hash"))
        except ValueError as e:
            problems.append(_problem(index, device_id, "invalid_setup_code_hash", str(e)))
            continue
        checked.append(
            _Checked(
                device_id=device_id,
                model=model,
                cert_pem=cert.public_bytes(Encoding.PEM).decode(),
                cert_der=cert.public_bytes(Encoding.DER),
                serial=str(cert.serial_number),
                password_hash=password_hash,
                setup_code_hash=setup_code_hash,
            )
        )
    return checked, problems


def import_manifest(
    session: Session,
    manifest: Mapping[str, Any],
    *,
    device_ca_cert: x509.Certificate,
    now: dt.datetime | None = None,
) -> ImportResult:
    """Validate every unit of ``manifest`` and register the new ones (caller commits).

    Raises :class:`ImportRefused` (a :class:`ValidationError`) listing every bad unit, or
    :class:`ValidationError` ``invalid_manifest`` if the document itself is malformed.
    Nothing is written when it raises.
    """
    now = now or utcnow()
    checked, problems = _check_manifest(manifest, device_ca_cert, now)
    existing: dict[str, Unit] = {}
    ids = [c.device_id for c in checked]
    for start in range(0, len(ids), _QUERY_CHUNK):
        chunk = ids[start:start + _QUERY_CHUNK]
        for unit in session.scalars(sa.select(Unit).where(Unit.device_id.in_(chunk))):
            existing[unit.device_id] = unit
    new: list[_Checked] = []
    fills: list[tuple[Unit, str]] = []
    unchanged = 0
    index_of = {c.device_id: i for i, c in enumerate(checked)}
    for c in checked:
        old = existing.get(c.device_id)
        if old is None:
            new.append(c)
            continue
        old_der = x509.load_pem_x509_certificate(old.certificate_pem.encode()).public_bytes(
            Encoding.DER
        )
        if old_der != c.cert_der or old.model != c.model:
            problems.append(UnitProblem(index_of[c.device_id], c.device_id, "conflict",
                                        "a different unit is already registered with this id"))
        else:
            unchanged += 1
            if old.setup_code_hash is None and c.setup_code_hash is not None:
                fills.append((old, c.setup_code_hash))
    if problems:
        problems.sort(key=lambda p: p.index)
        raise ImportRefused(problems)
    for old, code_hash in fills:
        old.setup_code_hash = code_hash
    for start in range(0, len(new), _QUERY_CHUNK):
        session.execute(
            sa.insert(Unit),
            [
                {
                    "device_id": c.device_id,
                    "model": c.model,
                    "certificate_pem": c.cert_pem,
                    "cert_serial": c.serial,
                    "mqtt_password_hash": c.password_hash,
                    "status": UnitStatus.ACTIVE.value,
                    "imported_at": now,
                    "latest_state": {},
                    "setup_code_hash": c.setup_code_hash,
                }
                for c in new[start:start + _QUERY_CHUNK]
            ],
        )
    return ImportResult(imported=len(new), unchanged=unchanged)


def get_unit(session: Session, device_id: str) -> Unit:
    """The unit with ``device_id``. Raises :class:`NotFoundError`."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise NotFoundError("no such unit")
    unit = session.get(Unit, device_id)
    if unit is None:
        raise NotFoundError("no such unit")
    return unit


def list_units(
    session: Session,
    *,
    limit: int = 100,
    after: str | None = None,
    status: UnitStatus | None = None,
    model: str | None = None,
) -> list[Unit]:
    """Units ordered by device id, at most ``limit``, starting after the ``after`` cursor."""
    if limit < 1:
        raise ValidationError("out_of_range", "limit must be at least 1")
    stmt = sa.select(Unit).order_by(Unit.device_id).limit(limit)
    if after is not None:
        stmt = stmt.where(Unit.device_id > after)
    if status is not None:
        stmt = stmt.where(Unit.status == status.value)
    if model is not None:
        stmt = stmt.where(Unit.model == model)
    return list(session.scalars(stmt))


def mark_revoked(session: Session, device_id: str, *, now: dt.datetime | None = None) -> Unit:
    """Record the unit as revoked (idempotent) and fail its open commands.

    Cutting the unit off at the broker is the caller's job (see ``api.Revoker``); ingest
    quarantines anything a revoked unit still sends. Raises :class:`NotFoundError`.
    """
    now = now or utcnow()
    unit = get_unit(session, device_id)
    if unit.status != UnitStatus.REVOKED:
        unit.status = UnitStatus.REVOKED.value
        unit.revoked_at = now
    session.execute(
        sa.update(CommandRow)
        .where(CommandRow.device_id == device_id, CommandRow.status.in_(OPEN_COMMAND_STATUSES))
        .values(
            status=CommandStatus.FAILED.value,
            completed_at=now,
            result={"source": "service", "status": "failed", "reason": "revoked",
                    "detail": "unit was revoked"},
        )
    )
    session.flush()
    return unit
