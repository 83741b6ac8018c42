"""Minting unit identities at the factory.

Each unit gets its own directory - its "flash" - holding everything it needs to find and
trust the service and to prove who it is::

    OUT/<device_id>/unit.json     device id, model, trusted service endpoint (no secrets)
    OUT/<device_id>/device.key    the unit's ECDSA P-256 private key (0600)
    OUT/<device_id>/device.pem    its certificate, CN = device id, signed by the device CA
    OUT/<device_id>/ca.pem        the maker root CA: the only anchor the unit trusts
    OUT/<device_id>/mqtt.secret   256-bit random broker password (0600), bound at the broker
                                  to this device id as username *and* client id
    OUT/<device_id>/setup.hash    scrypt hash of the unit's setup code (0600): the unit can
                                  check the code before it is claimed, but does not hold it
    OUT/manifest.json             what the service imports (``hearth fleet import OUT``):
                                  certificates and *hashes* of broker passwords and setup
                                  codes only - no secret leaves the factory in it
    OUT/labels/<device_id>.svg|png  the printable label: QR code (setup URI) + code in text
    OUT/labels/print-manifest.csv   manufacturing manifest for the label line (0600: it holds
                                  the setup codes; destroy it once the labels are printed)

Nothing about a unit is derived from a serial number, MAC address or counter: the device id
the broker password and the setup code are fresh CSPRNG output
(:func:`hearth.pki.new_device_id`, :func:`secrets.token_urlsafe`,
:func:`hearth.setupcode.new_setup_code`).

With ``updates=`` (the service's update repository) each unit also gets its update trust
anchor and its factory image (signed updates, ``docs/updates.md``)::

    OUT/<device_id>/update/trusted_root.json  the TUF root the unit trusts (and nothing else)
    OUT/<device_id>/slots/a/...               the newest published release of its model,
                                              verified and committed in slot A
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import io
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hearth._fsutil import atomic_write, read_json, write_json, write_secret
from hearth.errors import ConfigError, ValidationError
from hearth.pki import MakerPKI, cert_to_pem, generate_key, key_to_pem, new_device_id
from hearth.protocol import MODELS
from hearth.setupcode import new_setup_code

if TYPE_CHECKING:
    from hearth.updates.repository import Repository

__all__ = [
    "DYNSEC_ITERATIONS",
    "MANIFEST_NAME",
    "Endpoint",
    "MintedUnit",
    "dynsec_password_hash",
    "hash_setup_code",
    "load_manifest",
    "mint",
    "scrypt_hash",
    "scrypt_verify",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
UNIT_FORMAT = 1
MAX_BATCH = 1_000_000
DYNSEC_ITERATIONS = 101
"""PBKDF2 rounds in the broker's password hashes. Low on purpose and safe: the password
is 256 bits of CSPRNG output, so no amount of hashing changes the brute-force cost, while
every connect (and a reconnect storm of the whole fleet) pays for each round."""


@dataclass(frozen=True)
class Endpoint:
    """The service a unit trusts, written into its flash at minting."""

    mqtt_host: str = "localhost"
    mqtt_port: int = 8883
    http_url: str = "https://localhost:8443"

    def to_json(self) -> dict[str, Any]:
        return {"mqtt_host": self.mqtt_host, "mqtt_port": self.mqtt_port,
                "http_url": self.http_url}


@dataclass(frozen=True)
class MintedUnit:
    device_id: str
    model: str
    directory: Path


def dynsec_password_hash(password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    """Hash ``password`` the way Mosquitto's dynamic-security plugin stores it."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, DYNSEC_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": DYNSEC_ITERATIONS,
    }


_argon2 = None


def hash_setup_code(code: str) -> str:
    """argon2id hash of a (normalised) setup code, as the service stores it.

    Parameters follow OWASP's argon2id minimum (19 MiB, 2 passes): with 50 bits of code
    entropy an offline search of one stolen hash costs ~2**49 argon2id evaluations.
    """
    global _argon2
    if _argon2 is None:
        from argon2 import PasswordHasher

        _argon2 = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
    return str(_argon2.hash(code))


SCRYPT_N = 2**14


def scrypt_hash(secret: str) -> dict[str, Any]:
    """scrypt hash of a secret for the unit's flash (stdlib only, no extra dependency)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=8, p=1, dklen=32)
    return {"alg": "scrypt", "n": SCRYPT_N, "r": 8, "p": 1,
            "salt": base64.b64encode(salt).decode(), "hash": base64.b64encode(digest).decode()}


def scrypt_verify(secret: str, stored: dict[str, Any]) -> bool:
    import hmac

    try:
        salt = base64.b64decode(stored["salt"])
        n, r, p = int(stored["n"]), int(stored["r"]), int(stored["p"])
        if stored.get("alg") != "scrypt" or not (2**10 <= n <= 2**20 and 1 <= r <= 16 and p == 1):
            return False
        digest = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
        return hmac.compare_digest(digest, base64.b64decode(stored["hash"]))
    except (KeyError, ValueError, TypeError):
        return False


def mint(
    pki: MakerPKI,
    *,
    model: str,
    count: int,
    out: Path,
    endpoint: Endpoint | None = None,
    progress: Callable[[int], None] | None = None,
    labels: bool = True,
    updates: Repository | None = None,
) -> list[MintedUnit]:
    """Mint ``count`` units of ``model`` into ``out`` and write/extend its manifest.

    ``updates``: install each unit's update trust anchor and the model's newest published
    release as its factory image (slot A). Without it the unit has no signed software
    (tests of other parts; such a unit runs the built-in reference app)."""
    if model not in MODELS:
        raise ValidationError("unknown_model", f"unknown model {model!r}; known: {sorted(MODELS)}")
    provision = _update_provisioner(updates, model) if updates is not None else None
    if not 1 <= count <= MAX_BATCH:
        raise ValidationError("out_of_range", f"count must be 1..{MAX_BATCH}")
    endpoint = endpoint or Endpoint()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    manifest: dict[str, Any] = (
        read_json(manifest_path)
        if manifest_path.exists()
        else {"format": MANIFEST_FORMAT, "batch_id": secrets.token_hex(8), "units": []}
    )
    root_pem = pki.root_pem()
    minted: list[MintedUnit] = []
    print_rows: list[tuple[str, str, str]] = []
    now = dt.datetime.now(dt.UTC).isoformat()
    for _ in range(count):
        device_id = new_device_id()
        key = generate_key()
        cert = pki.issue_device_cert(device_id, key.public_key())
        password = secrets.token_urlsafe(32)
        code = new_setup_code()
        unit_dir = out / device_id
        unit_dir.mkdir(mode=0o700)
        write_secret(unit_dir / "device.key", key_to_pem(key))
        write_secret(unit_dir / "mqtt.secret", password.encode())
        write_secret(unit_dir / "setup.hash", json.dumps(scrypt_hash(code)).encode())
        atomic_write(unit_dir / "device.pem", cert_to_pem(cert))
        atomic_write(unit_dir / "ca.pem", root_pem)
        write_json(
            unit_dir / "unit.json",
            {
                "format": UNIT_FORMAT,
                "device_id": device_id,
                "model": model,
                "minted_at": now,
                "service": endpoint.to_json(),
            },
        )
        manifest["units"].append(
            {
                "device_id": device_id,
                "model": model,
                "certificate": cert_to_pem(cert).decode(),
                "mqtt_password_hash": dynsec_password_hash(password),
                "setup_code_hash": hash_setup_code(code),
                "minted_at": now,
            }
        )
        if labels:
            from hearth.labels import label_png, label_svg

            atomic_write(out / "labels" / f"{device_id}.svg", label_svg(device_id, code, model))
            atomic_write(out / "labels" / f"{device_id}.png", label_png(device_id, code, model))
        if provision is not None:
            provision(unit_dir)
        print_rows.append((device_id, model, code))
        minted.append(MintedUnit(device_id, model, unit_dir))
        if progress:
            progress(1)
    write_json(manifest_path, manifest)
    _append_print_manifest(out / "labels" / "print-manifest.csv", print_rows)
    return minted


def _update_provisioner(updates: Repository, model: str) -> Callable[[Path], None]:
    """Install the trust anchor and the factory image (checked once, copied per unit)."""
    from hearth.device.slots import provision_factory_image
    from hearth.device.updater import install_trusted_root

    release = updates.latest(model)
    if release is None:
        raise ConfigError(f"the update repository has no release of {model!r} to use as the "
                          "factory image (hearth release publish ...)")
    root = updates.trusted_root()
    bundle = updates.target_file(release.target_name)
    delivery = updates.delivery(release.target_name)

    def provision(unit_dir: Path) -> None:
        install_trusted_root(unit_dir, root)
        provision_factory_image(unit_dir, bundle, delivery)

    return provision


def _append_print_manifest(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """The label line's manufacturing manifest (0600: it holds setup codes)."""
    existing = path.read_bytes() if path.exists() else b"device_id,model,setup_code,label\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for device_id, model, code in rows:
        writer.writerow([device_id, model, code, f"{device_id}.svg"])
    write_secret(path, existing + buf.getvalue().encode())


def load_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME if directory.is_dir() else directory
    if not path.exists():
        raise ConfigError(f"no {MANIFEST_NAME} in {directory}")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path} is not a Hearth manifest (format {MANIFEST_FORMAT})")
    return data
