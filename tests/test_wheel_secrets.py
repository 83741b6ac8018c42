"""The built wheel carries no private key or other secret (and the check can fail)."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path
from types import ModuleType

from hearth.pki import generate_key, key_to_pem

ROOT = Path(__file__).resolve().parent.parent


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "scripts" /
                                                  "check_wheel.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_wheel"] = module
    spec.loader.exec_module(module)
    return module


def test_the_built_wheel_has_no_secrets(tmp_path: Path) -> None:
    check = _checker()
    wheel = check.build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert any(n.endswith("hearth/service/accounts/routes.py") for n in names)
    assert any(n.endswith("migrations/versions/0201_accounts.py") for n in names)
    assert check.scan_wheel(wheel) == []


def test_the_wheel_check_finds_a_planted_key_and_token(tmp_path: Path) -> None:
    check = _checker()
    bad = tmp_path / "hearth-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("hearth/data/device.key", key_to_pem(generate_key()))
        zf.writestr("hearth/conf.py", "TOKEN = 'hth_0123456789abcdef." + "A" * 43 + "'\n")
        zf.writestr("hearth/ok.py", "x = 1\n")
    findings = check.scan_wheel(bad)
    assert any("device.key: a file type" in f for f in findings)
    assert any("PEM private key" in f for f in findings)
    assert any("operator API token" in f for f in findings)
    assert not any(f.startswith("hearth/ok.py") for f in findings)
