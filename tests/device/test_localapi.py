"""The unit's local API: TLS only, pinned by the owner's app, only the owner's credential
(or, before the claim, the unit's own setup code), throttled, and the only listening
socket of the unit's process."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hearth import protocol
from hearth.device.agent import Agent
from hearth.device.apps import ThermostatApp
from hearth.device.identity import UnitIdentity
from hearth.device.localapi import LocalApiConfig, LocalClient
from hearth.errors import DeviceError
from hearth.factory import mint
from hearth.pki import MakerPKI
from hearth.protocol import new_command_id, to_wire
from tests.helpers import free_port, wait_until

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def minted_unit(tmp_path_factory: pytest.TempPathFactory,
                session_pki: MakerPKI) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("local")
    (u,) = mint(session_pki, model="thermostat", count=1, out=out, labels=False)
    with (out / "labels" / "print-manifest.csv").open() as f:
        code = next(r["setup_code"] for r in csv.DictReader(f))
    return u.directory, code


@pytest.fixture
def unit(minted_unit: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    dst = tmp_path / minted_unit[0].name
    shutil.copytree(minted_unit[0], dst)
    return dst, minted_unit[1]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def agent(unit: tuple[Path, str]) -> Iterator[Agent]:
    a = Agent(UnitIdentity.load(unit[0]), ThermostatApp(target=20.0), mqtt_host="127.0.0.1",
              mqtt_port=free_port(), clock=lambda: NOW, backoff_base=5.0,
              local_api=LocalApiConfig(port=0))
    a.start()
    yield a
    a.stop()


def pin(directory: Path) -> str:
    cert = x509.load_pem_x509_certificate((directory / "device.pem").read_bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def client(agent: Agent, credential: str) -> LocalClient:
    assert agent.local_api is not None
    return LocalClient("127.0.0.1", agent.local_api.port, fingerprint=pin(
        agent.identity.directory), credential=credential)


def bind(agent: Agent) -> str:
    credential = secrets.token_urlsafe(32)
    body = {"v": 1, "command_id": new_command_id(), "device_id": agent.device_id,
            "name": "bind_owner", "params": {"owner": secrets.token_urlsafe(16),
                                             "verifier": protocol.owner_verifier(credential)},
            "issued_at": NOW.isoformat(),
            "expires_at": (NOW + dt.timedelta(minutes=5)).isoformat()}
    result = agent.handle_command(to_wire(body))
    assert result is not None and result.status == "succeeded"
    return credential


def test_before_the_claim_only_the_setup_code_opens_it(agent: Agent,
                                                       unit: tuple[Path, str]) -> None:
    _dir, code = unit
    assert client(agent, "").request("GET", "/v1/status")[0] == 401
    assert client(agent, "00000-00000-0").request("GET", "/v1/status")[0] == 401
    status, body = client(agent, code).request("GET", "/v1/status")
    assert status == 200 and body["claimed"] is False and body["access"] == "setup"
    assert body["device_id"] == agent.device_id and "temperature" in body["readings"]


def test_after_the_claim_only_the_owner_credential_opens_it(
        agent: Agent, unit: tuple[Path, str]) -> None:
    _dir, code = unit
    credential = bind(agent)
    assert client(agent, code).request("GET", "/v1/status")[0] == 401  # the code is closed
    assert client(agent, credential[:-2]).request("GET", "/v1/status")[0] == 401
    status, body = client(agent, credential).request("GET", "/v1/status")
    assert status == 200 and body["access"] == "owner" and body["claimed"] is True
    status, body = client(agent, credential).request(
        "POST", "/v1/commands", {"name": "set_target", "params": {"target": 23.5}})
    assert status == 200 and body["readings"]["target"] == 23.5
    # offline control is the model's commands only: no system command, no bad range
    for cmd in ({"name": "factory_reset", "params": {}},
                {"name": "set_target", "params": {"target": 99}}, {"name": 5}):
        assert client(agent, credential).request("POST", "/v1/commands", cmd)[0] == 400
    # after a factory reset the old credential is dead and the unit's own code works again
    agent.factory_reset()
    assert client(agent, credential).request("GET", "/v1/status")[0] == 401
    assert client(agent, code).request("GET", "/v1/status")[0] == 200


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_plain_http_and_old_tls_get_nothing(agent: Agent) -> None:
    assert agent.local_api is not None
    port = agent.local_api.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: unit\r\n\r\n")
        try:
            data = s.recv(1024)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert b"HTTP/" not in data
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, pytest.raises(
            (ssl.SSLError, ConnectionResetError)):
        ctx.wrap_socket(s).do_handshake()
    wait_until(lambda: agent.local_api and agent.local_api.refused.get("tls_refused", 0) >= 2,
               what="TLS refusals counted")


def test_the_client_refuses_a_unit_whose_certificate_is_not_the_pinned_one(
        agent: Agent, unit: tuple[Path, str]) -> None:
    assert agent.local_api is not None
    impostor = LocalClient("127.0.0.1", agent.local_api.port, fingerprint="0" * 64,
                           credential=unit[1])
    with pytest.raises(DeviceError, match="pinned"):
        impostor.request("GET", "/v1/status")
    assert agent.local_api.refused == {}  # the credential was never sent


def test_setup_code_guessing_is_throttled_and_the_owner_is_not_locked_out(
        unit: tuple[Path, str]) -> None:
    directory, code = unit
    clock = Clock()
    agent = Agent(UnitIdentity.load(directory), ThermostatApp(), mqtt_host="127.0.0.1",
                  mqtt_port=free_port(), clock=lambda: NOW, backoff_base=5.0,
                  local_api=LocalApiConfig(port=0))
    assert agent.local_api is not None
    agent.local_api.guard._clock = clock  # a fake clock: no sleeping
    agent.start()
    try:
        c = client(agent, "K3P9Q-7XW2M-V")
        codes = [c.request("GET", "/v1/status")[0] for _ in range(7)]
        assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]
        assert client(agent, code).request("GET", "/v1/status")[0] == 429  # not even checked
        clock.t += 1.5
        assert client(agent, code).request("GET", "/v1/status")[0] == 200
        # the owner's 256-bit credential is always checked, so guessers cannot lock it out
        credential = bind(agent)
        for _ in range(8):
            c.request("GET", "/v1/status")
        assert client(agent, credential).request("GET", "/v1/status")[0] == 200
    finally:
        agent.stop()


def test_oversized_requests_are_refused(agent: Agent, unit: tuple[Path, str]) -> None:
    status, _ = client(agent, unit[1]).request(
        "POST", "/v1/commands", {"name": "set_target", "params": {"pad": "x" * 5000}})
    assert status == 413


def _listening_ports(pid: int) -> list[int]:
    """TCP ports the process ``pid`` listens on (its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # 0A = LISTEN
                    ports.append(int(local.rsplit(":", 1)[1], 16))
    return sorted(ports)


@pytest.mark.parametrize("with_local_api", [True, False])
def test_the_unit_process_listens_on_the_local_api_port_only(
        unit: tuple[Path, str], with_local_api: bool) -> None:
    directory, code = unit
    port = free_port()
    local = f"LocalApiConfig(host='127.0.0.1', port={port})" if with_local_api else "None"
    script = textwrap.dedent(f"""
        import logging, sys
        from pathlib import Path
        from hearth.device.agent import run_device
        from hearth.device.localapi import LocalApiConfig
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        run_device(Path({str(directory)!r}), telemetry_interval=1, mqtt_host="127.0.0.1",
                   mqtt_port={free_port()}, backoff_base=0.5, backoff_cap=2,
                   local_api={local})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        # "agent started" is logged once the link, app and (if any) local API are up
        line = ""
        assert proc.stderr is not None
        while "agent started" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the unit did not start"
        assert _listening_ports(proc.pid) == ([port] if with_local_api else [])
        if with_local_api:
            status, _ = LocalClient("127.0.0.1", port, fingerprint=pin(directory),
                                    credential=code).request("GET", "/v1/status")
            assert status == 200
            assert _listening_ports(proc.pid) == [port]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_listen_address_parsing() -> None:
    from hearth.device.localapi import parse_listen
    from hearth.errors import ValidationError

    assert parse_listen("off") is None
    assert parse_listen("0.0.0.0:8444") == LocalApiConfig(host="0.0.0.0", port=8444)  # noqa: S104
    assert parse_listen("[::1]:9000") == LocalApiConfig(host="::1", port=9000)
    for bad in ("8444", "host:", "host:99999", ":80"):
        with pytest.raises(ValidationError):
            parse_listen(bad)

