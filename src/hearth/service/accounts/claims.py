"""Claiming units, owning them, releasing them, and telling the unit (guidelines 1, 11, 12).

Claiming::

    consumer (signed in) --device id (or its first 8+ hex digits) + setup code,
                            or the label's QR image / setup URI-->
        1. the code's check symbol (a typo is caught here, free of charge);
        2. throttles charged: per unit (first 8 hex digits), per account, per address;
        3. ONE argon2id verification - against the unit's stored hash, or against a dummy
           hash when no such unit exists, so a wrong code for a real unit and any code for
           a made-up unit take the same time and give the same answer ("claim_failed");
        4. the unit must be active and unclaimed ("already_claimed" is only ever said to
           someone who holds the right code);
        5. an owner binding is stored: an opaque ``owner_ref`` and the *verifier* of a
           fresh 256-bit local-access credential, which is returned once to the owner;
        6. the unit learns the binding over its link: a ``bind_owner`` command.

The service keeps telling the unit until it confirms: :meth:`Ownership.sync` (run by the
service's reconcile loop) resends a ``bind_owner``/``unbind_owner``/``factory_reset``
command that expired or failed once the unit has been heard from again, and always carries
out pending erasures (release, reset) before a new binding. When a unit reports a factory
reset (event ``factory_reset`` with the owner reference it erased - the owner did it from
the app, or someone pressed reset on the unit, or ran ``hearth device reset``),
:meth:`Ownership.apply_unit_events` ends that binding: the old owner loses access at once,
and the unit can be claimed again - only with its own setup code.

Everything a consumer can reach goes through :meth:`Ownership.owned`, which answers
:class:`NotFoundError` for a unit that does not exist *and* for one that belongs to
someone else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import argon2
import sqlalchemy as sa
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.orm import Session, sessionmaker

from hearth import protocol
from hearth.errors import HearthError, NotFoundError, ValidationError
from hearth.pki import DEVICE_ID_RE
from hearth.service.accounts.config import AccountsConfig
from hearth.service.accounts.models import ResetKind, ResetState, UnitOwner, UnitReset
from hearth.service.accounts.throttle import Key, Throttle, address_key
from hearth.service.commands import CommandService
from hearth.service.db import begin_write
from hearth.service.models import (
    OPEN_COMMAND_STATUSES,
    CommandRow,
    CommandStatus,
    EventRow,
    Unit,
    UnitStatus,
)
from hearth.setupcode import normalize, parse_setup_uri

__all__ = ["ClaimRefused", "ClaimResult", "Ownership", "decode_qr_image", "fingerprint"]

log = logging.getLogger(__name__)

DEVICE_REF_MIN = 8
"""Hex digits of the device id a consumer must type (the rest is optional)."""
_MAX_CANDIDATES = 4
RESET_EVENT = "factory_reset"
MAX_QR_IMAGE_BYTES = 5 * 1024 * 1024
MAX_QR_PIXELS = 25_000_000
_DUMMY_CODE = "dummy-setup-code-never-matches"
RESEND_AFTER = dt.timedelta(seconds=60)
"""Shortest gap before a system command that got no answer is sent again."""


class ClaimRefused(ValidationError):
    """A claim was refused (``claim_failed``, ``already_claimed``, ``already_yours``,
    ``invalid_setup_code``, ``invalid_device_id``, ``invalid_image``, ``no_qr_code``)."""


@dataclass(frozen=True)
class ClaimResult:
    device_id: str
    model: str
    credential: str
    """The owner's local-access credential: shown once, never stored by the service."""
    certificate_pem: str
    fingerprint: str
    """SHA-256 of the unit's certificate (DER), for pinning the local API."""


def fingerprint(certificate_pem: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(certificate_pem.encode()).public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _device_ref(text: object) -> str:
    if not isinstance(text, str) or len(text) > 80:
        raise ClaimRefused("invalid_device_id", "enter the device ID from the label")
    ref = re.sub(r"[\s\-:]", "", text).lower()
    if not DEVICE_REF_MIN <= len(ref) <= 32 or not re.fullmatch(r"[0-9a-f]+", ref):
        raise ClaimRefused("invalid_device_id", f"enter at least the first {DEVICE_REF_MIN} "
                           "characters (0-9, a-f) of the device ID from the label")
    return ref


def decode_qr_image(data: bytes) -> str:
    """The text of the QR code in an uploaded photo or scan of a label.

    Refuses anything that is not a reasonably sized PNG/JPEG/WebP/GIF image
    (``invalid_image``) or that has no readable QR code (``no_qr_code``)."""
    import zxingcpp
    from PIL import Image, UnidentifiedImageError

    if not data or len(data) > MAX_QR_IMAGE_BYTES:
        raise ClaimRefused("invalid_image", "upload a photo of the label (at most "
                           f"{MAX_QR_IMAGE_BYTES // 2**20} MB)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG", "WEBP", "GIF"):
                raise ClaimRefused("invalid_image", "upload a PNG or JPEG image")
            if img.width * img.height > MAX_QR_PIXELS:
                raise ClaimRefused("invalid_image", "the image is too large")
            gray = img.convert("L")
            if max(gray.size) > 2000:
                gray.thumbnail((2000, 2000))
            results = zxingcpp.read_barcodes(
                gray, formats=zxingcpp.barcode_formats_from_str("QRCode"))
    except ClaimRefused:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ClaimRefused("invalid_image", "the file is not an image we can read") from e
    for r in results:
        if r.text:
            return str(r.text)
    raise ClaimRefused("no_qr_code", "no QR code found; take the photo closer, or type the code")


class Ownership:
    """Claims, ownership checks, release/reset, and keeping units in step."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        config: AccountsConfig,
        throttle: Throttle,
        clock: Callable[[], dt.datetime],
        commands: CommandService | None = None,
    ) -> None:
        self._sf = sessions
        self._config = config
        self._throttle = throttle
        self._clock = clock
        self.commands = commands
        self._verifier = argon2.PasswordHasher()
        self._dummy_hash: str | None = None
        self._event_cursor = 0
        """Highest ``events.id`` already looked at for resets (per process; starts over)."""

    # -- claiming -------------------------------------------------------------------------

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            from hearth.factory import hash_setup_code

            self._dummy_hash = hash_setup_code(_DUMMY_CODE)
        return self._dummy_hash

    def _verify(self, stored: str, code: str) -> bool:
        try:
            return bool(self._verifier.verify(stored, code))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def claim_keys(self, account_id: str, ref: str, address: str | None) -> list[Key]:
        c = self._config
        return [Key(f"claim:unit:{ref[:DEVICE_REF_MIN]}", c.claim_unit),
                Key(f"claim:acct:{account_id}", c.claim_account),
                Key(f"claim:addr:{address_key(address)}", c.claim_address)]

    def claim(self, account_id: str, device_ref: object, code: object, *,
              address: str | None) -> ClaimResult:
        """Claim a unit for ``account_id``. Raises :class:`ClaimRefused`,
        :class:`~.throttle.Throttled`."""
        ref = _device_ref(device_ref)
        if not isinstance(code, str):
            raise ClaimRefused("invalid_setup_code", "enter the setup code from the label")
        try:
            canonical = normalize(code)
        except ValidationError as e:
            raise ClaimRefused(e.reason, e.detail) from None
        now = self._clock()
        with self._sf.begin() as session:
            self._throttle.attempt(session, self.claim_keys(account_id, ref, address), now=now)
        with self._sf() as session:
            lo, hi = ref, ref + "g"  # every id that starts with ref (hex < 'g')
            candidates = list(session.execute(
                sa.select(Unit.device_id, Unit.setup_code_hash)
                .where(Unit.device_id >= lo, Unit.device_id < hi,
                       Unit.status == UnitStatus.ACTIVE.value,
                       Unit.setup_code_hash.is_not(None))
                .order_by(Unit.device_id).limit(_MAX_CANDIDATES)))
        matched: str | None = None
        if not candidates:
            self._verify(self._dummy(), canonical)
        for device_id, stored in candidates:
            if self._verify(str(stored), canonical):
                matched = str(device_id)
                break
        if matched is None:
            raise ClaimRefused("claim_failed", "that device ID and setup code do not match a "
                               "unit that can be claimed; check both and try again")
        credential = secrets.token_urlsafe(32)
        with self._sf.begin() as session:
            begin_write(session)
            self.apply_unit_events(session, [matched])
            unit = session.get(Unit, matched)
            if unit is None or unit.status != UnitStatus.ACTIVE:
                raise ClaimRefused("claim_failed", "that device ID and setup code do not "
                                   "match a unit that can be claimed")
            owner = session.get(UnitOwner, matched, with_for_update=True)
            if owner is not None:
                if owner.account_id == account_id:
                    raise ClaimRefused("already_yours", "this unit is already yours")
                raise ClaimRefused("already_claimed", "this unit is already claimed; its owner "
                                   "must release it, or it must be factory reset, first")
            session.add(UnitOwner(
                device_id=matched, account_id=account_id, owner_ref=secrets.token_urlsafe(16),
                verifier=protocol.owner_verifier(credential), claimed_at=now, bound_at=None,
                command_id=None))
            result = ClaimResult(matched, unit.model, credential, unit.certificate_pem,
                                 fingerprint(unit.certificate_pem))
        self.sync([matched])
        return result

    def claim_uri(self, account_id: str, uri: object, *, address: str | None) -> ClaimResult:
        """Claim with the setup URI a label's QR code carries."""
        if not isinstance(uri, str):
            raise ClaimRefused("invalid_setup_uri", "not a Hearth setup code")
        try:
            device_id, code = parse_setup_uri(uri.strip())
        except ValidationError as e:
            raise ClaimRefused(e.reason, e.detail) from None
        return self.claim(account_id, device_id, code, address=address)

    # -- ownership ------------------------------------------------------------------------

    def owned(self, session: Session, account_id: str, device_id: object) -> tuple[Unit, UnitOwner]:
        """The unit and its binding if ``account_id`` owns it; :class:`NotFoundError`
        otherwise (no such unit, someone else's, or released by a reset it reported)."""
        if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
            raise NotFoundError("no such unit")
        owner = session.get(UnitOwner, device_id)
        if owner is None or owner.account_id != account_id or self._ended(
                owner, self._reset_events(session, [device_id]).get(device_id, ())):
            raise NotFoundError("no such unit")
        unit = session.get(Unit, device_id)
        if unit is None:  # pragma: no cover - the foreign key cascades
            raise NotFoundError("no such unit")
        return unit, owner

    def units_of(self, session: Session, account_id: str) -> list[tuple[Unit, UnitOwner]]:
        rows = [(row[0], row[1]) for row in session.execute(
            sa.select(Unit, UnitOwner).join(UnitOwner, UnitOwner.device_id == Unit.device_id)
            .where(UnitOwner.account_id == account_id).order_by(UnitOwner.claimed_at))]
        events = self._reset_events(session, [u.device_id for u, _ in rows])
        return [(u, o) for u, o in rows if not self._ended(o, events.get(u.device_id, ()))]

    def release(self, account_id: str, device_id: str, *, reset: bool) -> None:
        """End the owner's binding at once and tell the unit to forget it (``reset``: and
        erase its user data and queued personal data). Raises :class:`NotFoundError`."""
        now = self._clock()
        with self._sf.begin() as session:
            begin_write(session)
            _unit, owner = self.owned(session, account_id, device_id)
            session.add(UnitReset(
                device_id=device_id, owner_ref=owner.owner_ref,
                kind=(ResetKind.RESET if reset else ResetKind.UNBIND).value,
                state=ResetState.PENDING.value, requested_at=now, command_id=None,
                done_at=None))
            session.delete(owner)
        self.sync([device_id])

    def new_credential(self, account_id: str, device_id: str) -> str:
        """Replace the owner's local-access credential (the old one stops working once the
        unit has the new binding). Returns the new credential, once."""
        credential = secrets.token_urlsafe(32)
        with self._sf.begin() as session:
            begin_write(session)
            _unit, owner = self.owned(session, account_id, device_id)
            owner.verifier = protocol.owner_verifier(credential)
            owner.bound_at = None
            owner.command_id = None
        self.sync([device_id])
        return credential

    # -- commands from the owner ----------------------------------------------------------

    def send_command(self, account_id: str, device_id: str, name: object,
                     params: Mapping[str, object]) -> str:
        """An owner's command (the model's commands only, never a system command)."""
        with self._sf() as session:
            self.owned(session, account_id, device_id)
        if self.commands is None:
            raise HearthError("commands are not available in this service")
        if not isinstance(name, str):
            raise ValidationError(protocol.Reason.WRONG_TYPE, "command name must be a string")
        return self.commands.send(self._sf, device_id, name, params, now=self._clock())

    def command(self, session: Session, account_id: str, device_id: str,
                command_id: str) -> CommandRow:
        self.owned(session, account_id, device_id)
        row = CommandService.get(session, command_id)
        if row.device_id != device_id or row.name in protocol.SYSTEM_COMMANDS:
            raise NotFoundError("no such command")
        return row

    # -- keeping the unit in step ---------------------------------------------------------

    @staticmethod
    def _reset_events(session: Session, device_ids: Iterable[str]
                      ) -> dict[str, list[tuple[str, dt.datetime]]]:
        ids = sorted(set(device_ids))
        out: dict[str, list[tuple[str, dt.datetime]]] = {}
        if not ids:
            return out
        rows = session.execute(sa.select(EventRow.device_id, EventRow.detail, EventRow.ts)
                               .where(EventRow.kind == RESET_EVENT,
                                      EventRow.device_id.in_(ids)))
        for device_id, detail, ts in rows:
            out.setdefault(device_id, []).append((detail, ts))
        return out

    @staticmethod
    def _ended(owner: UnitOwner, events: Iterable[tuple[str, dt.datetime]]) -> bool:
        """Whether the unit reported a factory reset that ends this binding: one naming its
        owner reference, or - for a binding the unit never confirmed - any reset the unit
        made after the claim."""
        return any(detail == owner.owner_ref or (
            detail == "" and owner.bound_at is None and ts >= owner.claimed_at)
            for detail, ts in events)

    def apply_unit_events(self, session: Session, device_ids: Sequence[str] | None = None
                          ) -> int:
        """End bindings (and confirm pending erasures) the units reported they reset.

        With ``device_ids``: those units. Without: every unit that reported a reset since
        the last call (a cursor over the events table, so the reconcile loop does not scan
        every binding each time). Returns how many bindings ended. Writes in the caller's
        (write) transaction."""
        if device_ids is None:
            rows = list(session.execute(
                sa.select(EventRow.id, EventRow.device_id).where(
                    EventRow.id > self._event_cursor, EventRow.kind == RESET_EVENT)
                .order_by(EventRow.id).limit(10_000)))
            if not rows:
                return 0
            self._event_cursor = max(r[0] for r in rows)
            device_ids = sorted({r[1] for r in rows})
        ids = list(device_ids)
        if not ids:
            return 0
        owners = sa.select(UnitOwner).where(UnitOwner.device_id.in_(ids))
        resets = sa.select(UnitReset).where(UnitReset.state == ResetState.PENDING.value,
                                            UnitReset.device_id.in_(ids))
        current = list(session.scalars(owners))
        pending = list(session.scalars(resets))
        if not current and not pending:
            return 0
        events = self._reset_events(session, [o.device_id for o in current]
                                    + [r.device_id for r in pending])
        ended = 0
        for owner in current:
            if self._ended(owner, events.get(owner.device_id, ())):
                log.info("unit %s reported a factory reset: binding ended", owner.device_id)
                session.delete(owner)
                ended += 1
        now = self._clock()
        for r in pending:
            if any(d == r.owner_ref for d, _ in events.get(r.device_id, ())):
                r.state, r.done_at = ResetState.DONE.value, now
        session.flush()
        return ended

    def sync(self, device_ids: Iterable[str] | None = None) -> int:
        """Send what units still have to hear (erasures first, then bindings); returns how
        many commands were sent. Never raises for a broker problem (retried later)."""
        if self.commands is None:
            return 0
        ids = list(device_ids) if device_ids is not None else None
        now = self._clock()
        todo: list[tuple[str, str, dict[str, Any], Callable[[Session, str], None]]] = []
        with self._sf.begin() as session:
            begin_write(session)
            self.apply_unit_events(session, ids)
            resets = sa.select(UnitReset).where(UnitReset.state == ResetState.PENDING.value)
            owners = sa.select(UnitOwner).where(UnitOwner.bound_at.is_(None))
            if ids is not None:
                resets = resets.where(UnitReset.device_id.in_(ids))
                owners = owners.where(UnitOwner.device_id.in_(ids))
            busy: set[str] = set()
            for r in session.scalars(resets.order_by(UnitReset.id)):
                if r.device_id in busy:
                    continue
                busy.add(r.device_id)
                verdict = self._progress(session, r.device_id, r.command_id, now)
                if verdict == "succeeded":
                    r.state, r.done_at = ResetState.DONE.value, now
                    busy.discard(r.device_id)
                elif verdict == "rejected":
                    log.warning("unit %s refused %s (old firmware?)", r.device_id, r.kind)
                    r.state, r.done_at = ResetState.REFUSED.value, now
                    busy.discard(r.device_id)
                elif verdict == "send":
                    name = "factory_reset" if r.kind == ResetKind.RESET else "unbind_owner"
                    params: dict[str, Any] = {} if name == "factory_reset" else {
                        "owner": r.owner_ref}
                    todo.append((r.device_id, name, params, _remember_reset(r.id)))
            for o in session.scalars(owners):
                if o.device_id in busy:
                    continue
                verdict = self._progress(session, o.device_id, o.command_id, now)
                if verdict == "succeeded":
                    o.bound_at = now
                elif verdict == "send":
                    todo.append((o.device_id, "bind_owner",
                                 {"owner": o.owner_ref, "verifier": o.verifier},
                                 _remember_bind(o.device_id, o.owner_ref)))
        sent = 0
        for device_id, name, params, remember in todo:
            try:
                command_id = self.commands.send(self._sf, device_id, name, params,
                                                ttl=self._config.system_command_ttl,
                                                system=True, now=self._clock())
            except HearthError as e:
                log.warning("could not send %s to unit %s: %s", name, device_id, e)
                continue
            with self._sf.begin() as session:
                begin_write(session)
                remember(session, command_id)
            sent += 1
        return sent

    @staticmethod
    def _progress(session: Session, device_id: str, command_id: str | None,
                  now: dt.datetime) -> str:
        """``succeeded``, ``rejected``, ``wait`` (in flight, or the unit has not been heard
        from since) or ``send`` (nothing sent yet, or it must be sent again)."""
        if command_id is None:
            return "send"
        cmd = session.get(CommandRow, command_id)
        if cmd is None:
            return "send"
        if cmd.status == CommandStatus.SUCCEEDED.value:
            return "succeeded"
        if cmd.status == CommandStatus.REJECTED.value:
            return "rejected"
        result = cmd.result or {}
        if result.get("source") == "service":  # never reached the broker
            return "send" if now - cmd.issued_at >= RESEND_AFTER else "wait"
        # Expired, failed on the unit, or still open although the unit has been talking for
        # a while since (the broker dropped it: the unit had no session yet): send again.
        # All three system commands are idempotent on the unit.
        unit = session.get(Unit, device_id)
        heard = unit.last_seen_at if unit is not None else None
        if heard is None or now - cmd.issued_at < RESEND_AFTER:
            return "wait"
        if cmd.status in OPEN_COMMAND_STATUSES and cmd.expires_at > now:
            return "send" if heard - cmd.issued_at >= RESEND_AFTER else "wait"
        return "send" if heard > cmd.issued_at else "wait"


def _remember_reset(reset_id: int) -> Callable[[Session, str], None]:
    def remember(session: Session, command_id: str) -> None:
        row = session.get(UnitReset, reset_id)
        if row is not None and row.state == ResetState.PENDING.value:
            row.command_id = command_id
    return remember


def _remember_bind(device_id: str, owner_ref: str) -> Callable[[Session, str], None]:
    def remember(session: Session, command_id: str) -> None:
        row = session.get(UnitOwner, device_id)
        if row is not None and row.owner_ref == owner_ref and row.bound_at is None:
            row.command_id = command_id
    return remember
