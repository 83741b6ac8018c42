"""Per-unit setup codes: the one-time secret a buyer uses to claim a unit.

A setup code is 10 symbols of Crockford base32 (5 bits each: 50 bits from the OS CSPRNG)
plus one Damm check symbol, shown as ``XXXXX-XXXXX-C``. The alphabet has no I, L,
O or U, so codes read aloud or typed from a label survive the usual confusions, and
:func:`normalize` maps ``i``/``l`` to 1 and ``o`` to 0, ignores case, spaces and dashes.

These follow the UK PSTI rules for passwords unique per product: drawn at random (never
from a serial number, MAC address, device id, model or counter) and not trivially
guessable: codes with an obvious pattern (:func:`is_trivial`) are redrawn. Rejection
removes a negligible share of the 2**50 space (see ``tests``), so at least 49.9 bits of
entropy remain, above the 40 the Code asks for.

The service never stores a code, only a slow hash of it (argon2id, see
:mod:`hearth.service` claiming).

Example::

    code = new_setup_code()          # 'K3P9Q-7XW2M-V'
    assert verify_check(code)
    uri = setup_uri(device_id, code) # what the label's QR code carries
"""

from __future__ import annotations

import itertools
import re
import secrets
from urllib.parse import parse_qs, urlencode, urlsplit

from hearth.errors import ValidationError

__all__ = [
    "ALPHABET",
    "CODE_SYMBOLS",
    "ENTROPY_BITS",
    "is_trivial",
    "new_setup_code",
    "normalize",
    "parse_setup_uri",
    "setup_uri",
    "verify_check",
]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32  # pragma: allowlist secret
CODE_SYMBOLS = 10
ENTROPY_BITS = CODE_SYMBOLS * 5
SETUP_URI_SCHEME = "hearth-setup"
SETUP_URI_VERSION = "1"
_DEVICE_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_ALIASES = str.maketrans({"I": "1", "L": "1", "O": "0"})


def _gf32_times_x(v: int) -> int:
    """Multiply by x in GF(2^5) with the primitive polynomial x^5 + x^2 + 1."""
    v <<= 1
    return v ^ 0b100101 if v & 0b100000 else v


def _check_symbol(payload: str) -> str:
    """Damm check symbol over the quasigroup ``a * b = x·a + b`` in GF(32).

    That quasigroup is totally anti-symmetric, so the check catches every single-symbol
    error and every transposition of adjacent symbols (tested exhaustively).
    """
    interim = 0
    for ch in payload:
        interim = _gf32_times_x(interim) ^ ALPHABET.index(ch)
    return ALPHABET[_gf32_times_x(interim)]


def is_trivial(payload: str) -> bool:
    """True for codes a person could guess: few distinct symbols, runs, repeats, sequences."""
    if len(set(payload)) < 5:
        return True
    idx = [ALPHABET.index(c) for c in payload]
    steps = [b - a for a, b in itertools.pairwise(idx)]
    run = 1
    for a, b in itertools.pairwise(steps):
        run = run + 1 if a == b and abs(a) <= 1 else 1
        if run >= 3:  # four symbols in a constant, ascending or descending row
            return True
    for size in (1, 2, 3, 4, 5):
        block = payload[:size]
        if (block * (len(payload) // size + 1))[: len(payload)] == payload:
            return True
    return False


def new_setup_code() -> str:
    """A fresh setup code from the OS CSPRNG, formatted ``XXXXX-XXXXX-C``."""
    while True:
        payload = "".join(secrets.choice(ALPHABET) for _ in range(CODE_SYMBOLS))
        if not is_trivial(payload):
            check = _check_symbol(payload)
            return f"{payload[:5]}-{payload[5:]}-{check}"


def normalize(code: str) -> str:
    """Canonical form of a typed code (upper case, aliases mapped, separators removed).

    Raises :class:`ValidationError` (``invalid_setup_code``) when the result cannot be a
    setup code or its check symbol is wrong, without saying anything about any unit.
    """
    if len(code) > 64:
        raise ValidationError("invalid_setup_code", "a setup code has 11 symbols")
    cleaned = re.sub(r"[\s-]", "", code.upper()).translate(_ALIASES)
    if len(cleaned) != CODE_SYMBOLS + 1 or any(c not in ALPHABET for c in cleaned):
        raise ValidationError("invalid_setup_code", "a setup code has 11 symbols")
    if _check_symbol(cleaned[:-1]) != cleaned[-1]:
        raise ValidationError("invalid_setup_code", "the setup code has a typo (check failed)")
    return f"{cleaned[:5]}-{cleaned[5:10]}-{cleaned[10]}"


def verify_check(code: str) -> bool:
    try:
        normalize(code)
    except ValidationError:
        return False
    return True


def setup_uri(device_id: str, code: str) -> str:
    """The versioned URI a unit's QR label carries."""
    if not _DEVICE_ID_RE.match(device_id):
        raise ValidationError("invalid_device_id", "not a device id")
    return f"{SETUP_URI_SCHEME}:?" + urlencode(
        {"v": SETUP_URI_VERSION, "d": device_id, "c": normalize(code)}
    )


def parse_setup_uri(uri: str) -> tuple[str, str]:
    """``(device_id, code)`` from a setup URI; refuses anything else with a clear reason."""
    if len(uri) > 256:
        raise ValidationError("invalid_setup_uri", "setup URI too long")
    parts = urlsplit(uri)
    if parts.scheme != SETUP_URI_SCHEME:
        raise ValidationError("invalid_setup_uri", "not a Hearth setup code")
    query = parse_qs(parts.query, strict_parsing=False)
    if query.get("v") != [SETUP_URI_VERSION]:
        raise ValidationError("invalid_setup_uri", "unsupported setup code version")
    device = query.get("d", [""])
    code = query.get("c", [""])
    if len(device) != 1 or not _DEVICE_ID_RE.match(device[0]) or len(code) != 1:
        raise ValidationError("invalid_setup_uri", "malformed setup code")
    return device[0], normalize(code[0])
