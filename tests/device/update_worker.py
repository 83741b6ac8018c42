"""A child process that runs one update step and stops at a named point, so a test can
``kill -9`` it there (the interruption tests in test_slots.py and test_updater.py).

Usage: ``python -m tests.device.update_worker '<json>'`` with keys ``op`` (``install``,
``boot``, ``download``), ``unit``, ``barrier`` (a directory) and ``pause_at`` (a step name).
At that step the worker writes ``barrier/reached`` and waits (bounded) for ``barrier/release``:
the test kills it while it waits. Every step is appended to ``barrier/steps.log``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hearth.device.slots import SlotManager
from hearth.device.updater import UnitUpdater
from hearth.updates.bundle import Delivery
from tests.helpers import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    args = json.loads(sys.argv[1])
    unit = Path(args["unit"])
    barrier = Path(args["barrier"])
    barrier.mkdir(parents=True, exist_ok=True)
    pause_at = args.get("pause_at")

    def on_step(name: str) -> None:
        with (barrier / "steps.log").open("a") as log:
            log.write(name + "\n")
        if name == pause_at:
            (barrier / "reached").write_text(name)
            deadline = time.monotonic() + 60
            while not (barrier / "release").exists():
                if time.monotonic() > deadline:
                    os._exit(3)
                time.sleep(0.01)  # child held at a barrier the test releases (60 s cap)

    op = args["op"]
    if op == "install":
        delivery = Delivery.parse(Path(args["delivery"]).read_bytes())
        slot = SlotManager(unit).install(Path(args["bundle"]), delivery, on_step=on_step)
        print(json.dumps({"slot": slot}))
    elif op == "boot":
        result = SlotManager(unit).boot(on_step=on_step)
        on_step("running")  # the new version runs; its health check has not passed yet
        print(json.dumps({"slot": result.slot, "trial": result.trial}))
    elif op == "download":
        token = args["token"]
        updater = UnitUpdater(unit, metadata_url=args["metadata_url"],
                              target_base_url=args["targets_url"], token=lambda: token)
        offer = updater.check()
        assert offer is not None
        print(json.dumps({"path": str(updater.download(offer, on_step=on_step))}))
    else:
        raise SystemExit(f"unknown op {op!r}")
    return 0


# --- the parent side -------------------------------------------------------------------------
def _worker(tmp: Path, **args: object) -> tuple[subprocess.Popen[bytes], Path]:
    barrier = tmp / f"barrier-{len(list(tmp.glob('barrier-*')))}"
    args["barrier"] = str(barrier)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.device.update_worker", json.dumps(args)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    return proc, barrier


def kill_at(tmp: Path, pause_at: str, **args: object) -> list[str]:
    """Run the worker until it reaches ``pause_at``, then SIGKILL it. Returns its steps."""
    proc, barrier = _worker(tmp, pause_at=pause_at, **args)
    try:
        wait_until(lambda: (barrier / "reached").exists() or proc.poll() is not None,
                   timeout=30, what=f"worker to reach {pause_at}")
        assert (barrier / "reached").exists(), proc.communicate()[1].decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()
    return (barrier / "steps.log").read_text().split()


if __name__ == "__main__":
    sys.exit(main())
