"""The PKCS#11 key store against a real SoftHSM2 token initialised in a temporary
directory: the key is generated in the token and never leaves it; signatures verify with
the unit's certificate; TLS credentials are refused with a clear error."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from hearth._fsutil import write_secret
from hearth.device.identity import UnitIdentity
from hearth.device.keystore_pkcs11 import Pkcs11KeyStore
from hearth.errors import DeviceError
from hearth.pki import MakerPKI, cert_to_pem

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")

if shutil.which("softhsm2-util") is None or not MODULE.exists():
    # Never skip: a missing token library is a missing install step.
    pytest.fail("SoftHSM2 is not installed (apt-get install softhsm2)", pytrace=False)


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One SoftHSM2 token directory for this module: the library reads SOFTHSM2_CONF once
    per process, so every token of these tests lives in the same temporary directory."""
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    yield conf
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(scope="module")
def token(softhsm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One token for the module (created before the library is first loaded: SoftHSM2
    does not see tokens created later); each test makes its own key in it."""
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    label = "unit-" + secrets.token_hex(4)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                    "--so-pin", so_pin], check=True, capture_output=True,
                   env={**os.environ, "SOFTHSM2_CONF": str(softhsm)})
    pin_file = tmp_path_factory.mktemp("pin") / "token.pin"
    write_secret(pin_file, pin.encode())
    return label, pin_file


def generate_in_token(label: str, pin_file: Path, key_label: str
                      ) -> ec.EllipticCurvePublicKey:
    import pkcs11
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    lib = pkcs11.lib(str(MODULE))
    with lib.get_token(token_label=label).open(user_pin=pin_file.read_text(),
                                               rw=True) as session:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True)
        public, _private = params.generate_keypair(
            store=True, label=key_label,
            private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
        key = load_der_public_key(encode_ec_public_key(public))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


@pytest.fixture
def unit_with_token_key(token: tuple[str, Path], unit_dir: Path, tmp_path: Path,
                        session_pki: MakerPKI) -> tuple[Path, str, Path, str]:
    label, shared_pin = token
    pin_file = tmp_path / "token.pin"
    write_secret(pin_file, shared_pin.read_bytes())
    key_label = "device-" + secrets.token_hex(4)
    public = generate_in_token(label, pin_file, key_label)
    device_id = UnitIdentity.load(unit_dir).device_id
    cert = session_pki.issue_device_cert(device_id, public)
    (unit_dir / "token.pem").write_bytes(cert_to_pem(cert))
    return unit_dir, label, pin_file, key_label


def store(unit: tuple[Path, str, Path, str], **over: object) -> Pkcs11KeyStore:
    directory, label, pin_file, key_label = unit
    args: dict[str, object] = {"module": MODULE, "token_label": label, "key_label": key_label,
                               "pin_file": pin_file, "certificate": directory / "token.pem"}
    args.update(over)
    return Pkcs11KeyStore(**args)  # type: ignore[arg-type]


def test_signatures_from_the_token_verify_with_the_units_certificate(
        unit_with_token_key: tuple[Path, str, Path, str]) -> None:
    ks = store(unit_with_token_key)
    try:
        for data in (b"", b"update request", os.urandom(5000)):
            signature = ks.sign(data)
            ks.certificate.public_key().verify(  # type: ignore[call-arg]
                signature, data, ec.ECDSA(hashes.SHA256()))
        pin = unit_with_token_key[2].read_text()
        assert pin not in repr(ks) and pin not in str(vars(ks))
    finally:
        ks.close()


def test_the_identity_loads_with_the_token_key_store(
        unit_with_token_key: tuple[Path, str, Path, str]) -> None:
    directory = unit_with_token_key[0]
    ks = store(unit_with_token_key)
    try:
        identity = UnitIdentity.load(directory, keystore=ks)
        assert identity.keystore is ks
        with pytest.raises(DeviceError, match="PKCS#11"):
            ks.tls_credentials()
    finally:
        ks.close()


def test_the_private_key_cannot_be_read_out_of_the_token(
        unit_with_token_key: tuple[Path, str, Path, str]) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    _dir, label, pin_file, key_label = unit_with_token_key
    lib = pkcs11.lib(str(MODULE))
    with lib.get_token(token_label=label).open(user_pin=pin_file.read_text()) as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label)
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
        with pytest.raises(pkcs11.PKCS11Error):
            key[Attribute.VALUE]


def test_wrong_pin_wrong_key_and_readable_pin_file_are_refused(
        unit_with_token_key: tuple[Path, str, Path, str], session_pki: MakerPKI,
        tmp_path: Path) -> None:
    directory, _label, pin_file, _key = unit_with_token_key
    wrong = tmp_path / "wrong.pin"
    write_secret(wrong, b"0000")
    with pytest.raises(DeviceError):
        store(unit_with_token_key, pin_file=wrong)
    with pytest.raises(DeviceError, match="does not match"):
        store(unit_with_token_key, certificate=directory / "device.pem")  # the file key's
    pin_file.chmod(0o644)
    with pytest.raises(DeviceError, match="group or others"):
        store(unit_with_token_key)
