"""The maker's public-key infrastructure: CAs, unit and service certificates, revocation.

Hierarchy (all keys ECDSA P-256)::

    maker root CA          signs only the two issuing CAs (path length 1)
    ├── device CA          signs one certificate per unit (CN = device id)
    └── service CA         signs the broker/HTTPS server certificate and the service's
                           own MQTT client identities (ingest, control)

A unit's device id is 128 bits from the operating system's CSPRNG (:func:`new_device_id`);
it is never derived from a serial number, MAC address or counter. The service keeps a
certificate revocation list per issuing CA (:meth:`MakerPKI.revoke`,
:meth:`MakerPKI.write_crl`).

Security logic here does no network I/O. :class:`MakerPKI` is the one place that reads and
writes the PKI directory; private keys are always written with mode 0600 and are never
logged or included in ``repr``.

Example::

    pki = MakerPKI.create(Path("hearth-data/pki"))
    key = generate_key()
    cert = pki.issue_device_cert(new_device_id(), key.public_key())
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hearth._fsutil import atomic_write, read_json, write_json, write_secret
from hearth.errors import PKIError

__all__ = [
    "DEVICE_ID_RE",
    "CertificateAuthority",
    "MakerPKI",
    "RevokedEntry",
    "cert_from_pem",
    "cert_to_pem",
    "generate_key",
    "key_from_pem",
    "key_to_pem",
    "new_device_id",
]

DEVICE_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
"""A device id: 128 random bits as 32 lowercase hex digits."""

SERVICE_IDENTITY_RE = re.compile(r"^hearth-[a-z]+\Z")

ROOT_VALIDITY = dt.timedelta(days=365 * 20)
ISSUING_VALIDITY = dt.timedelta(days=365 * 10)
DEVICE_VALIDITY = dt.timedelta(days=365 * 10)
SERVER_VALIDITY = dt.timedelta(days=397)
CRL_VALIDITY = dt.timedelta(days=7)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_device_id() -> str:
    """A fresh device id: 128 bits from the OS CSPRNG, hex-encoded."""
    return secrets.token_hex(16)


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_from_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise PKIError("private key is not a valid unencrypted PEM key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise PKIError("private key is not an ECDSA P-256 key")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise PKIError("not a PEM X.509 certificate") from e


def _name(cn: str, org: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        raise PKIError("certificate must have exactly one common name")
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: dt.datetime
    subject: str


@dataclass
class CertificateAuthority:
    """A CA certificate with its private key. ``repr`` never shows the key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def name(self) -> str:
        return common_name(self.cert)

    def sign(
        self,
        *,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        validity: dt.timedelta,
        ca_path_length: int | None = None,
        is_ca: bool = False,
        eku: list[x509.ObjectIdentifier] | None = None,
        san: list[x509.GeneralName] | None = None,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        start = not_before or (_now() - dt.timedelta(minutes=5))
        end = start + validity
        if end > self.cert.not_valid_after_utc and not_before is None:
            end = self.cert.not_valid_after_utc
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.BasicConstraints(ca=is_ca, path_length=ca_path_length if is_ca else None),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if is_ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
        else:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def build_crl(
        self, revoked: Iterable[RevokedEntry], *, validity: dt.timedelta = CRL_VALIDITY
    ) -> x509.CertificateRevocationList:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + validity)
        )
        for entry in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(entry.serial)
                .revocation_date(entry.revoked_at)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256())


def create_root_ca(org: str, *, validity: dt.timedelta = ROOT_VALIDITY) -> CertificateAuthority:
    key = generate_key()
    name = _name(f"{org} Root CA", org)
    now = _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert=cert, key=key)


def create_issuing_ca(root: CertificateAuthority, cn: str) -> CertificateAuthority:
    key = generate_key()
    org = root.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    cert = root.sign(
        subject=_name(cn, str(org)),
        public_key=key.public_key(),
        validity=ISSUING_VALIDITY,
        is_ca=True,
        ca_path_length=0,
    )
    return CertificateAuthority(cert=cert, key=key)


class MakerPKI:
    """The maker's PKI directory.

    Layout (keys 0600)::

        root/ca.pem  root/ca.key      (the root key signs issuing CAs only; keep it offline
                                       in production: ``hearth pki init`` is the only user)
        device-ca/ca.pem device-ca/ca.key
        service-ca/ca.pem service-ca/ca.key
        revoked.json                  revocation records, per issuing CA
        crl.pem                       current CRLs of both issuing CAs (PEM, concatenated)
    """

    def __init__(self, directory: Path, *, device_ca: CertificateAuthority,
                 service_ca: CertificateAuthority, root_cert: x509.Certificate) -> None:
        self.directory = directory
        self.device_ca = device_ca
        self.service_ca = service_ca
        self.root_cert = root_cert

    def __repr__(self) -> str:
        return f"MakerPKI({self.directory!s})"

    # -- creation and loading -------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, *, org: str = "Hearth Maker") -> MakerPKI:
        if (directory / "root" / "ca.pem").exists():
            raise PKIError(f"a PKI already exists in {directory}")
        root = create_root_ca(org)
        device_ca = create_issuing_ca(root, f"{org} Device CA")
        service_ca = create_issuing_ca(root, f"{org} Service CA")
        for sub, ca in (("root", root), ("device-ca", device_ca), ("service-ca", service_ca)):
            write_secret(directory / sub / "ca.key", key_to_pem(ca.key))
            atomic_write(directory / sub / "ca.pem", cert_to_pem(ca.cert))
        pki = cls(directory, device_ca=device_ca, service_ca=service_ca, root_cert=root.cert)
        pki.write_crl()
        return pki

    @classmethod
    def load(cls, directory: Path) -> MakerPKI:
        try:
            def ca(sub: str) -> CertificateAuthority:
                return CertificateAuthority(
                    cert=cert_from_pem((directory / sub / "ca.pem").read_bytes()),
                    key=key_from_pem((directory / sub / "ca.key").read_bytes()),
                )

            root_cert = cert_from_pem((directory / "root" / "ca.pem").read_bytes())
            return cls(directory, device_ca=ca("device-ca"), service_ca=ca("service-ca"),
                       root_cert=root_cert)
        except FileNotFoundError as e:
            raise PKIError(f"no PKI in {directory} (run `hearth pki init`)") from e

    @classmethod
    def load_or_create(cls, directory: Path) -> MakerPKI:
        if (directory / "root" / "ca.pem").exists():
            return cls.load(directory)
        return cls.create(directory)

    # -- issuing ---------------------------------------------------------------------

    def chain_pem(self) -> bytes:
        """Issuing CAs and root, for peers that must verify either side."""
        return (
            cert_to_pem(self.device_ca.cert)
            + cert_to_pem(self.service_ca.cert)
            + cert_to_pem(self.root_cert)
        )

    def root_pem(self) -> bytes:
        return cert_to_pem(self.root_cert)

    def issue_device_cert(
        self,
        device_id: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        validity: dt.timedelta = DEVICE_VALIDITY,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        if not DEVICE_ID_RE.match(device_id):
            raise PKIError("device id must be 32 lowercase hex digits (128 random bits)")
        org = self.device_ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return self.device_ca.sign(
            subject=_name(device_id, str(org[0].value)),
            public_key=public_key,
            validity=validity,
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
            not_before=not_before,
        )

    def issue_service_client_cert(
        self, identity: str, public_key: ec.EllipticCurvePublicKey
    ) -> x509.Certificate:
        if not SERVICE_IDENTITY_RE.match(identity):
            raise PKIError("service identities are named hearth-<lowercase letters>")
        org = self.service_ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return self.service_ca.sign(
            subject=_name(identity, str(org[0].value)),
            public_key=public_key,
            validity=SERVER_VALIDITY,
            eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        )

    def issue_server_cert(
        self, public_key: ec.EllipticCurvePublicKey, hostnames: Iterable[str]
    ) -> x509.Certificate:
        names: list[x509.GeneralName] = []
        for host in hostnames:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        if not names:
            raise PKIError("a server certificate needs at least one host name")
        org = self.service_ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return self.service_ca.sign(
            subject=_name("hearth-service", str(org[0].value)),
            public_key=public_key,
            validity=SERVER_VALIDITY,
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            san=names,
        )

    # -- revocation ------------------------------------------------------------------

    def _revoked_path(self) -> Path:
        return self.directory / "revoked.json"

    def revoked(self) -> dict[str, list[RevokedEntry]]:
        path = self._revoked_path()
        raw = read_json(path) if path.exists() else {}
        out: dict[str, list[RevokedEntry]] = {"device-ca": [], "service-ca": []}
        for ca_name, entries in raw.items():
            out[ca_name] = [
                RevokedEntry(
                    serial=int(e["serial"]),
                    revoked_at=dt.datetime.fromisoformat(e["revoked_at"]),
                    subject=e["subject"],
                )
                for e in entries
            ]
        return out

    def issuer_of(self, cert: x509.Certificate) -> str:
        """``"device-ca"`` or ``"service-ca"``: which of our CAs signed ``cert``.

        Checks the signature, not just the issuer name (another maker's CA may share it).
        Raises :class:`PKIError` for a certificate none of them signed.
        """
        for name, ca in (("device-ca", self.device_ca), ("service-ca", self.service_ca)):
            try:
                cert.verify_directly_issued_by(ca.cert)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return name
        raise PKIError("certificate was not issued by this PKI")

    def is_revoked(self, cert: x509.Certificate) -> bool:
        return any(
            e.serial == cert.serial_number for entries in self.revoked().values() for e in entries
        )

    def revoke(self, cert: x509.Certificate) -> RevokedEntry:
        """Record ``cert`` as revoked and rewrite the CRL file. Idempotent."""
        ca_name = self.issuer_of(cert)
        table = self.revoked()
        for entry in table[ca_name]:
            if entry.serial == cert.serial_number:
                return entry
        entry = RevokedEntry(cert.serial_number, _now(), common_name(cert))
        table[ca_name].append(entry)
        write_json(
            self._revoked_path(),
            {
                name: [
                    {"serial": str(e.serial), "revoked_at": e.revoked_at.isoformat(),
                     "subject": e.subject}
                    for e in entries
                ]
                for name, entries in table.items()
            },
        )
        self.write_crl()
        return entry

    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    def write_crl(self) -> Path:
        """(Re)sign both CRLs and write them to ``crl.pem``; returns the path."""
        table = self.revoked()
        data = b"".join(
            ca.build_crl(table[name]).public_bytes(serialization.Encoding.PEM)
            for name, ca in (("device-ca", self.device_ca), ("service-ca", self.service_ca))
        )
        path = self.crl_path()
        atomic_write(path, data)
        return path
