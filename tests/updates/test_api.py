"""The public API of the update modules is pinned, and the unit's side stays separate."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

PUBLIC = {
    "hearth.updates": {"UpdateError", "UpdateReason", "bootstrap"},
    "hearth.updates.quickstart": {"FACTORY_VERSION", "bootstrap", "open_repository",
                                  "repository_paths"},
    "hearth.updates.reference": {"ENTRY_FUNCTION", "ENTRY_MODULE", "build_reference_bundle",
                                 "write_reference_app"},
    "hearth.device.appload": {"ENTRY_FUNCTION", "ENTRY_MODULE", "LoadedApp", "load_app"},
    "hearth.device.runtime": {"DEFAULT_ALERT_INTERVAL", "DEFAULT_CHECK_INTERVAL",
                              "DEFAULT_HEALTH_TIMEOUT", "RUNTIME_COMMANDS", "AppHost",
                              "UnitRuntime", "run_unit"},
    "hearth.updates.errors": {"UpdateError", "UpdateReason"},
    "hearth.updates.bundle": {
        "BUNDLE_FORMAT", "DEFAULT_LIMITS", "BundleLimits", "Delivery", "FileEntry",
        "MANIFEST_NAME", "Manifest", "ReleaseInfo", "build_bundle", "check_model_name",
        "check_path", "extract_bundle", "parse_target_name", "parse_version", "read_manifest",
        "target_name_for", "verify_bundle"},
    "hearth.updates.keys": {"KEY_SCHEMES", "OfflineRootKeys", "OnlineKeys", "ROOT_KEYS_FILE",
                            "generate_signer", "init_root"},
    "hearth.updates.repository": {"Expiries", "ONLINE_ROLES", "Release", "Repository"},
    "hearth.updates.support": {"ENDING_SOON", "PSTI_DEFINITION", "SupportPeriod",
                               "SupportStatus", "support_document"},
    "hearth.device.updater": {"HttpsFetcher", "Offer", "UnitUpdater", "UpdateResult",
                              "install_trusted_root", "tuf_client_download", "tuf_client_init",
                              "tuf_client_refresh", "tuf_config"},
    "hearth.device.slots": {"BootResult", "MAX_BOOT_ATTEMPTS", "SLOTS", "SlotCheck",
                            "SlotManager", "SlotState", "boot", "provision_factory_image",
                            "verify_active"},
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_api_is_pinned(name: str) -> None:
    module = importlib.import_module(name)
    assert set(module.__all__) == PUBLIC[name]
    assert len(set(module.__all__)) == len(module.__all__)
    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.{attr}"


def test_the_unit_never_loads_the_repository_or_its_keys() -> None:
    code = ("import sys, json, hearth.device.updater, hearth.device.slots, "
            "hearth.device.runtime; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('hearth'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    loaded = set(json.loads(out.stdout))
    assert "hearth.updates.repository" not in loaded
    assert "hearth.updates.quickstart" not in loaded
    assert "hearth.updates.keys" not in loaded
    assert "hearth.service" not in loaded
