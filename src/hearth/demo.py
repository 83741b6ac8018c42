"""``hearth demo``: a whole fleet working on the embedded default, start to finish.

Steps (each printed as it happens):

1. create a maker PKI and mint 5 thermostats and 1 lock (own identity each);
2. import the batch into the service registry;
3. start the service (:class:`hearth.service.runner.Stack`: supervised Mosquitto with
   mutual TLS, ingest, HTTPS API) on free loopback ports;
4. run the six units (device agents with their simulated hardware);
5. send commands through the HTTPS API with the operator token (one valid command per
   model, and one the API refuses as out of range);
6. let one thermostat's "buggy firmware" publish bad messages on its own topics -
   malformed JSON, an out-of-range reading, an unknown field and a replayed sequence
   number - which ingest quarantines with a reason (an oversize message is refused by
   the unit's own outbox before it reaches the network);
7. print what was stored, what was rejected and why, and the commands' outcomes.

The summary is also available as JSON (``--json``). Exit status 0 means every unit's
telemetry was stored, every valid command completed and every bad message was refused.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hearth import protocol
from hearth.device.agent import Agent
from hearth.device.apps import APPS
from hearth.device.identity import UnitIdentity
from hearth.errors import HearthError
from hearth.factory import load_manifest, mint
from hearth.pki import MakerPKI
from hearth.service import db, fleet
from hearth.service.config import Settings
from hearth.service.runner import Stack

__all__ = ["DemoSummary", "run_demo"]

Say = Callable[[str], None]


@dataclass
class DemoSummary:
    ok: bool = False
    duration_s: float = 0.0
    units: list[dict[str, Any]] = field(default_factory=list)
    telemetry_stored: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    refused_on_device: list[str] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        sent = [c for c in self.commands if c.get("accepted")]
        return {
            "ok": self.ok,
            "duration_s": round(self.duration_s, 1),
            "units": self.units,
            "telemetry_stored": self.telemetry_stored,
            "rejected_by_reason": self.rejected,
            "refused_on_device": self.refused_on_device,
            "commands_sent": len(sent),
            "commands_completed": sum(1 for c in sent if c.get("status") == "succeeded"),
            "commands": self.commands,
            "problems": self.problems,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise HearthError(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


BAD_MESSAGES = ("malformed_json", "out_of_range", "unknown_field", "replayed_sequence")


def _inject_bad_messages(agent: Agent, stored_seq: int) -> list[str]:
    """Simulate buggy firmware: bad payloads on the unit's own topic, sent over its real
    link (so they pass the broker's ACL and reach ingest, which must refuse them).

    Returns what the unit itself refused to send (its outbox enforces the size limit)."""
    topic = protocol.device_topic(agent.device_id, "telemetry")
    now = dt.datetime.now(dt.UTC).isoformat()

    def msg(seq: int, readings: dict[str, Any], **extra: Any) -> bytes:
        body = {"v": 1, "device_id": agent.device_id, "seq": seq, "ts": now,
                "readings": readings, **extra}
        return json.dumps(body).encode()

    payloads: list[Callable[[int], bytes]] = [
        lambda seq: msg(seq, {"temperature": 21.0})[:-7],  # truncated JSON
        lambda seq: msg(seq, {"temperature": 150.0}),  # hotter than the sensor can read
        lambda seq: msg(seq, {"temperature": 21.0}, firmware_debug="x"),
        lambda seq: msg(stored_seq, {"temperature": 5.5}),  # seq already stored, new content
    ]
    for build in payloads:
        agent.outbox.put("telemetry", topic, build)
    refused = []
    try:  # over 16 KiB: the unit's own outbox refuses it before it reaches the network
        agent.outbox.put("telemetry", topic, lambda seq: msg(seq, {}, pad="x" * 17_000))
    except HearthError as e:
        refused.append(f"payload_too_large ({e})")
    agent.link.notify()
    return refused


def run_demo(
    *,
    duration: float = 60.0,
    data_dir: Path | None = None,
    say: Say = print,
    telemetry_interval: float = 1.0,
) -> DemoSummary:
    """Run the demo; returns its summary (``ok`` tells whether everything held)."""
    started = time.monotonic()
    summary = DemoSummary()
    keep = data_dir is not None
    root = data_dir or Path(tempfile.mkdtemp(prefix="hearth-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    http_port, mqtt_port = _free_port(), _free_port()
    settings = Settings(data_dir=root / "service", http_port=http_port, mqtt_port=mqtt_port)
    agents: list[Agent] = []
    stack: Stack | None = None
    try:
        say(f"1. Creating a maker PKI and minting 5 thermostats and 1 lock in {root}")
        pki = MakerPKI.load_or_create(settings.pki_dir)
        from hearth.factory import Endpoint

        endpoint = Endpoint(mqtt_host="127.0.0.1", mqtt_port=mqtt_port,
                            http_url=f"https://127.0.0.1:{http_port}")
        # Signed software: offline root keys (outside the service data), the update
        # repository and release 1.0.0 of each model, installed into every unit's slot A.
        from hearth.updates import bootstrap

        updates = bootstrap(settings.data_dir, root / "offline-root-keys")
        units = mint(pki, model="thermostat", count=5, out=root / "units", endpoint=endpoint,
                     updates=updates)
        units += mint(pki, model="lock", count=1, out=root / "units", endpoint=endpoint,
                      updates=updates)
        for u in units:
            say(f"   {u.model:<10} {u.device_id}")

        say("2. Importing the batch into the service registry (certificates and hashes only)")
        engine = db.make_engine(settings.database_url)
        db.migrate(engine)
        with db.session_factory(engine)() as session:
            result = fleet.import_manifest(session, load_manifest(root / "units"),
                                           device_ca_cert=pki.device_ca.cert)
            session.commit()
        engine.dispose()
        say(f"   imported {result.imported} units")

        say(f"3. Starting the service: Mosquitto (mTLS) on 127.0.0.1:{mqtt_port}, "
            f"HTTPS API on 127.0.0.1:{http_port}, ingest")
        stack = Stack(settings)
        info = stack.start()
        token = info.operator_token
        if token is None:
            raise HearthError("demo: the service did not issue an operator token")
        say("   operator API token created (shown once by `hearth up`; the demo keeps it)")

        say("4. Starting the six units (thermostats regulate; the lock runs its bolt)")
        for u in units:
            identity = UnitIdentity.load(u.directory)
            agent = Agent(identity, APPS[u.model](), telemetry_interval=telemetry_interval,
                          backoff_base=0.2, backoff_cap=2.0)
            agent.start()
            agents.append(agent)
        _wait(lambda: all(a.connected for a in agents), 30, "all units to connect")
        say("   all six units connected over mutual TLS")

        api = httpx.Client(base_url=info.api_url + "/api/v1",
                           headers={"Authorization": f"Bearer {token}"},
                           verify=ssl.create_default_context(
                               cafile=str(settings.pki_dir / "root" / "ca.pem")), timeout=10)
        with api:
            def stored(device_id: str) -> int:
                r = api.get(f"/units/{device_id}/telemetry", params={"limit": 1})
                items = r.json().get("items", []) if r.status_code == 200 else []
                return int(items[0]["seq"]) if items else -1

            _wait(lambda: all(stored(a.device_id) >= 0 for a in agents), 30,
                  "telemetry from every unit")
            say("   telemetry from every unit is being stored")

            say("5. Sending commands through the HTTPS API")
            thermostat = next(a for a in agents if a.identity.model.name == "thermostat")
            lock = next(a for a in agents if a.identity.model.name == "lock")
            requests = [
                (thermostat, "set_target", {"target": 23.5}),
                (lock, "lock", {}),
                (thermostat, "set_target", {"target": 99.0}),  # out of range: refused
            ]
            for agent, name, params in requests:
                r = api.post(f"/units/{agent.device_id}/commands",
                             json={"name": name, "params": params})
                entry: dict[str, Any] = {"device_id": agent.device_id, "name": name,
                                         "params": params, "accepted": r.status_code == 202}
                if r.status_code == 202:
                    entry["command_id"] = r.json()["command_id"]
                    say(f"   {name}{params or ''} -> {agent.identity.model.name} "
                        f"{agent.device_id[:8]}: accepted")
                else:
                    entry["refused"] = r.json().get("error")
                    say(f"   {name}{params} -> refused by the API "
                        f"({r.status_code} {entry['refused']}: {r.json().get('detail')})")
                summary.commands.append(entry)

            say("6. A thermostat with buggy firmware sends bad messages on its own topic")
            summary.refused_on_device = _inject_bad_messages(
                thermostat, stored(thermostat.device_id))
            for text in summary.refused_on_device:
                say(f"   refused by the unit itself: {text}")

            def commands_done() -> bool:
                for c in summary.commands:
                    if c.get("accepted"):
                        c["status"] = api.get(f"/commands/{c['command_id']}").json()["status"]
                return all(c.get("status") not in ("pending", "sent")
                           for c in summary.commands if c.get("accepted"))

            _wait(commands_done, 30, "command results")
            for c in summary.commands:
                if c.get("accepted"):
                    say(f"   command {c['name']} on {c['device_id'][:8]}: {c['status']}")

            remaining = duration - (time.monotonic() - started)
            if remaining > 0:
                say(f"   running the fleet for another {remaining:.0f} s ...")
                end = time.monotonic() + remaining
                while time.monotonic() < end:
                    time.sleep(min(1.0, end - time.monotonic()))

            def counts() -> dict[str, int]:
                body = api.get("/quarantine/counts").json()
                return {k: v for k, v in body.get("by_reason", {}).items() if k in BAD_MESSAGES}

            _wait(lambda: len(counts()) == len(BAD_MESSAGES), 30, "bad messages to be refused")
            summary.rejected = dict(sorted(counts().items()))
            for a in agents:
                state = api.get(f"/units/{a.device_id}/state").json()
                page = api.get(f"/units/{a.device_id}/telemetry", params={"limit": 1000}).json()
                n = len(page.get("items", []))
                summary.units.append({
                    "device_id": a.device_id, "model": a.identity.model.name,
                    "telemetry_stored": n, "latest_state": state.get("state", {}),
                })
            summary.telemetry_stored = sum(u["telemetry_stored"] for u in summary.units)
        _check(summary)
    finally:
        for a in agents:
            a.stop()
        if stack is not None:
            stack.stop()
        summary.duration_s = time.monotonic() - started
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return summary


def _check(summary: DemoSummary) -> None:
    problems = summary.problems
    for u in summary.units:
        if u["telemetry_stored"] == 0:
            problems.append(f"no telemetry stored for {u['device_id']}")
    for c in summary.commands:
        valid = c["params"].get("target", 20) <= 35
        if valid and c.get("status") != "succeeded":
            problems.append(f"command {c['name']} did not succeed: {c.get('status')}")
        if not valid and c.get("accepted"):
            problems.append("an out-of-range command was accepted")
    for reason in BAD_MESSAGES:
        if summary.rejected.get(reason, 0) < 1:
            problems.append(f"bad message {reason} was not refused")
    if not summary.refused_on_device:
        problems.append("the unit sent an oversize message")
    summary.ok = not problems


def print_summary(summary: DemoSummary, say: Say = print) -> None:
    say("7. Summary")
    say(f"   {'unit':<34} {'model':<11} {'stored':>6}  latest state")
    for u in summary.units:
        state = ", ".join(f"{k}={v}" for k, v in sorted(u["latest_state"].items()))
        say(f"   {u['device_id']:<34} {u['model']:<11} {u['telemetry_stored']:>6}  {state}")
    say(f"   telemetry stored: {summary.telemetry_stored} messages")
    say("   rejected by ingest, by reason: "
        + ", ".join(f"{k}={v}" for k, v in summary.rejected.items()))
    doc = summary.to_json()
    say(f"   commands sent: {doc['commands_sent']}, completed: {doc['commands_completed']}, "
        f"refused by the API: {sum(1 for c in summary.commands if not c.get('accepted'))}")
    if summary.ok:
        say(f"Demo finished in {summary.duration_s:.0f} s: everything held.")
    else:
        say("Demo found problems:\n   " + "\n   ".join(summary.problems))
