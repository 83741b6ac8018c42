"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from hearth.pki import MakerPKI


@pytest.fixture(scope="session")
def session_pki(tmp_path_factory: pytest.TempPathFactory) -> MakerPKI:
    """One maker PKI for the whole run (creating CAs is cheap, but shared is simpler)."""
    return MakerPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def pki(tmp_path: Path) -> MakerPKI:
    """A fresh maker PKI for tests that revoke or otherwise change it."""
    return MakerPKI.create(tmp_path / "pki")
