"""The maker PKI: hierarchy, unit identities, key protection, revocation."""

from __future__ import annotations

import itertools
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hearth.errors import PKIError
from hearth.pki import (
    DEVICE_ID_RE,
    MakerPKI,
    common_name,
    generate_key,
    new_device_id,
)


def _verify(child: x509.Certificate, issuer: x509.Certificate) -> None:
    child.verify_directly_issued_by(issuer)


def test_hierarchy_root_signs_only_issuing_cas(pki: MakerPKI) -> None:
    root = pki.root_cert
    for ca in (pki.device_ca.cert, pki.service_ca.cert):
        _verify(ca, root)
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.ca and bc.path_length == 0  # issuing CAs cannot create further CAs
    root_bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert root_bc.ca and root_bc.path_length == 1
    for cert in (root, pki.device_ca.cert, pki.service_ca.cert):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_unit_certificate_names_the_random_device_id(pki: MakerPKI) -> None:
    device_id = new_device_id()
    cert = pki.issue_device_cert(device_id, generate_key().public_key())
    assert common_name(cert) == device_id
    _verify(cert, pki.device_ca.cert)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH not in eku


def test_device_ids_are_128_random_bits() -> None:
    ids = [new_device_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(DEVICE_ID_RE.match(i) for i in ids)
    # consecutive ids are not a counter: they differ in about half of their 128 bits
    diffs = [bin(int(a, 16) ^ int(b, 16)).count("1") for a, b in itertools.pairwise(ids)]
    assert 56 < sum(diffs) / len(diffs) < 72


@pytest.mark.parametrize("bad", ["", "0001", "AB" * 16, "g" * 32, "serial-000123",
                                 "ab" * 16 + "\n"])
def test_certificate_refused_for_non_random_ids(pki: MakerPKI, bad: str) -> None:
    with pytest.raises(PKIError):
        pki.issue_device_cert(bad, generate_key().public_key())


def test_private_keys_are_0600_and_never_in_repr(pki: MakerPKI) -> None:
    keys = list(pki.directory.rglob("*.key"))
    assert len(keys) == 3
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = repr(pki) + repr(pki.device_ca)
    assert "PRIVATE" not in text and "key=" not in text


def test_load_round_trip_and_refuses_a_second_create(pki: MakerPKI) -> None:
    again = MakerPKI.load(pki.directory)
    assert again.device_ca.cert == pki.device_ca.cert
    with pytest.raises(PKIError):
        MakerPKI.create(pki.directory)
    with pytest.raises(PKIError):
        MakerPKI.load(pki.directory / "nowhere")


def test_revocation_lands_in_the_signed_crl(pki: MakerPKI) -> None:
    cert = pki.issue_device_cert(new_device_id(), generate_key().public_key())
    other = pki.issue_device_cert(new_device_id(), generate_key().public_key())
    pki.revoke(cert)
    pki.revoke(cert)  # idempotent
    assert pki.is_revoked(cert) and not pki.is_revoked(other)
    pem = pki.crl_path().read_text()
    blocks = [b + "-----END X509 CRL-----\n" for b in pem.split("-----END X509 CRL-----")[:-1]]
    crls = [x509.load_pem_x509_crl(b.strip().encode()) for b in blocks]
    assert len(crls) == 2
    device_crl = next(c for c in crls if c.issuer == pki.device_ca.cert.subject)
    assert device_crl.is_signature_valid(pki.device_ca.cert.public_key())  # type: ignore[arg-type]
    assert device_crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert device_crl.get_revoked_certificate_by_serial_number(other.serial_number) is None
    assert len(MakerPKI.load(pki.directory).revoked()["device-ca"]) == 1


def test_revoking_a_foreign_certificate_is_refused(pki: MakerPKI, tmp_path) -> None:
    foreign = MakerPKI.create(tmp_path / "other")
    cert = foreign.issue_device_cert(new_device_id(), generate_key().public_key())
    with pytest.raises(PKIError):
        pki.revoke(cert)
