"""A rollout to 1,000 units: the real HTTPS service serving the TUF repository with tokens.

What it measures
    The whole service runs as ``hearth up`` would (:class:`hearth.service.runner.Stack`:
    Mosquitto, ingest, the HTTPS listener with the update routes). N simulated units (default
    1,000 thermostats) have their own flash each - the update trust anchor and the factory
    image 1.0.0 in slot A, provisioned as ``factory.mint`` does - and are registered in the
    service's registry. A release 1.1.0 (the reference app plus ``--bundle-kb`` of firmware
    data) is published and a 100 % rollout started through the operator API. Then every
    unit takes the update the way the unit runtime does, minus MQTT:

    1. its update check is answered by :meth:`UpdateService.handle_check` (the code the MQTT
       responder runs: the unit is active, in the cohort, allowed now; a token is issued);
    2. :class:`hearth.device.updater.UnitUpdater` (python-tuf ngclient) refreshes the
       metadata and downloads the bundle over HTTPS with the token, verifies it, installs it
       into slot B; the slot is booted (verified again) and committed;
    3. the unit checks in again with the new version (what it does after the switch), so the
       service records it and the rollout completes.

    The units run as ``--client-processes`` processes of ``--concurrency`` threads each
    (1,000 MQTT agents are not needed to measure this: the MQTT side is one small message
    each way per unit).

How to read the output
    ``time until all updated`` runs from the rollout's start to the last unit committed.
    ``bytes served`` is what the update routes sent (metadata and bundles). Per unit, the
    time spent waiting on the network (metadata + bundle) is printed next to the updater's
    own verification work (TUF metadata signatures, the bundle hash, the slot install with
    every file verified, the boot-time verification of the new slot), measured in the same
    run with the same clock; their ratio says whether verification or transfer dominates.
    All processes share the machine (see the load average): on 2 cores the clients and
    the service compete for the same CPUs.

Example::

    .venv/bin/python bench/rollout.py --units 1000 --concurrency 16 --client-processes 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import secrets
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from _common import BenchTimeout, free_port, machine_load, say, temp_root, watchdog

from hearth.device.slots import SlotManager, provision_factory_image
from hearth.device.updater import HttpsFetcher, UnitUpdater, install_trusted_root
from hearth.factory import dynsec_password_hash
from hearth.pki import MakerPKI
from hearth.protocol import UpdateCheck
from hearth.service import db
from hearth.service.config import Settings
from hearth.service.models import Unit
from hearth.service.runner import Stack
from hearth.updates import bootstrap
from hearth.updates.bundle import build_bundle
from hearth.updates.reference import write_reference_app


class TimedFetcher(HttpsFetcher):
    """The unit's HTTPS fetcher, counting the seconds spent waiting on the network."""

    net = 0.0

    def _send(self, url: str, headers: dict[str, str]) -> httpx.Response:
        t = time.perf_counter()
        try:
            return super()._send(url, headers)
        finally:
            self.net += time.perf_counter() - t

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        it = super()._chunks(response)
        while True:
            t = time.perf_counter()
            try:
                chunk = next(it)
            except StopIteration:
                self.net += time.perf_counter() - t
                return
            self.net += time.perf_counter() - t
            yield chunk


def _update_one(job: tuple[str, str, str], base: str, ca_file: str) -> dict[str, float]:
    unit_dir, token, target = job
    fetcher = TimedFetcher(ca_file=Path(ca_file), token=lambda: token, token_origins=(base,))
    slots = SlotManager(Path(unit_dir), model="thermostat")
    updater = UnitUpdater(Path(unit_dir), metadata_url=f"{base}/updates/metadata/",
                          target_base_url=f"{base}/updates/targets/", fetcher=fetcher,
                          slots=slots)
    try:
        t0 = time.perf_counter()
        offer = updater.check(target)
        assert offer is not None
        t1 = time.perf_counter()
        meta_net, fetcher.net = fetcher.net, 0.0
        bundle = updater.download(offer)
        t2 = time.perf_counter()
        bundle_net = fetcher.net
        updater.install(offer, bundle)
        t3 = time.perf_counter()
        boot = slots.boot()
        assert boot.trial and boot.version == "1.1.0", boot
        t4 = time.perf_counter()
        slots.commit()
    finally:
        fetcher.close()
    return {
        "meta_net": meta_net, "meta_verify": (t1 - t0) - meta_net,
        "bundle_net": bundle_net, "bundle_verify": (t2 - t1) - bundle_net,
        "install": t3 - t2, "boot_verify": t4 - t3, "total": time.perf_counter() - t0,
    }


def _client(jobs: list[tuple[str, str, str]], base: str, ca_file: str,
            concurrency: int) -> list[dict[str, float]]:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda j: _update_one(j, base, ca_file), jobs))


def _provision(args: tuple[Path, bytes, Path, Any]) -> None:
    unit_dir, root, bundle, delivery = args
    unit_dir.mkdir(parents=True)
    (unit_dir / "unit.json").write_text('{"format": 1, "model": "thermostat"}')
    install_trusted_root(unit_dir, root)
    provision_factory_image(unit_dir, bundle, delivery)


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return f"median {statistics.median(values) * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms"


def run(args: argparse.Namespace, root: Path) -> int:
    settings = Settings(data_dir=root / "service", http_port=free_port(),
                        mqtt_port=free_port())
    MakerPKI.create(settings.pki_dir)  # the service's CAs (HTTPS certificate)
    repo = bootstrap(settings.data_dir, root / "offline-root-keys", models=("thermostat",))
    factory = repo.latest("thermostat")
    assert factory is not None
    say(f"provisioning {args.units} units (trust anchor + factory image 1.0.0 in slot A)")
    units_dir = root / "units"
    ids = [secrets.token_hex(16) for _ in range(args.units)]
    trusted, bundle = repo.trusted_root(), repo.target_file(factory.target_name)
    delivery = repo.delivery(factory.target_name)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(_provision, [(units_dir / i, trusted, bundle, delivery) for i in ids]))
    engine = db.make_engine(settings.database_url)
    db.migrate(engine)
    now = dt.datetime.now(dt.UTC)
    with db.session_factory(engine).begin() as s:
        for i in ids:
            s.add(Unit(device_id=i, model="thermostat", certificate_pem="-", cert_serial="1",
                       mqtt_password_hash=dynsec_password_hash(secrets.token_urlsafe(16)),
                       status="active", imported_at=now, revoked_at=None, last_seen_at=None,
                       latest_seq=None, latest_ts=None, latest_state={}))
    engine.dispose()

    src = write_reference_app("thermostat", root / "src", version="1.1.0")
    (src / "firmware.bin").write_bytes(os.urandom(args.bundle_kb * 1024))
    release_file = root / "thermostat-1.1.0.tar"
    build_bundle(src, model="thermostat", version="1.1.0", min_from_version="1.0.0",
                 out=release_file)
    release = repo.publish(release_file, model="thermostat", version="1.1.0",
                           min_from_version="1.0.0")
    say(f"published {release.target_name}: {release.length / 1024:.0f} KiB")

    stack = Stack(settings)
    try:
        info = stack.start()
        updates = stack.updates
        assert updates is not None and info.operator_token
        base = f"https://localhost:{settings.http_port}"
        ca_file = str(settings.pki_dir / "root" / "ca.pem")
        api = httpx.Client(base_url=base + "/api/v1", verify=ca_file, timeout=30,
                           headers={"Authorization": f"Bearer {info.operator_token}"})
        say(f"service up ({machine_load()})")
        started = time.monotonic()
        r = api.post("/rollouts", json={"target_name": release.target_name, "stages": [100],
                                        "min_sample": 50})
        r.raise_for_status()
        rollout_id = r.json()["id"]

        def check(device_id: str, version: str) -> Any:
            return updates.handle_check(UpdateCheck(
                device_id=device_id, request_id=secrets.token_hex(16),
                ts=dt.datetime.now(dt.UTC), version=version, running=version))

        jobs: list[tuple[str, str, str]] = []
        for i in ids:
            offer = check(i, "1.0.0")
            assert offer.target == release.target_name and offer.token, offer
            jobs.append((str(units_dir / i), offer.token, offer.target))
        offers_done = time.monotonic()
        say(f"{len(jobs)} update checks answered (token + assigned release) in "
            f"{offers_done - started:.1f} s; units now update "
            f"({args.client_processes} processes x {args.concurrency} threads)")
        served_before = updates.stats.bytes
        parts = [jobs[k::args.client_processes] for k in range(args.client_processes)]
        ctx = mp.get_context("spawn")
        results: list[dict[str, float]] = []
        with ProcessPoolExecutor(max_workers=args.client_processes, mp_context=ctx) as pool:
            futures = [pool.submit(_client, part, base, ca_file, args.concurrency)
                       for part in parts if part]
            for fut in futures:
                results += fut.result()
        all_updated = time.monotonic() - started
        for i in ids:  # each unit checks in with its new version (after the switch)
            check(i, "1.1.0")
        progress = api.get(f"/rollouts/{rollout_id}").json()
        served = updates.stats
        print()
        print(f"units                    {len(results)} of {args.units} updated 1.0.0 -> 1.1.0 "
              f"(bundle {release.length / 1024:.0f} KiB)")
        print(f"time until all updated   {all_updated:.1f} s "
              f"({len(results) / all_updated:.1f} units/s; update checks "
              f"{offers_done - started:.1f} s of it)")
        print(f"bytes served             {served.bytes - served_before:,} "
              f"(metadata {served.by_kind.get('metadata', 0):,}, bundles "
              f"{served.by_kind.get('targets', 0):,}; "
              f"{(served.bytes - served_before) / max(1, len(results)) / 1024:.1f} KiB/unit); "
              f"{served.requests} files sent, {served.not_found} not found (ngclient looks for "
              f"the next root), {served.refused} refused")
        print(f"rollout                  {progress['status']} "
              f"({progress['units_updated']} of {progress['units']} units on 1.1.0)")
        print("per unit (same run, same clock):")
        net = [r["meta_net"] + r["bundle_net"] for r in results]
        verify = [r["meta_verify"] + r["bundle_verify"] + r["install"] + r["boot_verify"]
                  for r in results]
        for label, key in (("  network: metadata", "meta_net"),
                           ("  network: bundle  ", "bundle_net"),
                           ("  verify: TUF metadata", "meta_verify"),
                           ("  verify: bundle hash + write", "bundle_verify"),
                           ("  verify: slot install", "install"),
                           ("  verify: boot check", "boot_verify")):
            print(f"{label:<30} {_ms([r[key] for r in results])}")
        print(f"{'  download (network) total':<30} {_ms(net)}")
        print(f"{'  verification total':<30} {_ms(verify)}")
        ratio = statistics.median(verify) / max(1e-9, statistics.median(net))
        print(f"verification / download  {ratio:.2f} (median per unit)")
        print(f"machine                  {machine_load()}")
        ok = len(results) == args.units and progress["status"] == "completed"
        print("result                   " + ("ok" if ok else "NOT all units updated"))
        return 0 if ok else 1
    finally:
        stack.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16, help="threads per client process")
    p.add_argument("--client-processes", type=int, default=2)
    p.add_argument("--bundle-kb", type=int, default=256, help="firmware data in the bundle")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    if not 1 <= args.units <= 100_000 or not 1 <= args.concurrency <= 256:
        p.error("units 1..100000, concurrency 1..256")
    try:
        with watchdog(args.timeout), temp_root("hearth-rollout-", keep=args.keep) as root:
            return run(args, root)
    except BenchTimeout as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
