"""A whole Hearth on free loopback ports: PKI, minted units, the service stack."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from hearth.device.agent import Agent
from hearth.device.apps import APPS
from hearth.device.identity import UnitIdentity
from hearth.factory import Endpoint, MintedUnit, load_manifest, mint
from hearth.pki import MakerPKI
from hearth.service import db, fleet
from hearth.service.config import Settings
from hearth.service.runner import Stack
from hearth.updates import bootstrap
from tests.helpers import free_port


@dataclass
class Fleet:
    root: Path
    settings: Settings
    pki: MakerPKI
    stack: Stack
    token: str
    units: list[MintedUnit]
    agents: list[Agent] = field(default_factory=list)

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://127.0.0.1:{self.settings.http_port}/api/v1",
            headers={"Authorization": f"Bearer {self.token}"},
            verify=ssl.create_default_context(
                cafile=str(self.settings.pki_dir / "root" / "ca.pem")), timeout=10,
        )

    def close(self) -> None:
        """Stop the agents started through :meth:`agent`, then the service stack."""
        for a in self.agents:
            a.stop()
        self.stack.stop()

    def agent(self, unit: MintedUnit, **kwargs: object) -> Agent:
        identity = UnitIdentity.load(unit.directory)
        app_options = kwargs.pop("app_options", {})
        agent = Agent(identity, APPS[unit.model](**app_options),  # type: ignore[arg-type]
                      **kwargs)  # type: ignore[arg-type]
        self.agents.append(agent)
        return agent


def make_fleet(root: Path, *, thermostats: int, locks: int) -> Fleet:
    settings = Settings(data_dir=root / "service", http_port=free_port(), mqtt_port=free_port())
    pki = MakerPKI.create(settings.pki_dir)
    updates = bootstrap(settings.data_dir, root / "offline-root-keys")
    endpoint = Endpoint(mqtt_host="127.0.0.1", mqtt_port=settings.mqtt_port,
                        http_url=f"https://127.0.0.1:{settings.http_port}")
    units: list[MintedUnit] = []
    if thermostats:
        units += mint(pki, model="thermostat", count=thermostats, out=root / "units",
                      endpoint=endpoint, labels=False, updates=updates)
    if locks:
        units += mint(pki, model="lock", count=locks, out=root / "units", endpoint=endpoint,
                      labels=False, updates=updates)
    engine = db.make_engine(settings.database_url)
    db.migrate(engine)
    with db.session_factory(engine)() as session:
        fleet.import_manifest(session, load_manifest(root / "units"),
                              device_ca_cert=pki.device_ca.cert)
        session.commit()
    engine.dispose()
    stack = Stack(settings)
    info = stack.start()
    assert info.operator_token
    return Fleet(root, settings, pki, stack, info.operator_token, units)


@contextlib.contextmanager
def running_fleet(root: Path, *, thermostats: int, locks: int) -> Iterator[Fleet]:
    """:func:`make_fleet`, closed (agents and stack stopped) on leaving."""
    f = make_fleet(root, thermostats=thermostats, locks=locks)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def small_fleet(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path, thermostats=5, locks=1) as f:
        yield f
