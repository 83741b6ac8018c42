"""Whole journeys through real parts: mint, import, connect, telemetry, commands."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from hearth.service.models import TelemetryRow
from tests.e2e.conftest import Fleet
from tests.helpers import plain_mqtt_connect, wait_until


def test_mint_import_connect_store_command(small_fleet: Fleet) -> None:
    f = small_fleet
    agents = [f.agent(u, telemetry_interval=0.2, backoff_base=0.1, backoff_cap=1.0)
              for u in f.units]
    for a in agents:
        a.start()
    wait_until(lambda: all(a.connected for a in agents), timeout=30, what="units connected")
    with f.api() as api:
        def latest(device_id: str) -> int:
            items = api.get(f"/units/{device_id}/telemetry", params={"limit": 1}).json()["items"]
            return int(items[0]["seq"]) if items else -1

        wait_until(lambda: all(latest(a.device_id) >= 2 for a in agents), timeout=30,
                   what="telemetry stored for every unit")
        thermostat = next(a for a in agents if a.identity.model.name == "thermostat")
        lock = next(a for a in agents if a.identity.model.name == "lock")
        r = api.post(f"/units/{thermostat.device_id}/commands",
                     json={"name": "set_target", "params": {"target": 24.5}})
        assert r.status_code == 202, r.text
        cmd_id = r.json()["command_id"]
        r2 = api.post(f"/units/{lock.device_id}/commands", json={"name": "unlock"})
        assert r2.status_code == 202, r2.text

        def done(cid: str) -> dict[str, object] | None:
            body: dict[str, object] = api.get(f"/commands/{cid}").json()
            return body if body["status"] not in ("pending", "sent") else None

        result = wait_until(lambda: done(cmd_id), timeout=30, what="command result")
        assert result["status"] == "succeeded"
        assert result["result"]["state"]["target"] == 24.5  # type: ignore[index]
        assert thermostat.app.readings()["target"] == 24.5
        assert wait_until(lambda: done(r2.json()["command_id"]), timeout=30)["status"] == (
            "succeeded")
        assert lock.app.readings()["lock"] == "unlocked"
        # the new target reaches the stored state through telemetry
        wait_until(lambda: api.get(f"/units/{thermostat.device_id}/state").json()["state"]
                   .get("target") == 24.5, timeout=30, what="state reflects the command")
        # refused before it reaches the unit
        bad = api.post(f"/units/{thermostat.device_id}/commands",
                       json={"name": "set_target", "params": {"target": 36}})
        assert bad.status_code == 422 and bad.json()["error"] == "out_of_range"
    # nothing was quarantined in the normal journey
    with f.api() as api:
        by_reason = api.get("/quarantine/counts").json()["by_reason"]
        assert by_reason["accepted"] >= 3 * len(agents)
        assert {k for k in by_reason if k not in ("accepted", "duplicate")} == set()

    # "accepted" also counts events and command results; telemetry rows keep arriving
    def telemetry_rows() -> int:
        with f.stack.session_factory() as s:
            return s.query(TelemetryRow).count()

    wait_until(lambda: telemetry_rows() >= 3 * len(agents), timeout=30,
               what="telemetry rows for every unit")


def test_connections_the_broker_refuses_are_counted_for_the_operator(
    small_fleet: Fleet,
) -> None:
    """`hearth up` reads the broker's log as it runs: a plain-TCP client and a TLS client
    without a certificate show up in /security/broker-refusals, by reason."""
    port = small_fleet.settings.mqtt_port
    plain_mqtt_connect("127.0.0.1", port)
    ctx = ssl.create_default_context(cafile=str(small_fleet.settings.pki_dir / "root" /
                                                "ca.pem"))
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            contextlib.suppress(ssl.SSLError, OSError), \
            ctx.wrap_socket(raw) as tls:
        tls.recv(1)
    with small_fleet.api() as api:
        def counts() -> dict[str, int] | None:
            body = api.get("/security/broker-refusals").json()
            got = {r["reason"]: r["count"] for r in body["by_reason"] if r["count"]}
            return got if {"not_tls", "no_certificate"} <= set(got) else None

        got = wait_until(counts, timeout=30, what="the refusals in the operator API")
    assert got == {"not_tls": 1, "no_certificate": 1}


def test_hearth_demo_json_exits_zero_with_a_summary(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hearth.cli", "demo", "--json", "--duration", "5",
         "--data-dir", str(tmp_path / "demo")],
        capture_output=True, timeout=240, check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    summary = json.loads(out.stdout)
    assert summary["ok"] is True
    assert len(summary["units"]) == 6
    assert sorted(u["model"] for u in summary["units"]) == ["lock"] + ["thermostat"] * 5
    assert summary["telemetry_stored"] >= 6
    assert summary["commands_sent"] == summary["commands_completed"] == 2
    assert set(summary["rejected_by_reason"]) == {
        "malformed_json", "out_of_range", "unknown_field", "replayed_sequence"}


def test_hearth_up_prints_token_once_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    from tests.helpers import free_port

    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "hearth.cli", "up", "--data-dir", str(data),
           "--http-port", str(free_port()), "--mqtt-port", str(free_port())]

    def run_once() -> tuple[str, str]:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        err = b""
        while b"Press Ctrl-C" not in err:
            line = proc.stderr.readline()
            assert line, f"hearth up exited early: {err.decode()[-2000:]}"
            err += line
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=60)
        assert proc.returncode == 0, (err + rest).decode()[-2000:]
        return stdout.decode(), (err + rest).decode()

    first_out, first_err = run_once()
    assert "shown once" in first_err
    token = first_out.strip()
    assert token.startswith("hth_") and len(token) > 40
    second_out, second_err = run_once()
    assert "shown once" not in second_err and second_out.strip() == ""
    # the broker child is gone, and no secret went into the logs
    pid_file = data / "broker" / "mosquitto.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        if pid:
            try:
                os.kill(pid, 0)
                raise AssertionError("mosquitto still running after Ctrl-C")
            except ProcessLookupError:
                pass
    for log in data.rglob("*.log"):
        assert token not in log.read_text(errors="ignore")
