"""Fixtures for the device runtime tests: units minted by the factory.

Minting writes and fsyncs several files per unit, so a few units are minted once per
session and each test gets its own copy of one (modes preserved, no ``state/`` yet).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hearth.factory import mint
from hearth.pki import MakerPKI


def mint_unit(pki: MakerPKI, out: Path, model: str = "thermostat") -> Path:
    """Mint one unit of ``model`` into ``out`` and return its directory (its "flash")."""
    (unit,) = mint(pki, model=model, count=1, out=out)
    return unit.directory


@pytest.fixture(scope="session")
def _templates(
    session_pki: MakerPKI, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[Path]]:
    out = tmp_path_factory.mktemp("unit-templates")
    return {
        "thermostat": [mint_unit(session_pki, out, "thermostat") for _ in range(2)],
        "lock": [mint_unit(session_pki, out, "lock")],
    }


@pytest.fixture
def copy_unit(
    _templates: dict[str, list[Path]], tmp_path: Path
) -> Callable[..., Path]:
    """``copy_unit(model, index)``: a private copy of a session-minted unit."""

    def copy(model: str = "thermostat", index: int = 0) -> Path:
        src = _templates[model][index]
        dst = tmp_path / "units" / src.name
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def unit_dir(copy_unit: Callable[..., Path]) -> Path:
    return copy_unit("thermostat", 0)


@pytest.fixture
def lock_dir(copy_unit: Callable[..., Path]) -> Path:
    return copy_unit("lock", 0)
