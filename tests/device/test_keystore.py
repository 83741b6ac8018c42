"""The file key store: private to its owner, and only the key that belongs to the cert."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hearth.device.keystore import FileKeyStore, KeyStore
from hearth.device.link import make_tls_context
from hearth.errors import DeviceError
from hearth.pki import generate_key, key_to_pem


def test_loads_a_minted_unit_and_signs_with_its_key(unit_dir: Path) -> None:
    store = FileKeyStore(unit_dir)
    assert isinstance(store, KeyStore)
    cert = x509.load_pem_x509_certificate(store.device_certificate_pem())
    signature = store.sign(b"hello")
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"hello", ec.ECDSA(hashes.SHA256()))  # raises if wrong


def test_tls_credentials_load_into_python_ssl(unit_dir: Path) -> None:
    store = FileKeyStore(unit_dir)
    cert_file, key_file = store.tls_credentials()
    assert cert_file == unit_dir / "device.pem" and key_file == unit_dir / "device.key"
    ctx = make_tls_context(unit_dir / "ca.pem", store)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_refuses_a_key_readable_or_writable_by_others(unit_dir: Path, mode: int) -> None:
    os.chmod(unit_dir / "device.key", mode)
    with pytest.raises(DeviceError, match="group or others"):
        FileKeyStore(unit_dir)


def test_accepts_an_owner_only_key(unit_dir: Path) -> None:
    os.chmod(unit_dir / "device.key", 0o400)
    FileKeyStore(unit_dir)


def test_refuses_a_key_that_does_not_match_the_certificate(unit_dir: Path) -> None:
    path = unit_dir / "device.key"
    path.write_bytes(key_to_pem(generate_key()))
    os.chmod(path, 0o600)
    with pytest.raises(DeviceError, match="does not match"):
        FileKeyStore(unit_dir)


def test_refuses_a_key_of_another_kind(unit_dir: Path) -> None:
    path = unit_dir / "device.key"
    other = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(DeviceError, match="P-256"):
        FileKeyStore(unit_dir)


def test_refuses_garbage_and_missing_files(unit_dir: Path) -> None:
    (unit_dir / "device.key").write_bytes(b"not a key")
    with pytest.raises(DeviceError, match="PEM private key"):
        FileKeyStore(unit_dir)
    (unit_dir / "device.key").unlink()
    with pytest.raises(DeviceError, match=r"missing device\.key"):
        FileKeyStore(unit_dir)


def test_repr_never_shows_the_key(unit_dir: Path) -> None:
    store = FileKeyStore(unit_dir)
    key_pem = (unit_dir / "device.key").read_bytes().decode()
    body = key_pem.splitlines()[1]
    assert body not in repr(store)
    assert "PRIVATE" not in repr(store)
