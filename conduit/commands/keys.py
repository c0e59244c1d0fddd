"""`conduit keys`: CURVE keypairs; and the --curve-* options of the commands that talk to brokers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from conduit.commands.common import JSON, emit

_FILE = click.Path(dir_okay=False, path_type=Path)


def client_options(command: Any) -> Any:
    """--curve-secret and --curve-server, which override CONDUIT_CURVE_SECRET and _SERVER."""
    command = click.option(
        "--curve-server",
        type=_FILE,
        help="The brokers' public key file, NAME.key (env CONDUIT_CURVE_SERVER); with --curve-secret.",
    )(command)
    return click.option(
        "--curve-secret",
        type=_FILE,
        help="This peer's CURVE keypair, NAME.key_secret (env CONDUIT_CURVE_SECRET); turns CURVE on.",
    )(command)


@click.group()
def keys() -> None:
    """CURVE keypairs for brokers, workers and clients (see README, Security)."""


@keys.command("new")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write the two files in.",
)
@JSON
def new(name: str, directory: Path, as_json: bool) -> None:
    """Write a keypair: NAME.key (the public key, to hand out) and NAME.key_secret (mode 0600,
    to keep). Refuses to overwrite either file."""
    from conduit.curve import new_keys, read_public

    public_path, secret_path = new_keys(name, directory)
    key = read_public(public_path).decode()
    if as_json:
        emit({"public_file": str(public_path), "secret_file": str(secret_path), "public_key": key})
        return
    click.echo(f"wrote {public_path} (public key {key}) and {secret_path} (secret, mode 0600)")


@keys.command("show")
@click.argument("file", type=_FILE)
def show(file: Path) -> None:
    """Print the public key (Z85) of a key file: NAME.key, or NAME.key_secret."""
    from conduit.curve import SECRET_SUFFIX, read_keypair, read_public

    key = read_keypair(file).public if file.name.endswith(SECRET_SUFFIX) else read_public(file)
    click.echo(key.decode())
