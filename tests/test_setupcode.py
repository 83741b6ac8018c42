"""Setup codes: unique, random, not derived from anything public, typo-checked."""

from __future__ import annotations

import io
import math
from collections import Counter

import pytest
import zxingcpp
from PIL import Image

from hearth.errors import ValidationError
from hearth.factory import mint, scrypt_verify
from hearth.labels import label_png
from hearth.pki import MakerPKI, new_device_id
from hearth.setupcode import (
    ALPHABET,
    CODE_SYMBOLS,
    is_trivial,
    new_setup_code,
    normalize,
    parse_setup_uri,
    setup_uri,
    verify_check,
)

N = 10_000


@pytest.fixture(scope="module")
def codes() -> list[str]:
    return [new_setup_code() for _ in range(N)]


def _payload(code: str) -> str:
    return code.replace("-", "")[:CODE_SYMBOLS]


def test_ten_thousand_codes_are_distinct(codes: list[str]) -> None:
    assert len(set(codes)) == N
    assert all(verify_check(c) for c in codes)


def test_symbol_frequency_is_uniform(codes: list[str]) -> None:
    """Chi-square goodness of fit over the 32 symbols (df = 31, critical value at
    p = 0.001 is 61.1). A biased generator - e.g. one that favoured digits - fails."""
    counts = Counter("".join(_payload(c) for c in codes))
    total = sum(counts.values())
    expected = total / len(ALPHABET)
    chi2 = sum((counts.get(s, 0) - expected) ** 2 / expected for s in ALPHABET)
    assert chi2 < 61.1, chi2


def test_no_serial_correlation(codes: list[str]) -> None:
    """Lag-1 correlation of symbol values within and across consecutive codes is ~0:
    a counter-based or sequential generator would show strong correlation."""
    values = [ALPHABET.index(s) for c in codes for s in _payload(c)]
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values)
    cov = sum((values[i] - mean) * (values[i + 1] - mean) for i in range(n - 1))
    r = cov / var
    assert abs(r) < 4 / math.sqrt(n), r
    # consecutive codes (minted one after the other) are unrelated too
    first = [ALPHABET.index(_payload(c)[0]) for c in codes]
    m = sum(first) / len(first)
    r2 = sum((first[i] - m) * (first[i + 1] - m) for i in range(len(first) - 1)) / sum(
        (f - m) ** 2 for f in first
    )
    assert abs(r2) < 4 / math.sqrt(len(first)), r2


def test_codes_share_nothing_with_device_ids(tmp_path) -> None:
    pki = MakerPKI.create(tmp_path / "pki")
    units = mint(pki, model="thermostat", count=200, out=tmp_path / "out", labels=False)
    rows = (tmp_path / "out" / "labels" / "print-manifest.csv").read_text().splitlines()[1:]
    by_id = {r.split(",")[0]: r.split(",")[2] for r in rows}
    assert set(by_id) == {u.device_id for u in units}
    assert len(set(by_id.values())) == len(units)
    for device_id, code in by_id.items():
        payload = _payload(code).lower()
        # no 6-symbol run of the code appears in the device id (hex), in either direction
        # (by chance: < 1e-4 for the whole batch; a code derived from the id: certain)
        for i in range(len(payload) - 5):
            assert payload[i : i + 6] not in device_id
            assert payload[i : i + 6][::-1] not in device_id
    # codes sorted by device id are not ordered: they are not derived from it
    ordered = [by_id[d] for d in sorted(by_id)]
    assert ordered != sorted(ordered)


def test_unit_holds_only_a_hash_of_its_code(tmp_path) -> None:
    import json

    pki = MakerPKI.create(tmp_path / "pki")
    (unit,) = mint(pki, model="lock", count=1, out=tmp_path / "out", labels=False)
    code = (tmp_path / "out" / "labels" / "print-manifest.csv").read_text().splitlines()[1]
    code = code.split(",")[2]
    stored = json.loads((unit.directory / "setup.hash").read_text())
    assert code not in json.dumps(stored)
    assert (unit.directory / "setup.hash").stat().st_mode & 0o077 == 0
    assert scrypt_verify(code, stored)
    assert not scrypt_verify(new_setup_code(), stored)
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert code not in manifest and "argon2id" in manifest


@pytest.mark.parametrize(
    "payload", ["AAAAAAAAAA", "0123456789", "ABABABABAB", "ABCABCABCA", "98765XXXXX", "1111122222"]
)
def test_trivial_patterns_are_refused(payload: str) -> None:
    assert is_trivial(payload)


def test_generated_codes_are_never_trivial(codes: list[str]) -> None:
    assert not any(is_trivial(_payload(c)) for c in codes)


def test_check_symbol_catches_typos_and_swaps(codes: list[str]) -> None:
    for code in codes[:300]:
        flat = code.replace("-", "")
        for i in range(len(flat)):
            for s in ALPHABET[:8]:
                if s != flat[i]:
                    assert not verify_check(flat[:i] + s + flat[i + 1 :])
        for i in range(len(flat) - 1):
            if flat[i] != flat[i + 1]:
                assert not verify_check(flat[:i] + flat[i + 1] + flat[i] + flat[i + 2 :])


def test_normalize_accepts_how_people_type() -> None:
    code = new_setup_code()
    assert normalize(code.lower().replace("-", " ")) == code
    with_aliases = code.replace("1", "l").replace("0", "o")
    assert normalize(with_aliases) == code


@pytest.mark.parametrize("bad", ["", "x" * 100, "ABCDE-FGHJK", "ABCDE-FGHJK-MN", "ÄBCDE-FGHJK-M"])
def test_malformed_codes_get_a_clear_error(bad: str) -> None:
    with pytest.raises(ValidationError) as e:
        normalize(bad)
    assert e.value.reason == "invalid_setup_code"


def test_setup_uri_round_trip_and_refusals() -> None:
    device_id, code = new_device_id(), new_setup_code()
    assert parse_setup_uri(setup_uri(device_id, code)) == (device_id, code)
    for bad in ["https://evil.example/?d=x", f"hearth-setup:?v=2&d={device_id}&c={code}",
                "hearth-setup:?v=1&d=XYZ&c=" + code, f"hearth-setup:?v=1&d={device_id}"]:
        with pytest.raises(ValidationError):
            parse_setup_uri(bad)


def test_label_qr_decodes_to_the_setup_uri() -> None:
    device_id, code = new_device_id(), new_setup_code()
    png = label_png(device_id, code, "thermostat")
    found = zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))
    assert [r.text for r in found] == [setup_uri(device_id, code)]
