"""``hearth release ...`` (the maker's signed releases) and ``hearth device tuf-client ...``.

Kept out of :mod:`hearth.cli` so the main CLI module stays small; it adds these two groups.
Like the rest of the CLI: parse arguments, call the public API, let :func:`hearth.cli.main`
map errors to exit codes.

::

    hearth release root init --keys DIR [--threshold 2 --count 3]   offline root keys
    hearth release root rotate --keys DIR [--rotate-online ROLE ...] new root version
    hearth release init --keys DIR                                    create the repository
    hearth release bundle SRC --model M --version V [--min-from X] --out FILE
    hearth release bundle --reference --model M --version V --out FILE
    hearth release publish BUNDLE --model M --version V [--min-from X]
    hearth release refresh [--force]                                   re-sign what is due
    hearth release status                                              expiry, releases
    hearth release support --model M --end-date YYYY-MM-DD             publish/extend

    hearth device tuf-client --metadata-dir D init ROOT_JSON
    hearth device tuf-client --metadata-dir D --metadata-url U refresh
    hearth device tuf-client --metadata-dir D --metadata-url U --target-name T
        [--target-name T2 ...] --target-base-url B --target-dir TD download

The root keys directory must be outside the service's data directory. A passphrase for
the root keys is read from the environment variable named by ``--passphrase-env`` (never
from the command line, where other users could see it).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from hearth.errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from hearth.updates.keys import OfflineRootKeys

__all__ = ["release_app", "tuf_app"]

console = Console(stderr=True)
release_app = typer.Typer(help="Signed releases: root keys, repository, bundles, support "
                          "periods.", no_args_is_help=True)
root_app = typer.Typer(help="Offline root keys (run on the offline machine).",
                       no_args_is_help=True)
release_app.add_typer(root_app, name="root")
tuf_app = typer.Typer(help="The bare TUF client (exit 0 on success, 1 on any failure).",
                      no_args_is_help=True)

DEFAULT_DATA_DIR = Path(os.environ.get("HEARTH_DATA_DIR", "hearth-data"))
DataDir = Annotated[Path, typer.Option("--data-dir", help="Service data directory.")]
KeysDir = Annotated[Path, typer.Option("--keys", help="Offline root keys directory (outside "
                                                      "the data directory).")]
PassEnv = Annotated[str | None, typer.Option(
    "--passphrase-env", help="Environment variable holding the root keys' passphrase.")]
Model = Annotated[str, typer.Option("--model", help="Product model.")]
Version = Annotated[str, typer.Option("--version", help="Release version, e.g. 1.1.0.")]
MinFrom = Annotated[str, typer.Option(
    "--min-from", help="Oldest installed version this release may update from.")]


def _passphrase(env: str | None) -> bytes | None:
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"the environment variable {env} is empty or not set")
    return value.encode()


def _root_keys(keys: Path, env: str | None) -> OfflineRootKeys:
    from hearth.updates.keys import OfflineRootKeys

    return OfflineRootKeys.load(keys, passphrase=_passphrase(env))


def _outside(keys: Path, data_dir: Path) -> None:
    k, d = keys.absolute(), data_dir.absolute()
    if k == d or k.is_relative_to(d):
        raise ConfigError("the offline root keys must not live in the service's data directory")


def _repo(data_dir: Path):  # type: ignore[no-untyped-def]  # (lazy import keeps startup fast)
    from hearth.updates.quickstart import open_repository

    return open_repository(data_dir)


# --- root keys ---------------------------------------------------------------------------------
@root_app.command("init")
def root_init(
    keys: KeysDir,
    threshold: Annotated[int, typer.Option(help="Signatures needed (K).")] = 2,
    count: Annotated[int, typer.Option(help="Keys to create (N).")] = 3,
    passphrase_env: PassEnv = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create N offline root keys of which K must sign (keys 0600, directory 0700)."""
    from hearth.updates.keys import init_root

    _outside(keys, data_dir)
    root = init_root(keys, threshold=threshold, count=count,
                     passphrase=_passphrase(passphrase_env))
    console.print(f"Created {len(root.keys)} root keys in {keys} ({root.threshold} needed). "
                  "Move them to offline storage; split them between custodians.")


@root_app.command("rotate")
def root_rotate(
    keys: KeysDir,
    rotate_online: Annotated[list[str] | None, typer.Option(
        "--rotate-online", help="Replace this online role's key (repeatable).")] = None,
    passphrase_env: PassEnv = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Sign a new root version (extends its expiry; optionally replaces online keys)."""
    _outside(keys, data_dir)
    version = _repo(data_dir).rotate_root(root_keys=_root_keys(keys, passphrase_env),
                                          rotate_online=rotate_online or ())
    console.print(f"Published root version {version}.")


# --- repository ----------------------------------------------------------------------------------
@release_app.command("init")
def init(keys: KeysDir, passphrase_env: PassEnv = None,
         data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Create the update repository in DATA/updates (online keys in DATA/update-keys)."""
    from hearth.updates.quickstart import repository_paths
    from hearth.updates.repository import Repository

    _outside(keys, data_dir)
    path, online = repository_paths(data_dir)
    repo = Repository.create(path, online_keys_dir=online,
                             root_keys=_root_keys(keys, passphrase_env))
    console.print(f"Created the update repository in {repo.path} (root version "
                  f"{repo.root_version()}).")


@release_app.command("bundle")
def bundle(
    model: Model,
    version: Version,
    out: Annotated[Path, typer.Option(help="Where to write the bundle (.tar).")],
    src: Annotated[Path | None, typer.Argument(help="The application's directory.")] = None,
    min_from: MinFrom = "0.0.0",
    reference: Annotated[bool, typer.Option(
        "--reference", help="Bundle Hearth's reference app for MODEL instead of SRC.")] = False,
) -> None:
    """Pack an application directory (with its app.py entry module) into a bundle."""
    from hearth.updates.bundle import build_bundle
    from hearth.updates.reference import build_reference_bundle

    if reference == (src is not None):
        raise ValidationError("invalid_schema", "give SRC or --reference (not both)")
    if src is None:
        manifest = build_reference_bundle(model, version, out=out, min_from_version=min_from)
    else:
        if not (src / "app.py").is_file():
            raise ValidationError("invalid_schema", f"{src} has no app.py (the entry module)")
        manifest = build_bundle(src, model=model, version=version, min_from_version=min_from,
                                out=out)
    console.print(f"Wrote {out}: {model} {version} ({len(manifest.files)} files).")


@release_app.command("publish")
def publish(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="The bundle (.tar).")],
    model: Model,
    version: Version,
    min_from: MinFrom = "0.0.0",
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Verify, sign and publish a bundle (targets, snapshot and timestamp re-signed)."""
    release = _repo(data_dir).publish(bundle_path, model=model, version=version,
                                      min_from_version=min_from)
    _sync(data_dir)
    console.print(f"Published {release.target_name} ({release.length} bytes, sha256 "
                  f"{release.sha256[:16]}...). Start a rollout to send it to units.")


def _sync(data_dir: Path) -> None:
    from hearth.service import db
    from hearth.service.config import Settings
    from hearth.service.updates import rollouts

    settings = Settings.from_env({**os.environ, "HEARTH_DATA_DIR": str(data_dir)})
    engine = db.make_engine(settings.database_url)
    try:
        db.migrate(engine)
        with db.session_factory(engine).begin() as session:
            db.begin_write(session)
            rollouts.sync_releases(session, _repo(data_dir).releases(),
                                   now=dt.datetime.now(dt.UTC))
    finally:
        engine.dispose()


@release_app.command("refresh")
def refresh(
    force: Annotated[bool, typer.Option(help="Re-sign the timestamp even if not due.")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Re-sign the online roles that are past half their validity (the service does this
    by itself every few minutes)."""
    repo = _repo(data_dir)
    if force:
        repo.refresh_timestamp()
        console.print("Re-signed the timestamp.")
        return
    done = repo.refresh_if_due()
    console.print(f"Re-signed: {', '.join(done)}." if done else "Nothing was due.")


@release_app.command("status")
def status(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """The repository's root version, each role's expiry and the published releases."""
    repo = _repo(data_dir)
    out = sys.stdout
    out.write(f"root version {repo.root_version()}\n")
    for role, at in repo.expiry().items():
        out.write(f"  {role:<10} expires {at.isoformat()}\n")
    out.write(f"next re-sign due {repo.next_refresh().isoformat()}\n")
    for r in repo.releases():
        out.write(f"{r.target_name}  from {r.info.min_from_version}  {r.length} bytes\n")


@release_app.command("support")
def support(
    model: Model,
    end_date: Annotated[str, typer.Option("--end-date", help="Last day of security updates "
                                                              "(YYYY-MM-DD).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Publish (or extend - never shorten) a model's support period."""
    from hearth.service import db
    from hearth.service.config import Settings
    from hearth.service.updates import rollouts

    try:
        end = dt.date.fromisoformat(end_date)
    except ValueError:
        raise ValidationError("invalid_schema", "end date must be YYYY-MM-DD") from None
    settings = Settings.from_env({**os.environ, "HEARTH_DATA_DIR": str(data_dir)})
    engine = db.make_engine(settings.database_url)
    try:
        db.migrate(engine)
        with db.session_factory(engine).begin() as session:
            db.begin_write(session)
            period = rollouts.define_support_period(session, model, end,
                                                    now=dt.datetime.now(dt.UTC))
    finally:
        engine.dispose()
    console.print(f"{model}: security updates until {period.end_date.isoformat()} "
                  f"(published on the product page and /api/v1/support-periods).")


# --- the bare TUF client -------------------------------------------------------------------------
@tuf_app.callback()
def tuf_client(
    ctx: typer.Context,
    metadata_dir: Annotated[Path, typer.Option("--metadata-dir", help="Trusted metadata.")],
    metadata_url: Annotated[str | None, typer.Option("--metadata-url")] = None,
    target_name: Annotated[list[str] | None, typer.Option(
        "--target-name", help="A target to download (repeatable, in order).")] = None,
    target_base_url: Annotated[str | None, typer.Option("--target-base-url")] = None,
    target_dir: Annotated[Path | None, typer.Option("--target-dir")] = None,
) -> None:
    """A TUF client on its own (tuf-conformance CLI): init, refresh, download."""
    ctx.obj = {"metadata_dir": metadata_dir, "metadata_url": metadata_url,
               "target_names": list(target_name or []), "target_base_url": target_base_url,
               "target_dir": target_dir}


def _need(ctx: typer.Context, *names: str) -> None:
    missing = [n for n in names if not ctx.obj.get(n)]
    if missing:
        sys.stderr.write("tuf-client: missing " + ", ".join(
            "--" + n.replace("_", "-") for n in missing) + "\n")
        raise typer.Exit(1)


@tuf_app.command("init")
def tuf_init(ctx: typer.Context, root_json: Annotated[Path, typer.Argument()]) -> None:
    """Trust ROOT_JSON (no network)."""
    from hearth.device.updater import tuf_client_init

    raise typer.Exit(tuf_client_init(ctx.obj["metadata_dir"], root_json))


@tuf_app.command("refresh")
def tuf_refresh(ctx: typer.Context) -> None:
    """Refresh the top-level metadata from --metadata-url."""
    from hearth.device.updater import tuf_client_refresh

    _need(ctx, "metadata_url")
    raise typer.Exit(tuf_client_refresh(ctx.obj["metadata_dir"], ctx.obj["metadata_url"]))


@tuf_app.command("download")
def tuf_download(ctx: typer.Context) -> None:
    """Refresh, then download each --target-name into --target-dir (stops at a failure)."""
    from hearth.device.updater import tuf_client_download

    _need(ctx, "metadata_url", "target_names", "target_base_url", "target_dir")
    o = ctx.obj
    raise typer.Exit(tuf_client_download(o["metadata_dir"], o["metadata_url"],
                                         o["target_names"], o["target_base_url"],
                                         o["target_dir"]))
