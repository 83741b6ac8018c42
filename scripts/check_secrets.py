"""Fail if any file that is (or would be) committed contains a secret.

Runs detect-secrets over every tracked or addable file (``git ls-files --cached --others
--exclude-standard``). Findings that are known false positives must be listed, with a
reason, in ``.secrets-allow`` as ``path:line-hash`` entries; there are none today.
Also refuses any PEM private key block anywhere in those files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRIVATE_KEY_MARK = "-----BEGIN " + "PRIVATE KEY-----"


def files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def main() -> int:
    paths = files()
    scan = subprocess.run(
        [sys.executable, "-m", "detect_secrets", "scan", "--all-files", *paths],
        cwd=ROOT, check=True, capture_output=True,
    )
    results = json.loads(scan.stdout)["results"]
    allow_file = ROOT / ".secrets-allow"
    allowed = set(allow_file.read_text().split()) if allow_file.exists() else set()
    findings = [
        f"{path}:{item['line_number']} {item['type']}"
        for path, items in results.items()
        for item in items
        if f"{path}:{item['hashed_secret']}" not in allowed
    ]
    for path in paths:
        try:
            if PRIVATE_KEY_MARK in (ROOT / path).read_text(errors="ignore"):
                findings.append(f"{path}: contains a PEM private key")
        except OSError:
            continue
    if findings:
        print("Secrets found in files that would be committed:", *findings, sep="\n  ")
        return 1
    print(f"    no secrets in {len(paths)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
