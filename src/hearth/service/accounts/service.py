"""The accounts capability's runtime object and its account operations.

:class:`AccountsService` is built once at start (``runner.py``) and handed to
:func:`hearth.service.accounts.routes.create_router`. It signs people up and in, runs the
TOTP step, and owns :class:`~.claims.Ownership` (claiming and the units' owner bindings).
Tests build it with a frozen ``clock``.

Sign-in, in order::

    throttles for this attempt (known browser: its own key only; otherwise account+address,
    account, address) -> charged before the password is checked
    one argon2id verification (a dummy hash for an unknown e-mail address: same time, same
    answer "sign_in_failed")
    success -> the account+address and browser keys are reset; a NEW session id:
        consumer without TOTP          -> active
        TOTP enrolled                  -> "totp" (valid 5 minutes, for the code only)
        operator / security, no TOTP   -> "enrol" (must enrol before anything else)
    the TOTP code -> another NEW session id, active; the pending one is deleted

There is no default account: the first operator comes from ``hearth admin create``
(:func:`create_account`), which prints a generated password once.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from hearth.errors import ValidationError
from hearth.service.accounts.claims import Ownership
from hearth.service.accounts.config import AccountsConfig
from hearth.service.accounts.models import (
    PRIVILEGED_ROLES,
    Account,
    Role,
    SessionKind,
    SessionState,
)
from hearth.service.accounts.passwords import PasswordHasher, check_password, context_words
from hearth.service.accounts.sessions import (
    SessionInfo,
    create_session,
    end_all_sessions,
    end_session,
    load_session,
    purge_expired,
)
from hearth.service.accounts.throttle import Key, Throttle, address_key, key_hash
from hearth.service.accounts.totp import (
    SecretBox,
    derive_key,
    new_totp_secret,
    provisioning_uri,
    verify_totp,
)
from hearth.service.commands import CommandService
from hearth.service.db import begin_write, utcnow
from hearth.service.web import CsrfProtection, Signer, Templates

__all__ = ["AccountsService", "SignInFailed", "SignInResult", "create_account",
           "normalize_email"]

_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s]{1,63}\Z")
KNOWN_DEVICE_DAYS = 180
HOUSEKEEPING_EVERY = dt.timedelta(minutes=1)

NAV_LINKS = (
    ("/units", "My devices"),
    ("/units/claim", "Add a device"),
    ("/security/policy", "Security"),
)


class SignInFailed(ValidationError):
    """Wrong e-mail address, password or code (one answer for all: ``sign_in_failed``)."""

    def __init__(self, detail: str = "the e-mail address or password is not right") -> None:
        super().__init__("sign_in_failed", detail)


@dataclass(frozen=True)
class SignInResult:
    session_id: str
    state: SessionState
    account_id: str
    known_device: str | None = None
    """A new known-browser cookie value to set (after a complete sign-in)."""


def normalize_email(email: object) -> str:
    """Trimmed, lower-cased; raises :class:`ValidationError` (``invalid_email``)."""
    if not isinstance(email, str) or len(email) > 254:
        raise ValidationError("invalid_email", "enter your e-mail address")
    value = email.strip().lower()
    if not _EMAIL_RE.match(value):
        raise ValidationError("invalid_email", "enter a valid e-mail address")
    return value


def _new_account_id() -> str:
    return secrets.token_hex(16)


def create_account(
    session: Session, *, email: str, password: str | None, role: Role,
    hasher: PasswordHasher, site_name: str = "Hearth", now: dt.datetime | None = None,
) -> tuple[Account, str | None]:
    """Create an account (the caller commits). With ``password=None`` a random one is
    generated and returned (shown once); a given password must meet the policy.
    Raises :class:`ValidationError` (``invalid_email``, ``email_taken``, password reasons).
    """
    address = normalize_email(email)
    generated: str | None = None
    if password is None:
        generated = password = secrets.token_urlsafe(18)
    else:
        check_password(password, context=context_words(email=address, site_name=site_name))
    if session.scalar(sa.select(Account.id).where(Account.email == address)) is not None:
        raise ValidationError("email_taken", "an account with this e-mail address exists")
    account = Account(id=_new_account_id(), email=address, password_hash=hasher.hash(password),
                      role=Role(role).value, created_at=now or utcnow(), totp_secret_enc=None,
                      totp_enrolled_at=None, totp_last_step=None, disabled_at=None)
    session.add(account)
    session.flush()
    return account, generated


class AccountsService:
    """Everything the account routes need, built once at start."""

    def __init__(
        self,
        config: AccountsConfig,
        sessions: sessionmaker[Session],
        *,
        commands: CommandService | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.clock = clock
        self.signer = Signer(derive_key(config.secret_key, "hearth accounts signing v1"))
        self.box = SecretBox(derive_key(config.secret_key, "hearth accounts totp v1"))
        self.hasher = PasswordHasher(config.argon2)
        self.throttle = Throttle()
        self.ownership = Ownership(sessions, config=config, throttle=self.throttle,
                                   clock=self.now, commands=commands)
        self.csrf = CsrfProtection(self.signer, allowed_origins={config.base_url},
                                   secure=config.secure_cookies)
        self.templates = Templates(
            "hearth.service.accounts", csrf=self.csrf, site_name=config.site_name,
            hsts=config.secure_cookies, globals={"nav_links": NAV_LINKS})
        secure = config.secure_cookies
        self.session_cookie = "__Host-hearth-session" if secure else "hearth-session"
        self._housekept: dt.datetime | None = None
        self.device_cookie = "__Host-hearth-device" if secure else "hearth-device"

    def now(self) -> dt.datetime:
        t = self.clock()
        if t.tzinfo is None:
            raise ValueError("the clock must return aware UTC datetimes")
        return t.astimezone(dt.UTC)

    # -- sign-up --------------------------------------------------------------------------

    def sign_up(self, email: object, password: object, *, address: str | None) -> str:
        """Create a consumer account; returns its id. Raises :class:`ValidationError`
        (``invalid_email``, ``email_taken``, password reasons) or ``Throttled``."""
        normalized = normalize_email(email)
        if not isinstance(password, str):
            raise ValidationError("wrong_type", "enter a password")
        check_password(password, context=context_words(email=normalized,
                                                       site_name=self.config.site_name),
                       min_chars=self.config.password_min_chars,
                       max_chars=self.config.password_max_chars)
        now = self.now()
        with self.sessions.begin() as session:
            self.throttle.attempt(session, [Key(f"signup:addr:{address_key(address)}",
                                                self.config.signup_address)], now=now)
        with self.sessions.begin() as session:
            begin_write(session)
            account, _ = create_account(session, email=normalized, password=password,
                                        role=Role.CONSUMER, hasher=self.hasher,
                                        site_name=self.config.site_name, now=now)
            return account.id

    # -- sign-in --------------------------------------------------------------------------

    def _known_device(self, token: str | None, account_id: str | None) -> str | None:
        """The browser's nonce if ``token`` is a known-browser cookie for ``account_id``."""
        if not token or account_id is None:
            return None
        payload = self.signer.unsign("known-device", token)
        if payload is None or payload.count("~") != 2:
            return None
        acct, nonce, issued = payload.split("~")
        if acct != account_id or not issued.isdigit():
            return None
        if self.now().timestamp() - int(issued) > KNOWN_DEVICE_DAYS * 86400:
            return None
        return nonce

    def login_keys(self, email: str, address: str | None, device: str | None) -> list[Key]:
        c = self.config
        if device is not None:
            return [Key(f"login:device:{device}", c.login_device)]
        who = key_hash(email)
        where = address_key(address)
        return [Key(f"login:acct-addr:{key_hash(who + where)}", c.login_account_address),
                Key(f"login:acct:{who}", c.login_account),
                Key(f"login:addr:{where}", c.login_address)]

    def sign_in(self, email: object, password: object, *, address: str | None,
                kind: SessionKind = SessionKind.COOKIE, old_session: str | None = None,
                known_device: str | None = None, totp_code: str | None = None
                ) -> SignInResult:
        """Check the password (and, for the API, the TOTP code in the same request).
        Raises :class:`SignInFailed`, ``Throttled``, or :class:`ValidationError`
        (``totp_required``: the API call must carry the TOTP code)."""
        try:
            normalized = normalize_email(email)
        except ValidationError:
            raise SignInFailed() from None
        if not isinstance(password, str) or not password or len(password) > (
                self.config.password_max_chars * 4):
            raise SignInFailed()
        now = self.now()
        with self.sessions() as session:
            account = session.scalar(sa.select(Account).where(Account.email == normalized))
            account_id = account.id if account is not None else None
            stored = account.password_hash if account is not None else None
        device = self._known_device(known_device, account_id)
        keys = self.login_keys(normalized, address, device)
        with self.sessions.begin() as session:
            self.throttle.attempt(session, keys, now=now)
        if stored is None:
            self.hasher.verify_dummy(password)
            raise SignInFailed()
        if not self.hasher.verify(stored, password):
            raise SignInFailed()
        assert account_id is not None
        with self.sessions() as session:
            account = session.get(Account, account_id)
            if account is None or account.disabled_at is not None:
                raise SignInFailed()
            if account.totp_enrolled_at is not None:
                state = SessionState.TOTP
            elif account.role in PRIVILEGED_ROLES:
                state = SessionState.ENROL
            else:
                state = SessionState.ACTIVE
        if kind is SessionKind.BEARER and state is SessionState.ENROL:
            raise ValidationError("totp_enrolment_required", "sign in on the web app once to "
                                  "set up the authenticator app")
        if kind is SessionKind.BEARER and state is SessionState.TOTP:
            if not totp_code:
                raise ValidationError("totp_required", "this account needs its authenticator "
                                      "code (field totp)")
            self._charge_totp(account_id, now)
        with self.sessions.begin() as session:
            begin_write(session)
            account = session.get(Account, account_id)
            assert account is not None
            if kind is SessionKind.BEARER and state is SessionState.TOTP:
                self._check_totp(session, account, totp_code or "", now)
                state = SessionState.ACTIVE
            self.throttle.reset(session, keys[:1])
            if self.hasher.needs_rehash(account.password_hash):
                account.password_hash = self.hasher.hash(password)
            raw = create_session(session, account, kind=kind, state=state,
                                 config=self.config, now=now, replaces=old_session)
            new_device = self._device_token(account.id) if (
                state is SessionState.ACTIVE and kind is SessionKind.COOKIE) else None
            return SignInResult(raw, state, account.id, new_device)

    def _device_token(self, account_id: str) -> str:
        payload = f"{account_id}~{secrets.token_hex(8)}~{int(self.now().timestamp())}"
        return self.signer.sign("known-device", payload)

    def _charge_totp(self, account_id: str, now: dt.datetime) -> None:
        """Charge one TOTP attempt (own transaction, before the code is checked)."""
        with self.sessions.begin() as session:
            self.throttle.attempt(session, [Key(f"totp:{account_id}", self.config.totp)],
                                  now=now)

    def _check_totp(self, session: Session, account: Account, code: str,
                    now: dt.datetime) -> None:
        """Verify and consume a TOTP code (already charged with :meth:`_charge_totp`); the
        caller's write transaction records the step. Raises :class:`SignInFailed`."""
        if account.totp_secret_enc is None:
            raise SignInFailed("no authenticator is set up for this account")
        secret = self.box.open(account.totp_secret_enc, aad=account.id)
        step = verify_totp(secret, code, now=now, last_step=account.totp_last_step)
        if step is None:
            raise SignInFailed("the code is not right; use the current code from your "
                               "authenticator app")
        account.totp_last_step = step
        self.throttle.reset(session, [Key(f"totp:{account.id}", self.config.totp)])

    def session(self, raw: str | None, *, kind: SessionKind = SessionKind.COOKIE
                ) -> SessionInfo | None:
        """The session for ``raw`` (any state), or ``None``."""
        if not raw:
            return None
        with self.sessions.begin() as session:
            begin_write(session)
            return load_session(session, raw, kind=kind, config=self.config, now=self.now())

    def complete_totp(self, raw: str, code: object) -> SignInResult:
        """The TOTP step after the password: a new, active session replaces the pending one.
        Raises :class:`SignInFailed` or ``Throttled``."""
        now = self.now()
        info = self.session(raw)
        if info is None or info.state is not SessionState.TOTP:
            raise SignInFailed("your sign-in has expired; sign in again")
        self._charge_totp(info.account_id, now)
        with self.sessions.begin() as session:
            begin_write(session)
            info = load_session(session, raw, kind=SessionKind.COOKIE, config=self.config,
                                now=now)
            if info is None or info.state is not SessionState.TOTP:
                raise SignInFailed("your sign-in has expired; sign in again")
            account = session.get(Account, info.account_id)
            assert account is not None
            self._check_totp(session, account, code if isinstance(code, str) else "", now)
            new = create_session(session, account, kind=SessionKind.COOKIE,
                                 state=SessionState.ACTIVE, config=self.config, now=now,
                                 replaces=raw)
            return SignInResult(new, SessionState.ACTIVE, account.id,
                                self._device_token(account.id))

    def enrolment(self, raw: str) -> tuple[str, str]:
        """``(secret, otpauth URI)`` for a session that must enrol TOTP (an operator or
        security-team account signing in for the first time). The secret is stored sealed
        but only counts once a code from it is confirmed. Enrolment happens only in that
        password-verified ``enrol`` state: a stolen active session cannot add a second
        factor of the thief's choosing."""
        now = self.now()
        with self.sessions.begin() as session:
            begin_write(session)
            info = load_session(session, raw, kind=SessionKind.COOKIE, config=self.config,
                                now=now)
            if info is None or info.state is not SessionState.ENROL or info.totp_enrolled:
                raise SignInFailed("your sign-in has expired; sign in again")
            account = session.get(Account, info.account_id)
            assert account is not None
            if account.totp_secret_enc is None:
                account.totp_secret_enc = self.box.seal(new_totp_secret(), aad=account.id)
            secret = self.box.open(account.totp_secret_enc, aad=account.id)
            return secret, provisioning_uri(secret, account=account.email,
                                            issuer=self.config.site_name)

    def confirm_enrolment(self, raw: str, code: object) -> SignInResult:
        """Enrol TOTP with a first code; the session is replaced by a new, active one."""
        now = self.now()
        info = self.session(raw)
        if info is None or info.state is not SessionState.ENROL or info.totp_enrolled:
            raise SignInFailed("your sign-in has expired; sign in again")
        self._charge_totp(info.account_id, now)
        with self.sessions.begin() as session:
            begin_write(session)
            info = load_session(session, raw, kind=SessionKind.COOKIE, config=self.config,
                                now=now)
            if info is None or info.state is not SessionState.ENROL or info.totp_enrolled:
                raise SignInFailed("your sign-in has expired; sign in again")
            account = session.get(Account, info.account_id)
            assert account is not None
            self._check_totp(session, account, code if isinstance(code, str) else "", now)
            account.totp_enrolled_at = now
            new = create_session(session, account, kind=SessionKind.COOKIE,
                                 state=SessionState.ACTIVE, config=self.config, now=now,
                                 replaces=raw)
            return SignInResult(new, SessionState.ACTIVE, account.id,
                                self._device_token(account.id))

    def security_actor(self, request: Any) -> str | None:
        """``team:<e-mail>`` for a request from an active security-team session (TOTP
        done), else ``None``: how the disclosure triage pages recognise the team."""
        info = self.session(request.cookies.get(self.session_cookie))
        if info is None or not info.active or info.role is not Role.SECURITY:
            return None
        return f"team:{info.email}"[:80]

    def sign_out(self, raw: str | None, *, everywhere: bool = False) -> None:
        with self.sessions.begin() as session:
            begin_write(session)
            if everywhere and raw:
                info = load_session(session, raw, kind=SessionKind.COOKIE,
                                    config=self.config, now=self.now())
                if info is not None:
                    end_all_sessions(session, info.account_id)
            end_session(session, raw)

    # -- housekeeping ---------------------------------------------------------------------

    def reconcile(self) -> None:
        """Apply resets units reported, tell units what they still have to hear, and (at
        most once a minute) drop expired sessions and old throttle keys. Called by the
        service's reconcile loop every few seconds."""
        now = self.now()
        with self.sessions.begin() as session:
            begin_write(session)
            self.ownership.apply_unit_events(session)
            if self._housekept is None or now - self._housekept >= HOUSEKEEPING_EVERY:
                purge_expired(session, now=now)
                self.throttle.purge(session, older_than=now - dt.timedelta(days=8))
                self._housekept = now
        self.ownership.sync()
