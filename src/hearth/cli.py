"""The ``hearth`` command. It parses arguments, calls the public API, and maps errors to
exit codes in one place (:func:`main`): 0 success, 1 a Hearth error, 2 bad input/usage.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hearth.errors import HearthError, ValidationError

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
    with Progress(
        TextColumn("minting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=count < 50,
    ) as bar:
        task = bar.add_task("mint", total=count)
        units = mint(
            pki, model=model, count=count, out=out,
            endpoint=Endpoint(mqtt_host=mqtt_host, mqtt_port=mqtt_port, http_url=http_url),
            progress=lambda n: bar.advance(task, n),
        )
    console.print(f"Minted {len(units)} {model} unit(s) into {out}; manifest: {out}/manifest.json")


def _fail(err: HearthError) -> int:
    if isinstance(err, ValidationError):
        console.print(f"[red]refused[/red] ({err.reason}): {err.detail}")
        return 2
    console.print(f"[red]error[/red]: {err}")
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hearth`` command."""
    try:
        app(args=argv, standalone_mode=False)
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
    return 0


def _print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
