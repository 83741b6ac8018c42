"""Build the wheel and fail if it carries a private key or any other secret.

Usage: ``python scripts/check_wheel.py [WHEEL]`` (without WHEEL it builds one with
``pip wheel --no-deps`` into a temporary directory). Checks every file in the wheel:

* no PEM private key block and no file type that holds secrets (``*.key``, ``*.secret``,
  ``*.pin``, ``*.p12``/``*.pfx``, SQLite databases, ``.env`` files);
* no Hearth credential (operator API token ``hth_<id>.<secret>``, a setup code next to a
  device id);
* nothing detect-secrets finds (the same scanner, and the same reviewed exceptions in
  ``.secrets-allow``, as ``make secrets`` over the repository).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )?PRIVATE KEY-----")
API_TOKEN = re.compile(rb"hth_[0-9a-f]{16}\.[A-Za-z0-9_-]{43}")
SECRET_SUFFIXES = (".key", ".secret", ".pin", ".p12", ".pfx", ".db", ".sqlite", ".env",
                   ".hash")


def build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = out.glob("hearth-*.whl")
    return wheel


def _allowed() -> set[str]:
    """The repository's reviewed false positives (``.secrets-allow``, ``src/`` paths)."""
    path = ROOT / ".secrets-allow"
    if not path.exists():
        return set()
    return {line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def scan_wheel(wheel: Path) -> list[str]:
    """Problems found in ``wheel`` (empty: clean)."""
    findings: list[str] = []
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        for name in names:
            data = zf.read(name)
            lowered = name.lower()
            if lowered.endswith(SECRET_SUFFIXES) or Path(lowered).name in (".env", "id_rsa"):
                findings.append(f"{name}: a file type that holds secrets")
            if PRIVATE_KEY.search(data):
                findings.append(f"{name}: contains a PEM private key")
            if API_TOKEN.search(data):
                findings.append(f"{name}: contains an operator API token")
        zf.extractall(tmp)  # noqa: S202 - our own freshly built wheel
        paths = [str(Path(tmp) / n) for n in names]
        scan = subprocess.run([sys.executable, "-m", "detect_secrets", "scan", "--all-files",
                               *paths], check=True, capture_output=True, cwd=tmp)
        allowed = _allowed()
        for path, items in json.loads(scan.stdout)["results"].items():
            rel = Path(path).relative_to(tmp) if Path(path).is_absolute() else Path(path)
            findings.extend(f"{rel}:{i['line_number']} {i['type']}" for i in items
                            if f"src/{rel}:{i['hashed_secret']}" not in allowed)
    return findings


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(argv[0]) if argv else build_wheel(Path(tmp))
        findings = scan_wheel(wheel)
        if findings:
            print(f"Secrets in {wheel.name}:", *findings, sep="\n  ")
            return 1
        print(f"    no secrets in {wheel.name}")
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
