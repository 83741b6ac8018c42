"""Hearth's own Mosquitto plugin: a unit's certificate identity is its MQTT username.

The plugin (``mosquitto_identity.c``, next to this module) refuses a CONNECT unless the
client certificate's only subject commonName equals the username; when they match it
defers to the dynamic-security plugin, which checks the password and binds the client id
(ADR 0001). Mosquitto has no option for this that keeps plugin authentication.

The plugin is compiled once per source version with the system C compiler and cached in
``$HEARTH_CACHE_DIR`` (default ``$XDG_CACHE_HOME/hearth`` or ``~/.cache/hearth``), in a
directory only the current user may write: a library planted there would run inside the
broker. ``make setup`` builds it; ``HEARTH_MOSQUITTO_IDENTITY_PLUGIN`` points at a
prebuilt one instead (a packaged product ships the ``.so``).

``python -m hearth.service.broker_plugin`` builds it and prints where it is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from hearth.errors import BrokerError

__all__ = ["PACKAGES", "SOURCE", "identity_plugin_path"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mosquitto_identity.c")
PLUGIN_FILE = "hearth_identity.so"
PACKAGES = "gcc mosquitto-dev libmosquitto-dev libssl-dev"
"""Debian packages the build needs (compiler, Mosquitto plugin headers, OpenSSL headers)."""
_FLAGS = ("-shared", "-fPIC", "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror")
_LIBS = ("-lcrypto",)
_HINT = (f"install the build tools: apt-get install {PACKAGES} "
         "(or set HEARTH_MOSQUITTO_IDENTITY_PLUGIN to a built plugin)")


def identity_plugin_path() -> Path:
    """The built plugin: ``$HEARTH_MOSQUITTO_IDENTITY_PLUGIN``, else build or reuse the cache.

    Raises:
        BrokerError: no compiler or headers, the build failed, or the plugin file or its
            directory could be altered by another user.
    """
    override = os.environ.get("HEARTH_MOSQUITTO_IDENTITY_PLUGIN")
    if override:
        path = Path(override)
        if not path.is_file():
            raise BrokerError(f"HEARTH_MOSQUITTO_IDENTITY_PLUGIN={override} is not a file")
        _check_private(path, path.parent)
        return path
    return _build(_cache_dir())


def _cache_dir() -> Path:
    base = os.environ.get("HEARTH_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hearth"


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name:
            found = shutil.which(name)
            if found:
                return found
    raise BrokerError(f"Hearth's Mosquitto identity plugin needs a C compiler: {_HINT}")


def _build(cache: Path) -> Path:
    source = SOURCE.read_bytes()
    cc = _compiler()
    parts = [source, cc.encode(), *(f.encode() for f in _FLAGS + _LIBS)]
    key = hashlib.sha256(b"\0".join(parts))
    out_dir = cache / "mosquitto" / key.hexdigest()[:16]
    target = out_dir / PLUGIN_FILE
    chain = (target, out_dir, cache / "mosquitto", cache)  # who could swap the file
    if target.is_file():
        _check_private(*chain)
        return target
    try:
        for d in (cache, cache / "mosquitto", out_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise BrokerError(f"cannot create the plugin cache {out_dir}: {e}") from e
    log.info("building Hearth's Mosquitto identity plugin with %s into %s", cc, out_dir)
    fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            result = subprocess.run(  # compiles the very bytes hashed above (stdin)
                [cc, *_FLAGS, "-o", str(tmp), "-x", "c", "-", *_LIBS],
                input=source, capture_output=True, timeout=120, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BrokerError(f"could not run the C compiler {cc}: {e}; {_HINT}") from e
        if result.returncode != 0:
            errors = result.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = " | ".join(errors[:4])
            raise BrokerError(
                f"building Hearth's Mosquitto identity plugin failed ({detail}); {_HINT}")
        tmp.chmod(0o755)
        os.replace(tmp, target)  # concurrent builds produce the same file: last one wins
    finally:
        tmp.unlink(missing_ok=True)
    _check_private(*chain)
    return target


def _check_private(*paths: Path) -> None:
    """The plugin runs inside the broker: refuse it if another user could have replaced
    it (the file, or a directory on the way to it, writable by group or others, or owned
    by someone else than us or root)."""
    me = os.geteuid()
    for p in paths:
        st = p.stat()
        if st.st_uid not in (me, 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise BrokerError(
                f"{p} is writable by another user (owner uid {st.st_uid}, mode "
                f"{stat.filemode(st.st_mode)}); refusing to load it into the broker")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="==> %(message)s")
    try:
        path = identity_plugin_path()
    except BrokerError as e:
        print(f"error: {e}")
        return 1
    print(f"==> Hearth's Mosquitto identity plugin (certificate CN = username): {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
