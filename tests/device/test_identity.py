"""Loading a unit's identity: a tampered or inconsistent flash is refused with a reason."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from hearth.device.identity import UnitIdentity
from hearth.errors import DeviceError
from hearth.pki import new_device_id
from hearth.protocol import MODELS


def _edit(unit_dir: Path, **changes: Any) -> None:
    path = unit_dir / "unit.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_loads_a_minted_unit(unit_dir: Path) -> None:
    ident = UnitIdentity.load(unit_dir)
    assert ident.device_id == unit_dir.name
    assert ident.model is MODELS["thermostat"]
    assert (ident.mqtt_host, ident.mqtt_port) == ("localhost", 8883)
    assert ident.http_url.startswith("https://")
    assert ident.ca_file == unit_dir / "ca.pem"
    assert ident.mqtt_password == (unit_dir / "mqtt.secret").read_text().strip()


def test_password_never_in_repr(unit_dir: Path) -> None:
    ident = UnitIdentity.load(unit_dir)
    assert ident.mqtt_password not in repr(ident)
    assert ident.mqtt_password not in str(ident)


def test_refuses_device_id_that_is_not_the_certificate_cn(unit_dir: Path) -> None:
    _edit(unit_dir, device_id=new_device_id())
    with pytest.raises(DeviceError, match="common name"):
        UnitIdentity.load(unit_dir)


def test_refuses_another_units_certificate(
    unit_dir: Path, lock_dir: Path
) -> None:
    """Swapping in another unit's cert *and* key still disagrees with unit.json."""
    for name in ("device.pem", "device.key"):
        (unit_dir / name).write_bytes((lock_dir / name).read_bytes())
    with pytest.raises(DeviceError, match="common name"):
        UnitIdentity.load(unit_dir)


def test_refuses_unknown_model(unit_dir: Path) -> None:
    _edit(unit_dir, model="toaster")
    with pytest.raises(DeviceError, match="not a known model"):
        UnitIdentity.load(unit_dir)


@pytest.mark.parametrize("fmt", [2, 0, "1", True, None])
def test_refuses_unknown_format(unit_dir: Path, fmt: object) -> None:
    _edit(unit_dir, format=fmt)
    with pytest.raises(DeviceError, match="format"):
        UnitIdentity.load(unit_dir)


@pytest.mark.parametrize(
    ("service", "match"),
    [
        ({"mqtt_host": "", "mqtt_port": 8883, "http_url": "https://x"}, "mqtt_host"),
        ({"mqtt_host": "h", "mqtt_port": 0, "http_url": "https://x"}, "mqtt_port"),
        ({"mqtt_host": "h", "mqtt_port": True, "http_url": "https://x"}, "mqtt_port"),
        ({"mqtt_host": "h", "mqtt_port": 8883, "http_url": "http://x"}, "https"),
        ("localhost", "service"),
    ],
)
def test_refuses_bad_endpoint(unit_dir: Path, service: object, match: str) -> None:
    _edit(unit_dir, service=service)
    with pytest.raises(DeviceError, match=match):
        UnitIdentity.load(unit_dir)


def test_refuses_malformed_unit_json(unit_dir: Path) -> None:
    (unit_dir / "unit.json").write_text("{not json")
    with pytest.raises(DeviceError, match="not valid JSON"):
        UnitIdentity.load(unit_dir)
    (unit_dir / "unit.json").write_text("[1, 2]")
    with pytest.raises(DeviceError, match="object"):
        UnitIdentity.load(unit_dir)


def test_refuses_bad_device_id(unit_dir: Path) -> None:
    _edit(unit_dir, device_id="../../etc")
    with pytest.raises(DeviceError, match="32 lowercase hex"):
        UnitIdentity.load(unit_dir)


def test_refuses_a_password_file_readable_by_others(unit_dir: Path) -> None:
    os.chmod(unit_dir / "mqtt.secret", 0o644)
    with pytest.raises(DeviceError, match="group or others"):
        UnitIdentity.load(unit_dir)


def test_refuses_missing_pieces(unit_dir: Path) -> None:
    (unit_dir / "ca.pem").unlink()
    with pytest.raises(DeviceError, match=r"missing ca\.pem"):
        UnitIdentity.load(unit_dir)


def test_ignores_fields_added_by_later_factory_stages(unit_dir: Path) -> None:
    _edit(unit_dir, setup_code_hash="x", update_root="y")
    assert UnitIdentity.load(unit_dir).device_id == unit_dir.name
