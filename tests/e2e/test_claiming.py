"""Claiming, owner binding and factory reset through real parts: the HTTPS service, the
broker, ingest and a running unit with its local API.

A consumer claims a unit with the code from the factory's print manifest; the unit learns
its owner over MQTT and opens its local API to the owner's credential only. A reset - from
the owner's app or on the unit itself - ends the binding: the old owner has no access
through the API or the local API, and only the unit's own setup code claims it again."""

from __future__ import annotations

import csv
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hearth.cli import main
from hearth.device.agent import Agent
from hearth.device.localapi import LocalApiConfig, LocalClient
from hearth.setupcode import new_setup_code
from tests.e2e.conftest import Fleet, running_fleet
from tests.helpers import wait_until

PASSWORD = "a long and unusual passphrase"  # pragma: allowlist secret


@pytest.fixture
def one_unit(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path, thermostats=1, locks=0) as f:
        yield f


def codes(f: Fleet) -> dict[str, str]:
    with (f.root / "units" / "labels" / "print-manifest.csv").open() as fh:
        return {r["device_id"]: r["setup_code"] for r in csv.DictReader(fh)}


def account_api(f: Fleet, email: str) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(f.settings.pki_dir / "root" / "ca.pem"))
    base = f"https://localhost:{f.settings.http_port}/api/v1/account"
    c = httpx.Client(base_url=base, verify=ctx, timeout=10)
    assert c.post("/accounts", json={"email": email, "password": PASSWORD}).status_code == 201
    token = c.post("/sessions", json={"email": email, "password": PASSWORD}).json()["token"]
    c.headers["Authorization"] = f"Bearer {token}"
    return c


def start_unit(f: Fleet) -> Agent:
    agent = f.agent(f.units[0], telemetry_interval=0.2, backoff_base=0.1, backoff_cap=1.0,
                    local_api=LocalApiConfig(port=0))
    agent.start()
    wait_until(lambda: agent.connected, timeout=30, what="the unit to connect")
    return agent


def local(agent: Agent, fingerprint: str, credential: str) -> int:
    assert agent.local_api is not None
    status, _ = LocalClient("127.0.0.1", agent.local_api.port, fingerprint=fingerprint,
                            credential=credential).request("GET", "/v1/status")
    return status


def unit_json(c: httpx.Client, device_id: str) -> Any:
    return c.get(f"/units/{device_id}")


def test_claim_bind_and_owner_reset_through_real_parts(one_unit: Fleet) -> None:
    f = one_unit
    dev = f.units[0].device_id
    code = codes(f)[dev]
    agent = start_unit(f)
    alice = account_api(f, "alice@example.org")
    claimed = alice.post("/units", json={"device_id": dev[:8], "setup_code": code})
    assert claimed.status_code == 201, claimed.text
    credential = claimed.json()["local_credential"]
    pin = claimed.json()["certificate_sha256"]
    # the unit learns its owner over its link; the service sees it confirmed
    wait_until(lambda: agent.owner.binding() is not None, timeout=30, what="bind_owner")
    wait_until(lambda: unit_json(alice, dev).json()["bound"], timeout=30, what="bound")
    assert local(agent, pin, credential) == 200
    assert local(agent, pin, code) == 401  # the setup code no longer opens the unit
    # the owner's command goes through the command service to the unit
    sent = alice.post(f"/units/{dev}/commands", json={"name": "set_target",
                                                      "params": {"target": 26.0}})
    assert sent.status_code == 202
    wait_until(lambda: agent.app.readings()["target"] == 26.0, timeout=30, what="command")
    # someone else cannot take it, with or without the code
    bob = account_api(f, "bob@example.org")
    assert bob.post("/units", json={"device_id": dev, "setup_code": code}).status_code == 409
    assert unit_json(bob, dev).status_code == 404
    # factory reset from the owner's app: the binding ends at once, the unit erases
    assert alice.post(f"/units/{dev}/reset").status_code == 200
    assert unit_json(alice, dev).status_code == 404
    wait_until(lambda: agent.owner.binding() is None, timeout=30, what="the unit reset")
    wait_until(lambda: agent.app.readings()["target"] == 20.0, timeout=10)
    assert local(agent, pin, credential) == 401
    for universal in ("admin", "password", "0000", "00000-00000-0", new_setup_code()):
        assert local(agent, pin, universal) in (401, 429)  # 429: guessing is throttled
        assert bob.post("/units", json={"device_id": dev, "setup_code": universal}
                        ).status_code in (400, 429)
    # only its own setup code opens and claims it again (once the short backoff is over)
    wait_until(lambda: local(agent, pin, code) == 200, timeout=30, what="setup code works")
    again = bob.post("/units", json={"device_id": dev, "setup_code": code})
    assert again.status_code == 201, again.text
    assert unit_json(alice, dev).status_code == 404


def test_a_reset_on_the_unit_itself_ends_the_owners_access(one_unit: Fleet) -> None:
    f = one_unit
    dev = f.units[0].device_id
    code = codes(f)[dev]
    agent = start_unit(f)
    alice = account_api(f, "alice@example.org")
    claimed = alice.post("/units", json={"device_id": dev, "setup_code": code})
    assert claimed.status_code == 201
    wait_until(lambda: unit_json(alice, dev).json()["bound"], timeout=30, what="bound")
    agent.stop()
    f.agents.remove(agent)
    # someone presses reset on the unit (here: hearth device reset --dir)
    assert main(["device", "reset", "--dir", str(f.units[0].directory)]) == 0
    agent = start_unit(f)
    wait_until(lambda: unit_json(alice, dev).status_code == 404, timeout=30,
               what="the service to end the binding the unit reported erased")
    bob = account_api(f, "bob@example.org")
    assert bob.post("/units", json={"device_id": dev, "setup_code": code}).status_code == 201
    wait_until(lambda: agent.owner.binding() is not None, timeout=30, what="new binding")
