"""A unit's identity, loaded and checked from its directory ("flash") at start.

The factory (:mod:`hearth.factory`) writes one directory per unit::

    unit.json     format, device id, model, trusted service endpoint (no secrets)
    device.key    the unit's private key (0600)           -> :class:`~.keystore.FileKeyStore`
    device.pem    its certificate, CN = device id
    ca.pem        the maker root CA: the only anchor the unit trusts for the broker
    mqtt.secret   the unit's own random broker password (0600)

:meth:`UnitIdentity.load` refuses anything inconsistent with a clear
:class:`~hearth.errors.DeviceError`: an unknown ``unit.json`` format, a device id that is not
the certificate's common name (a swapped or tampered file), an unknown model, an endpoint
that is not a host/port/``https://`` URL, a key or password readable by others, or a key
that does not belong to the certificate. Keys that later factory stages add to
``unit.json`` (setup code, update root) are ignored here.

The broker password is kept out of ``repr`` and is never logged.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from hearth.device.keystore import FileKeyStore, KeyStore, check_secret_file_mode
from hearth.errors import DeviceError
from hearth.protocol import MODELS, ModelSpec

__all__ = ["UNIT_FORMAT", "UnitIdentity"]

UNIT_FORMAT = 1
_DEVICE_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
_HOST_RE = re.compile(r"^[A-Za-z0-9.:\-\[\]]{1,253}\Z")
_MAX_UNIT_JSON = 64 * 1024
_MAX_SECRET = 256


@dataclass(frozen=True)
class UnitIdentity:
    """Who this unit is and which service it trusts."""

    directory: Path
    device_id: str
    model: ModelSpec
    mqtt_host: str
    mqtt_port: int
    http_url: str
    ca_file: Path
    keystore: KeyStore
    mqtt_password: str = field(repr=False)

    @classmethod
    def load(cls, directory: Path, *, keystore: KeyStore | None = None) -> UnitIdentity:
        """Load and check the unit in ``directory``.

        ``keystore`` replaces the default :class:`FileKeyStore` (e.g. a PKCS#11 backend).
        Raises :class:`DeviceError` with the reason when anything is missing or inconsistent.
        """
        if not directory.is_dir():
            raise DeviceError(f"{directory} is not a unit directory")
        unit = _load_unit_json(directory / "unit.json")
        fmt = unit.get("format")
        if fmt != UNIT_FORMAT or isinstance(fmt, bool):
            raise DeviceError(f"unit.json format {fmt!r} is not supported (expected {UNIT_FORMAT})")
        device_id = unit.get("device_id")
        if not isinstance(device_id, str) or not _DEVICE_ID_RE.match(device_id):
            raise DeviceError("unit.json device_id must be 32 lowercase hex digits")
        model_name = unit.get("model")
        if not isinstance(model_name, str) or model_name not in MODELS:
            raise DeviceError(
                f"unit.json model {model_name!r} is not a known model ({', '.join(MODELS)})"
            )
        host, port, http_url = _endpoint(unit.get("service"))

        store = keystore if keystore is not None else FileKeyStore(directory)
        try:
            cert = x509.load_pem_x509_certificate(store.device_certificate_pem())
        except ValueError as e:
            raise DeviceError("the device certificate is not a PEM X.509 certificate") from e
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1 or cns[0].value != device_id:
            raise DeviceError(
                "unit.json device_id does not match the certificate's common name "
                "(unit.json or device.pem was swapped or tampered with)"
            )

        ca_file = directory / "ca.pem"
        try:
            anchors = x509.load_pem_x509_certificates(ca_file.read_bytes())
        except FileNotFoundError as e:
            raise DeviceError(f"missing ca.pem in {directory}") from e
        except ValueError as e:
            raise DeviceError("ca.pem is not a PEM certificate bundle") from e
        if not anchors:
            raise DeviceError("ca.pem holds no certificate")

        password = _read_password(directory / "mqtt.secret")
        return cls(
            directory=directory,
            device_id=device_id,
            model=MODELS[model_name],
            mqtt_host=host,
            mqtt_port=port,
            http_url=http_url,
            ca_file=ca_file,
            keystore=store,
            mqtt_password=password,
        )


def _load_unit_json(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise DeviceError(f"missing unit.json in {path.parent}") from e
    except OSError as e:
        raise DeviceError(f"cannot read unit.json: {e.strerror}") from e
    if len(raw) > _MAX_UNIT_JSON:
        raise DeviceError(f"unit.json is larger than {_MAX_UNIT_JSON} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DeviceError("unit.json is not valid JSON") from e
    if not isinstance(data, dict):
        raise DeviceError("unit.json must hold a JSON object")
    return data


def _endpoint(service: object) -> tuple[str, int, str]:
    if not isinstance(service, dict):
        raise DeviceError("unit.json service must be an object with mqtt_host, mqtt_port, http_url")
    host = service.get("mqtt_host")
    port = service.get("mqtt_port")
    url = service.get("http_url")
    if not isinstance(host, str) or not _HOST_RE.match(host):
        raise DeviceError("unit.json service.mqtt_host must be a host name or address")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise DeviceError("unit.json service.mqtt_port must be a port number 1..65535")
    if not isinstance(url, str) or not url.startswith("https://") or len(url) > 2048:
        raise DeviceError("unit.json service.http_url must be an https:// URL")
    return host, port, url


def _read_password(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise DeviceError(f"missing mqtt.secret in {path.parent}") from e
    except OSError as e:
        raise DeviceError(f"cannot open mqtt.secret: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        check_secret_file_mode(path, os.fstat(f.fileno()).st_mode)
        raw = f.read(_MAX_SECRET + 1)
    try:
        password = raw.decode("ascii").strip()
    except UnicodeDecodeError as e:
        raise DeviceError("mqtt.secret must be ASCII") from e
    if not password or len(password) > _MAX_SECRET or not password.isprintable():
        raise DeviceError(f"mqtt.secret must hold 1..{_MAX_SECRET} printable characters")
    return password
