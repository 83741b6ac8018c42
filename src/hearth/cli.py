"""The ``hearth`` command. It parses arguments, calls the public API, and maps errors to
exit codes in one place (:func:`main`): 0 success, 1 a Hearth error, 2 bad input/usage.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hearth.errors import HearthError, ValidationError

if TYPE_CHECKING:
    from hearth.service.config import Settings

__all__ = ["app", "main"]

console = Console(stderr=True)
app = typer.Typer(
    help="Hearth: secure-by-design consumer IoT. `hearth demo` shows a whole fleet working.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
pki_app = typer.Typer(help="The maker's certificate authorities.", no_args_is_help=True)
factory_app = typer.Typer(help="Mint unit identities at the factory.", no_args_is_help=True)
fleet_app = typer.Typer(help="The service's fleet registry.", no_args_is_help=True)
device_app = typer.Typer(help="The device runtime (what runs inside a unit).",
                         no_args_is_help=True)
app.add_typer(pki_app, name="pki")
app.add_typer(factory_app, name="factory")
app.add_typer(fleet_app, name="fleet")
app.add_typer(device_app, name="device")
admin_app = typer.Typer(help="Service accounts for operators and the security team.",
                        no_args_is_help=True)
app.add_typer(admin_app, name="admin")


def _add_release_commands() -> None:
    from hearth.cli_release import release_app, tuf_app

    app.add_typer(release_app, name="release")
    device_app.add_typer(tuf_app, name="tuf-client")


_add_release_commands()

DEFAULT_DATA_DIR = Path(os.environ.get("HEARTH_DATA_DIR", "hearth-data"))
DataDir = Annotated[
    Path, typer.Option("--data-dir", help="Service data directory (HEARTH_DATA_DIR).")
]


@pki_app.command("init")
def pki_init(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Create the maker root CA, the device CA and the service CA (keys 0600)."""
    from hearth.pki import MakerPKI

    pki = MakerPKI.create(data_dir / "pki")
    console.print(f"Created the maker PKI in {pki.directory}")


@factory_app.command("mint")
def factory_mint(
    model: Annotated[str, typer.Option(help="Product model: thermostat or lock.")],
    count: Annotated[int, typer.Option(help="How many units to mint.")],
    out: Annotated[Path, typer.Option(help="Output directory (one sub-directory per unit).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    mqtt_host: Annotated[str, typer.Option(help="Broker host the units trust.")] = "localhost",
    mqtt_port: Annotated[int, typer.Option(help="Broker port.")] = 8883,
    http_url: Annotated[str, typer.Option(help="Service URL.")] = "https://localhost:8443",
) -> None:
    """Mint COUNT units of MODEL: a unique identity per unit and a manifest for the service."""
    from hearth.factory import Endpoint, mint
    from hearth.pki import MakerPKI

    pki = MakerPKI.load_or_create(data_dir / "pki")
    updates = None  # signed software: the factory image and trust anchor, once there is one
    if (data_dir / "updates" / "metadata" / "1.root.json").exists():
        from hearth.updates.quickstart import open_repository

        updates = open_repository(data_dir)
    else:
        console.print("[yellow]no update repository in the data directory[/yellow]: the units "
                      "get no signed software (hearth release init / publish first)")
    with Progress(
        TextColumn("minting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=count < 50,
    ) as bar:
        task = bar.add_task("mint", total=count)
        units = mint(
            pki, model=model, count=count, out=out,
            endpoint=Endpoint(mqtt_host=mqtt_host, mqtt_port=mqtt_port, http_url=http_url),
            progress=lambda n: bar.advance(task, n), updates=updates,
        )
    console.print(f"Minted {len(units)} {model} unit(s) into {out}; manifest: {out}/manifest.json")


def _settings(data_dir: Path, **over: object) -> Settings:
    from hearth.service.config import Settings

    env = dict(os.environ)
    env["HEARTH_DATA_DIR"] = str(data_dir)
    for key, value in over.items():
        if value is not None:
            env[f"HEARTH_{key.upper()}"] = str(value)
    return Settings.from_env(env)


@fleet_app.command("import")
def fleet_import(
    directory: Annotated[Path, typer.Argument(help="Minted batch directory (or its manifest).")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Register a minted batch with the service (validates every unit's certificate).

    Only certificates and hashes are read from the manifest. A running `hearth up`
    picks the new units up within a few seconds.
    """
    from hearth.factory import load_manifest
    from hearth.pki import MakerPKI
    from hearth.service import db, fleet

    settings = _settings(data_dir)
    pki = MakerPKI.load(settings.pki_dir)
    engine = db.make_engine(settings.database_url)
    db.migrate(engine)
    with db.session_factory(engine)() as session:
        result = fleet.import_manifest(
            session, load_manifest(directory), device_ca_cert=pki.device_ca.cert
        )
        session.commit()
    engine.dispose()
    console.print(f"Imported {result.imported} unit(s); {result.unchanged} already registered.")


@fleet_app.command("list")
def fleet_list(data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """List registered units (JSON lines: device id, model, status, last seen)."""
    from hearth.service import db, fleet

    settings = _settings(data_dir)
    engine = db.make_engine(settings.database_url)
    db.migrate(engine)
    with db.session_factory(engine)() as session:
        after = None
        while page := fleet.list_units(session, limit=1000, after=after):
            for u in page:
                sys.stdout.write(json.dumps({
                    "device_id": u.device_id, "model": u.model, "status": u.status,
                    "last_seen_at": u.last_seen_at.isoformat() if u.last_seen_at else None,
                }) + "\n")
            after = page[-1].device_id
    engine.dispose()


@fleet_app.command("revoke")
def fleet_revoke(
    device_id: Annotated[str, typer.Argument(help="The unit to cut off.")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Revoke a unit: its certificate goes on the CRL and a running service cuts its
    session within seconds (the API's POST /units/{id}/revoke does it at once)."""
    from hearth.pki import MakerPKI, cert_from_pem
    from hearth.service import db, fleet

    settings = _settings(data_dir)
    engine = db.make_engine(settings.database_url)
    db.migrate(engine)
    with db.session_factory(engine)() as session:
        unit = fleet.get_unit(session, device_id)
        MakerPKI.load(settings.pki_dir).revoke(cert_from_pem(unit.certificate_pem.encode()))
        fleet.mark_revoked(session, device_id)
        session.commit()
    engine.dispose()
    console.print(f"Revoked {device_id}.")


@app.command("up")
def up(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    http_port: Annotated[int, typer.Option(help="HTTPS API port.")] = 8443,
    mqtt_port: Annotated[int, typer.Option(help="MQTT (mutual TLS) port.")] = 8883,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")]
    = "127.0.0.1",
    ingest_workers: Annotated[int, typer.Option(help="Ingest workers in this process.")] = 1,
) -> None:
    """Run the service: supervised Mosquitto, ingest and the HTTPS API. Ctrl-C stops it.

    On the very first start an operator API token is printed once; only its hash is kept.
    """
    import signal

    from hearth.service.runner import Stack

    settings = _settings(data_dir, http_port=http_port, mqtt_port=mqtt_port,
                         http_host=host, mqtt_host=host)
    stack = Stack(settings, ingest_workers=ingest_workers)
    stop = {"now": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with stack:
        info = stack.start()
        console.print(f"Hearth is up: API {info.api_url}/api/v1  MQTT mTLS "
                      f"{info.mqtt_host}:{info.mqtt_port}  units: {info.units}  "
                      f"data: {settings.data_dir}")
        if info.operator_token:
            console.print("Operator API token (shown once, store it now; only its hash is "
                          "kept):")
            sys.stdout.write(info.operator_token + "\n")
            sys.stdout.flush()
        console.print("Press Ctrl-C to stop.")
        stack.wait(lambda: stop["now"])
        console.print("Stopping...")
    console.print("Stopped.")


@device_app.command("run")
def device_run(
    directory: Annotated[Path, typer.Option("--dir", help="The unit's directory (its flash).")],
    telemetry_interval: Annotated[float, typer.Option(help="Seconds between readings.")] = 5.0,
    mqtt_host: Annotated[str | None, typer.Option(help="Override the broker host.")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="Override the broker port.")] = None,
    backoff_base: Annotated[float, typer.Option(help="Reconnect backoff base (s).")] = 1.0,
    backoff_cap: Annotated[float, typer.Option(help="Reconnect backoff cap (s).")] = 60.0,
    check_interval: Annotated[float, typer.Option(help="Seconds between update checks (also "
                                                       "on every connect).")] = 6 * 3600.0,
    health_timeout: Annotated[float, typer.Option(help="Seconds a new version has to connect "
                                                       "and report.")] = 120.0,
    local_api: Annotated[str | None, typer.Option(
        help="Serve the local API (HTTPS, owner credential or setup code only) on HOST:PORT "
             "for offline control; off unless given. See docs/device-ports.md.")] = None,
) -> None:
    """Run a unit: at every start its software is verified (signed updates, A/B slots),
    its app keeps working offline, telemetry is queued and sent in order, updates are
    installed in the background."""
    from hearth.device.localapi import LocalApiConfig
    from hearth.device.runtime import run_unit

    if not 0.05 <= telemetry_interval <= 86400:
        raise ValidationError("out_of_range", "telemetry interval must be 0.05..86400 s")
    local = None
    if local_api is not None:
        host, sep, port = local_api.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValidationError("invalid_address", "--local-api must be HOST:PORT")
        local = LocalApiConfig(host=host.strip("[]"), port=int(port))
    rc = run_unit(directory, telemetry_interval=telemetry_interval, mqtt_host=mqtt_host,
                  mqtt_port=mqtt_port, backoff_base=backoff_base, backoff_cap=backoff_cap,
                  check_interval=check_interval, health_timeout=health_timeout,
                  local_api=local)
    if rc:
        raise typer.Exit(rc)


@device_app.command("reset")
def device_reset(
    directory: Annotated[Path, typer.Option("--dir", help="The unit's directory (its flash).")],
) -> None:
    """Factory reset a (stopped) unit: erase its owner binding, local user data and queued
    data; keep its identity. It can then be claimed again only with its own setup code."""
    from hearth.device.owner import reset_unit_directory

    erased = reset_unit_directory(directory)
    console.print("Factory reset done" + (" (owner binding erased)." if erased else "."))


@admin_app.command("create")
def admin_create(
    email: Annotated[str, typer.Option(help="The new account's e-mail address.")],
    role: Annotated[str, typer.Option(help="operator or security.")] = "operator",
    password_file: Annotated[Path | None, typer.Option(
        help="Read the password from this file (else one is generated and shown once).")
    ] = None,
    totp_now: Annotated[bool, typer.Option(
        "--totp-now", help="Enrol the authenticator now and print its otpauth URI once "
        "(else it is enrolled at the first sign-in).")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create an operator or security-team account. There is no default account."""
    from hearth.service import db
    from hearth.service.accounts.admin import create_admin, read_password_file
    from hearth.service.accounts.models import Role
    from hearth.service.accounts.wiring import service_secret

    if role not in ("operator", "security"):
        raise ValidationError("invalid_role", "role must be operator or security")
    settings = _settings(data_dir)
    password = read_password_file(password_file) if password_file is not None else None
    engine = db.make_engine(settings.database_url)
    db.migrate(engine)
    with db.session_factory(engine).begin() as session:
        created = create_admin(session, email=email, role=Role(role), password=password,
                               secret_key=service_secret(settings), totp_now=totp_now)
    engine.dispose()
    console.print(f"Created {created.role.value} account {created.email}.")
    if created.generated_password:
        console.print("Password (shown once; store it now, only its hash is kept):")
        sys.stdout.write(created.generated_password + "\n")
    if created.totp_uri:
        console.print("Authenticator setup URI (shown once; import it in your TOTP app):")
        sys.stdout.write(created.totp_uri + "\n")
    else:
        console.print("The authenticator app is set up at the first sign-in.")
    sys.stdout.flush()


@app.command("demo")
def demo(
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    duration: Annotated[float, typer.Option(help="Seconds to run the fleet (about a minute)."
                                            )] = 60.0,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Keep everything here (default: a temporary directory, removed)."
    )] = None,
) -> None:
    """Mint 5 thermostats and 1 lock, start the service and the units, send commands,
    feed in bad messages, and show what was stored and what was rejected and why."""
    from hearth.demo import print_summary, run_demo

    if not 5 <= duration <= 3600:
        raise ValidationError("out_of_range", "duration must be 5..3600 seconds")
    say = (lambda text: console.print(text, highlight=False)) if not as_json else (
        lambda text: None)
    summary = run_demo(duration=duration, data_dir=data_dir, say=say)
    if as_json:
        _print_json(summary.to_json())
    else:
        def out(text: str) -> None:
            sys.stdout.write(text + "\n")

        print_summary(summary, out)
    if not summary.ok:
        raise typer.Exit(1)


def _fail(err: HearthError) -> int:
    if isinstance(err, ValidationError):
        console.print(f"[red]refused[/red] ({err.reason}): {err.detail}")
        return 2
    console.print(f"[red]error[/red]: {err}")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hearth`` command."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except HearthError as err:
        return _fail(err)
    except typer.Abort:
        return 130
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        # Usage errors from the CLI library carry their own exit code and message.
        exit_code = getattr(err, "exit_code", None)
        if isinstance(exit_code, int):
            show = getattr(err, "show", None)
            if callable(show) and type(err).__name__ != "NoArgsIsHelpError":
                show()
            return exit_code
        raise
    # `raise typer.Exit(n)` in a command comes back as the return value here.
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
