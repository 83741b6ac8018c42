"""The unit's updater: python-tuf's ngclient, an authenticated HTTPS fetcher, and A/B install.

Workflow (:class:`UnitUpdater`)::

    check()     refresh TUF metadata (root -> timestamp -> snapshot -> targets, every rule of
                the TUF client workflow enforced by ngclient), then choose the newest release
                for this unit's model that is newer than the committed version and allowed
                from it (``min_from_version``) - or check the one the service assigned
    download()  fetch the bundle over HTTPS with a short-lived bearer token, resuming a
                partial download, and verify its length and hashes against the signed target
    install()   hand it to :class:`~hearth.device.slots.SlotManager` (inactive slot, verify,
                atomic switch); the new version starts on the next restart, on trial

What is refused, and by whom:

=============================  ============================================================
attack                         refused by
=============================  ============================================================
tampered bundle                target length/hashes (ngclient ``TargetFile``), then manifest
unsigned / wrongly-signed md   ngclient: signatures over the threshold of keys in root
metadata rollback              ngclient: version never lower than the trusted one
bundle rollback                :meth:`UnitUpdater.check` and ``SlotManager.install``
frozen (expired) metadata      ngclient: expiry checked against the clock
mix-and-match                  ngclient: versions (and hashes, lengths) from timestamp/snapshot
oversized download             fetcher stops at the signed length (or a hard cap)
another model's bundle         signed custom metadata, and the manifest inside the bundle
=============================  ============================================================

Errors are :class:`~hearth.updates.errors.UpdateError` with a stable reason.

The trust anchor is ``UNIT/update/trusted_root.json``, installed at minting
(:func:`install_trusted_root`); ngclient's cache is ``UNIT/update/metadata/`` and partial
downloads live in ``UNIT/update/downloads/``.

The ``tuf_client_*`` functions are the bare TUF client behind ``hearth device tuf-client``:
they return 0 on success and 1 on any failure, printing the reason.

Example::

    updater = UnitUpdater(unit_dir, metadata_url=f"{url}/updates/metadata/",
                          target_base_url=f"{url}/updates/targets/", token=get_token)
    result = updater.update()        # UpdateResult(status="installed", version="1.1.0", ...)
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib import parse

import httpx
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from hearth._fsutil import atomic_write
from hearth.device.slots import TRUSTED_ROOT, UPDATE_DIR, SlotManager
from hearth.updates._fs import os_error
from hearth.updates.bundle import (
    DEFAULT_LIMITS,
    BundleLimits,
    Delivery,
    ReleaseInfo,
    parse_version,
    target_name_for,
)
from hearth.updates.errors import UpdateError, UpdateReason

__all__ = [
    "HttpsFetcher",
    "Offer",
    "UnitUpdater",
    "UpdateResult",
    "install_trusted_root",
    "tuf_client_download",
    "tuf_client_init",
    "tuf_client_refresh",
    "tuf_config",
]

_CHUNK = 64 * 1024
MAX_DOWNLOAD_BYTES = 128 * 1024 * 1024
"""Hard cap on any single download, whatever the metadata says."""


def tuf_config() -> UpdaterConfig:
    """ngclient limits for Hearth: small metadata, bounded root rotations."""
    return UpdaterConfig(
        max_root_rotations=32,
        max_delegations=8,
        root_max_length=256 * 1024,
        timestamp_max_length=16 * 1024,
        snapshot_max_length=256 * 1024,
        targets_max_length=8 * 1024 * 1024,
        app_user_agent="hearth-updater/1",
    )


# --- errors at the boundary --------------------------------------------------------------------
def _convert(e: Exception) -> UpdateError:
    """python-tuf / OS exceptions -> UpdateError with a stable reason."""
    if isinstance(e, UpdateError):
        return e
    table: list[tuple[type[Exception], UpdateReason]] = [
        (tuf_exc.UnsignedMetadataError, UpdateReason.BAD_SIGNATURE),
        (tuf_exc.ExpiredMetadataError, UpdateReason.EXPIRED_METADATA),
        (tuf_exc.BadVersionNumberError, UpdateReason.METADATA_ROLLBACK),
        (tuf_exc.LengthOrHashMismatchError, UpdateReason.HASH_MISMATCH),
        (tuf_exc.RepositoryError, UpdateReason.REPOSITORY_ERROR),
        (tuf_exc.DownloadLengthMismatchError, UpdateReason.TOO_LARGE),
        (tuf_exc.DownloadError, UpdateReason.DOWNLOAD_FAILED),
    ]
    for cls, reason in table:
        if isinstance(e, cls):
            return UpdateError(reason, str(e)[:200] or cls.__name__)
    if isinstance(e, OSError):
        return os_error(e, "updating")
    return UpdateError(UpdateReason.REPOSITORY_ERROR, f"{type(e).__name__}: {str(e)[:200]}")


@contextmanager
def _tuf_errors() -> Iterator[None]:
    try:
        yield
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError, ValueError) as e:
        raise _convert(e) from e


# --- the fetcher -------------------------------------------------------------------------------
def _origin(url: str) -> str:
    p = parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc}".lower()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HttpsFetcher(FetcherInterface):
    """ngclient fetcher on httpx: TLS 1.2+ verified against ``ca_file``, a bearer token on
    requests to ``token_origins`` only, no redirects, no proxies or credentials from the
    environment, per-read and total timeouts, a hard byte cap, and resumable ranges.

    Plain ``http://`` is refused except to a loopback address, unless
    ``unsafe_allow_http`` is set. ``token`` is called for each request, so it can hand out a
    fresh short-lived token (obtained over the unit's MQTT link).
    """

    def __init__(
        self,
        *,
        ca_file: Path | None = None,
        token: Callable[[], str] | None = None,
        token_origins: Iterable[str] = (),
        timeout: float = 30.0,
        total_timeout: float = 900.0,
        max_bytes: int = MAX_DOWNLOAD_BYTES,
        unsafe_allow_http: bool = False,
        user_agent: str = "hearth-updater/1",
    ) -> None:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._token = token
        self._token_origins = {_origin(o) for o in token_origins}
        if token is not None and not self._token_origins:
            raise ValueError("a token needs token_origins (where it may be sent)")
        self._total_timeout = total_timeout
        self.max_bytes = max_bytes
        self._unsafe_allow_http = unsafe_allow_http
        self._client = httpx.Client(
            verify=ctx,
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
        )
        self.requests = 0

    def close(self) -> None:
        self._client.close()

    def _headers(self, url: str) -> dict[str, str]:
        p = parse.urlsplit(url)
        if p.scheme == "http" and not (self._unsafe_allow_http or _is_loopback(p.hostname or "")):
            raise tuf_exc.DownloadError(f"refusing plain http to {p.hostname}")
        if p.scheme not in ("http", "https"):
            raise tuf_exc.DownloadError(f"unsupported URL scheme {p.scheme!r}")
        headers: dict[str, str] = {}
        if self._token is not None and _origin(url) in self._token_origins:
            headers["Authorization"] = f"Bearer {self._token()}"
        return headers

    def _send(self, url: str, headers: dict[str, str]) -> httpx.Response:
        self.requests += 1
        try:
            request = self._client.build_request("GET", url, headers=headers)
            return self._client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise tuf_exc.DownloadError(f"cannot fetch {url}: {type(e).__name__}") from e

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        deadline = time.monotonic() + self._total_timeout
        received = 0
        try:
            for chunk in response.iter_bytes(_CHUNK):
                received += len(chunk)
                if received > self.max_bytes:
                    raise tuf_exc.DownloadLengthMismatchError(
                        f"more than {self.max_bytes} bytes from {response.url}"
                    )
                if time.monotonic() > deadline:
                    raise tuf_exc.SlowRetrievalError(f"download from {response.url} too slow")
                yield chunk
        except httpx.HTTPError as e:
            raise tuf_exc.DownloadError(f"download interrupted: {type(e).__name__}") from e
        finally:
            response.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self._send(url, self._headers(url))
        if response.status_code != 200:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {response.status_code}",
                                            response.status_code)
        return self._chunks(response)

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        """Fetch ``url`` from byte ``offset`` on; returns the chunks and where they start
        (``offset`` if the server honoured the range, else 0)."""
        headers = self._headers(url)
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        response = self._send(url, headers)
        if offset > 0 and response.status_code == 206:
            if response.headers.get("content-range", "").startswith(f"bytes {offset}-"):
                return self._chunks(response), offset
            response.close()
            raise tuf_exc.DownloadError("server answered a different range")
        if response.status_code == 416 and offset > 0:
            response.close()
            return self.fetch_from(url, 0)
        if response.status_code != 200:
            response.close()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {response.status_code}",
                                            response.status_code)
        return self._chunks(response), 0


# --- trusted root ------------------------------------------------------------------------------
def _check_root(root_json: bytes, *, allow_expired: bool) -> Root:
    """Parse root metadata and verify it is signed by its own threshold."""
    if len(root_json) > tuf_config().root_max_length:
        raise UpdateError(UpdateReason.BAD_ROOT, "root metadata too large")
    try:
        md = Metadata[Root].from_bytes(root_json)
    except DeserializationError as e:
        raise UpdateError(UpdateReason.BAD_ROOT, "not TUF root metadata") from e
    if not isinstance(md.signed, Root):
        raise UpdateError(UpdateReason.BAD_ROOT, "not TUF root metadata")
    try:
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except tuf_exc.UnsignedMetadataError as e:
        raise UpdateError(UpdateReason.BAD_SIGNATURE, "root is not signed by its threshold") from e
    if not allow_expired and md.signed.is_expired():
        raise UpdateError(UpdateReason.EXPIRED_METADATA, "root metadata has expired")
    return md.signed


def install_trusted_root(unit_dir: Path, root_json: bytes) -> int:
    """Install the update trust anchor into a unit's flash (``factory.mint`` calls it).

    Writes ``UNIT/update/trusted_root.json`` and seeds ngclient's metadata directory. The root
    must be self-signed by its threshold, unexpired and use consistent snapshots. Returns the
    root version. Raises :class:`UpdateError`.
    """
    root = _check_root(root_json, allow_expired=False)
    if not root.consistent_snapshot:
        raise UpdateError(UpdateReason.BAD_ROOT, "Hearth repositories use consistent snapshots")
    update = unit_dir / UPDATE_DIR
    try:
        atomic_write(update / TRUSTED_ROOT, root_json)
        (update / "metadata").mkdir(parents=True, exist_ok=True)
        (update / "downloads").mkdir(parents=True, exist_ok=True)
        Updater(str(update / "metadata"), "https://invalid.invalid/", bootstrap=root_json)
    except OSError as e:
        raise os_error(e, "installing the trusted root") from e
    except tuf_exc.RepositoryError as e:
        raise _convert(e) from e
    return root.version


# --- the unit's updater ------------------------------------------------------------------------
@dataclass(frozen=True)
class Offer:
    """A verified release this unit may install."""

    target_name: str
    release: ReleaseInfo
    target: TargetFile = field(repr=False)
    delivery: Delivery = field(repr=False)

    @property
    def version(self) -> str:
        return self.release.version


@dataclass(frozen=True)
class UpdateResult:
    status: Literal["up_to_date", "installed"]
    version: str
    slot: str | None = None


class UnitUpdater:
    """Checks for, downloads and installs updates for the unit in ``unit_dir``."""

    def __init__(
        self,
        unit_dir: Path,
        *,
        metadata_url: str,
        target_base_url: str,
        fetcher: FetcherInterface | None = None,
        token: Callable[[], str] | None = None,
        ca_file: Path | None = None,
        slots: SlotManager | None = None,
        limits: BundleLimits = DEFAULT_LIMITS,
    ) -> None:
        self.unit_dir = unit_dir
        self.update_dir = unit_dir / UPDATE_DIR
        self.metadata_dir = self.update_dir / "metadata"
        self.download_dir = self.update_dir / "downloads"
        self.metadata_url = metadata_url if metadata_url.endswith("/") else metadata_url + "/"
        self.target_base_url = (target_base_url if target_base_url.endswith("/")
                                else target_base_url + "/")
        self.slots = slots or SlotManager(unit_dir)
        self.limits = limits
        if fetcher is None:
            ca = ca_file or (unit_dir / "ca.pem")
            fetcher = HttpsFetcher(
                ca_file=ca if ca.exists() else None,
                token=token,
                token_origins=(self.metadata_url, self.target_base_url),
                max_bytes=limits.max_bundle_bytes,
            )
        self.fetcher = fetcher

    def _anchor(self) -> bytes:
        try:
            return (self.update_dir / TRUSTED_ROOT).read_bytes()
        except OSError as e:
            raise UpdateError(UpdateReason.NOT_PROVISIONED, "no trusted root installed") from e

    def _updater(self) -> Updater:
        with _tuf_errors():
            return Updater(
                str(self.metadata_dir),
                self.metadata_url,
                str(self.download_dir),
                self.target_base_url,
                self.fetcher,
                tuf_config(),
                bootstrap=self._anchor(),
            )

    def _trusted_targets(self) -> tuple[bytes, Metadata[Targets], int]:
        """The targets metadata ngclient verified and stored at refresh, and the root version."""
        try:
            data = (self.metadata_dir / "targets.json").read_bytes()
            md = Metadata[Targets].from_bytes(data)
            root = Metadata[Root].from_bytes((self.metadata_dir / "root.json").read_bytes())
        except (OSError, DeserializationError) as e:
            raise UpdateError(UpdateReason.REPOSITORY_ERROR, "trusted metadata unreadable") from e
        if not isinstance(md.signed, Targets) or not isinstance(root.signed, Root):
            raise UpdateError(UpdateReason.REPOSITORY_ERROR, "trusted metadata unreadable")
        return data, md, root.signed.version

    def check(self, target_name: str | None = None) -> Offer | None:
        """Refresh metadata and return the release to install, or ``None`` if up to date.

        Without ``target_name`` the newest suitable release for this model is chosen
        (a version that failed its health check here is skipped); with it (a release the
        service assigned, e.g. in a rollout) exactly that one is checked. Raises
        :class:`UpdateError`: ``wrong_model``, ``not_newer``, ``min_from_version``,
        ``not_found`` for an assigned release, or any TUF failure reason.
        """
        state = self.slots.state()
        if state.pending is not None:
            raise UpdateError(UpdateReason.SLOT_BUSY, "an installed update awaits its health check")
        installed = parse_version(self.slots.installed_version())
        updater = self._updater()
        with _tuf_errors():
            updater.refresh()
        data, targets, root_version = self._trusted_targets()
        if target_name is None:
            failed = (state.last_result or {}).get("version") \
                if (state.last_result or {}).get("result") == "rolled_back" else None
            target_name = self._choose(targets, installed, failed)
            if target_name is None:
                return None
        with _tuf_errors():
            target = updater.get_targetinfo(target_name)
        if target is None:
            raise UpdateError(UpdateReason.NOT_FOUND, f"{target_name!r} is not published")
        release = ReleaseInfo.from_custom(target.custom)
        if target_name_for(release.model, release.version) != target_name:
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "target name and release differ")
        if release.model != self.slots.model:
            raise UpdateError(UpdateReason.WRONG_MODEL,
                              f"{target_name} is for {release.model}, not {self.slots.model}")
        if parse_version(release.version) < installed or (
            parse_version(release.version) == installed and not state.needs_repair
        ):
            raise UpdateError(UpdateReason.NOT_NEWER,
                              f"{release.version} is not newer than the installed version")
        if installed < parse_version(release.min_from_version):
            raise UpdateError(UpdateReason.MIN_FROM_VERSION,
                              f"{release.version} needs at least {release.min_from_version}")
        if target.length > self.limits.max_bundle_bytes:
            raise UpdateError(UpdateReason.TOO_LARGE, "bundle larger than this unit accepts")
        if "sha256" not in target.hashes:
            raise UpdateError(UpdateReason.BAD_TARGET_INFO, "target has no sha256 hash")
        if targets.signed.targets.get(target_name) != target:
            raise UpdateError(UpdateReason.REPOSITORY_ERROR, "trusted metadata changed")
        delivery = Delivery(target_name=target_name, root_version=root_version,
                            targets_metadata=data)
        return Offer(target_name, release, target, delivery)

    def _choose(
        self, targets: Metadata[Targets], installed: tuple[int, int, int], failed: object
    ) -> str | None:
        best: tuple[tuple[int, int, int], str] | None = None
        for name, target in targets.signed.targets.items():
            try:
                release = ReleaseInfo.from_custom(target.custom)
            except UpdateError:
                continue
            version = parse_version(release.version)
            if (
                release.model != self.slots.model
                or target_name_for(release.model, release.version) != name
                or version <= installed
                or installed < parse_version(release.min_from_version)
                or release.version == failed
            ):
                continue
            if best is None or version > best[0]:
                best = (version, name)
        return best[1] if best else None

    def download(self, offer: Offer, *, on_step: Callable[[str], None] | None = None) -> Path:
        """Download the offered bundle (resuming a partial one) and verify it. Returns its
        path in ``UNIT/update/downloads``. Raises :class:`UpdateError`."""
        target = offer.target
        sha256 = target.hashes["sha256"]
        dest = self.download_dir / f"{sha256}.bundle"
        dirname, sep, base = offer.target_name.rpartition("/")
        url = f"{self.target_base_url}{dirname}{sep}{sha256}.{base}"
        try:
            self.download_dir.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                with dest.open("rb") as f:
                    try:
                        target.verify_length_and_hashes(f)
                        return dest
                    except tuf_exc.LengthOrHashMismatchError:
                        pass
                dest.unlink()
            with _tuf_errors():
                _download_resumable(self.fetcher, url, target, dest, on_step)
        except OSError as e:
            raise os_error(e, "downloading the bundle") from e
        return dest

    def install(
        self, offer: Offer, bundle: Path, *, on_step: Callable[[str], None] | None = None
    ) -> str:
        """Install into the inactive slot and switch to it (pending until committed)."""
        slot = self.slots.install(bundle, offer.delivery, on_step=on_step)
        bundle.unlink(missing_ok=True)
        return slot

    def update(
        self, target_name: str | None = None, *, on_step: Callable[[str], None] | None = None
    ) -> UpdateResult:
        """check -> download -> install. The caller restarts into the new slot."""
        offer = self.check(target_name)
        if offer is None:
            return UpdateResult("up_to_date", self.slots.installed_version())
        bundle = self.download(offer, on_step=on_step)
        slot = self.install(offer, bundle, on_step=on_step)
        return UpdateResult("installed", offer.version, slot)


def _download_resumable(
    fetcher: FetcherInterface,
    url: str,
    target: TargetFile,
    dest: Path,
    on_step: Callable[[str], None] | None,
) -> None:
    """Append to ``dest.part`` from where it stopped (if the fetcher can), verify, rename."""
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if offset >= target.length:
        part.unlink()
        offset = 0
    if isinstance(fetcher, HttpsFetcher):
        chunks, start = fetcher.fetch_from(url, offset)
    else:
        chunks, start = fetcher.fetch(url), 0
    with part.open("r+b" if start and part.exists() else "wb") as f:
        f.seek(start)
        f.truncate()
        written = start
        for chunk in chunks:
            written += len(chunk)
            if written > target.length:
                raise tuf_exc.DownloadLengthMismatchError(
                    f"more than the signed {target.length} bytes"
                )
            f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            if on_step is not None:
                on_step("download:chunk")
    with part.open("rb") as f:
        try:
            target.verify_length_and_hashes(f)
        except tuf_exc.LengthOrHashMismatchError:
            part.unlink()  # start afresh next time
            raise
    os.replace(part, dest)


# --- the bare TUF client (``hearth device tuf-client``) ----------------------------------------
def _fail(what: str, e: BaseException) -> int:
    reason = _convert(e) if isinstance(e, Exception) else e
    print(f"tuf-client: {what} failed: {reason}", file=sys.stderr)
    return 1


def tuf_client_init(metadata_dir: Path, root_json_path: Path) -> int:
    """Trust the root in ``root_json_path``: store it as ``metadata_dir/root.json``. No
    network. The root must be signed by its own threshold. Returns 0, or 1 on failure."""
    try:
        data = Path(root_json_path).read_bytes()
        _check_root(data, allow_expired=True)
        metadata_dir.mkdir(parents=True, exist_ok=True)
        Updater(str(metadata_dir), "https://invalid.invalid/", bootstrap=data)
    except (UpdateError, OSError, tuf_exc.RepositoryError) as e:
        return _fail("init", e)
    print(f"tuf-client: trusting the root in {root_json_path}")
    return 0


def _cached_updater(
    metadata_dir: Path,
    metadata_url: str,
    target_dir: Path | None,
    target_base_url: str | None,
    fetcher: FetcherInterface | None,
) -> Updater:
    # bootstrap=None: the trust anchor is the root.json that `init` stored (and later refreshes
    # replaced with verified newer roots), which is what this stateless CLI has.
    return Updater(
        str(metadata_dir),
        metadata_url,
        str(target_dir) if target_dir is not None else None,
        target_base_url,
        fetcher or HttpsFetcher(),
        tuf_config(),
        bootstrap=None,
    )


def tuf_client_refresh(
    metadata_dir: Path, metadata_url: str, *, fetcher: FetcherInterface | None = None
) -> int:
    """Refresh top-level metadata from ``metadata_url``. Returns 0, or 1 on any failure."""
    try:
        _cached_updater(metadata_dir, metadata_url, None, None, fetcher).refresh()
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError, ValueError) as e:
        return _fail("refresh", e)
    print(f"tuf-client: metadata in {metadata_dir} is up to date")
    return 0


def tuf_client_download(
    metadata_dir: Path,
    metadata_url: str,
    target_names: list[str],
    target_base_url: str,
    target_dir: Path,
    *,
    fetcher: FetcherInterface | None = None,
) -> int:
    """Refresh, then download each target in order into ``target_dir`` (stopping at the first
    failure). A target already there with matching length and hashes is not fetched again.
    Returns 0 if all succeeded, 1 otherwise."""
    if not target_names:
        print("tuf-client: download needs at least one --target-name", file=sys.stderr)
        return 1
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        updater = _cached_updater(metadata_dir, metadata_url, target_dir, target_base_url,
                                  fetcher)
        updater.refresh()
    except (tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError, ValueError) as e:
        return _fail("refresh", e)
    for name in target_names:
        try:
            info = updater.get_targetinfo(name)
            if info is None:
                print(f"tuf-client: target {name!r} not found", file=sys.stderr)
                return 1
            cached = updater.find_cached_target(info)
            if cached is not None:
                print(f"tuf-client: {name} already downloaded: {cached}")
                continue
            path = updater.download_target(info)
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError, OSError, ValueError) as e:
            return _fail(f"download of {name!r}", e)
        print(f"tuf-client: downloaded {name} to {path}")
    return 0

