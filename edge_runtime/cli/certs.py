"""`edgectl certs ca | device | operator | broker`: a throwaway CA and certificates for a test fleet."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["certs"]

_DIR = click.Path(file_okay=False, path_type=Path)


@click.group()
def certs() -> None:
    """Mint a throwaway CA and per-device, operator and broker certificates (for a test fleet)."""


@certs.command("ca")
@click.option("-o", "--output-dir", type=_DIR, required=True, help="Writes ca.crt and ca.key here.")
@click.option("--name", default="edge test fleet CA", show_default=True, help="The CA's common name.")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def ca(output_dir: Path, name: str, days: int, force: bool) -> None:
    """Create a new CA (keep ca.key off the devices)."""
    from edge_runtime.fleet.certs import make_ca

    files = make_ca(output_dir, name=name, days=days, force=force)
    click.echo(f"wrote {files.cert} and {files.key} (keep secret)")


def _client_command(role: str, noun: str) -> click.Command:
    @click.command(role, help=f"Create a client certificate for {noun} NAME (CN = NAME, the MQTT user name).")
    @click.argument("name")
    @click.option("--ca", "ca_dir", type=_DIR, required=True, help="Folder of 'edgectl certs ca'.")
    @click.option("-o", "--output-dir", type=_DIR, required=True, help="Writes NAME.crt and NAME.key here.")
    @click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
    @click.option("--force", is_flag=True, help="Overwrite existing files.")
    def command(name: str, ca_dir: Path, output_dir: Path, days: int, force: bool) -> None:
        from edge_runtime.fleet.certs import CertRole, make_cert

        files = make_cert(ca_dir, name, output_dir, role=CertRole(role), days=days, force=force)
        click.echo(f"wrote {files.cert} and {files.key} (CN={name}, signed by {files.ca})")

    return command


certs.add_command(_client_command("device", "the device whose device_id is"))
certs.add_command(_client_command("operator", "the operator (edgectl) named"))


@certs.command("broker")
@click.argument("name", default="broker")
@click.option(
    "--host", "hosts", multiple=True, required=True, help="DNS name or IP of the broker (repeatable)."
)
@click.option("--ca", "ca_dir", type=_DIR, required=True, help="Folder of 'edgectl certs ca'.")
@click.option("-o", "--output-dir", type=_DIR, required=True, help="Writes NAME.crt and NAME.key here.")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def broker(name: str, hosts: tuple[str, ...], ca_dir: Path, output_dir: Path, days: int, force: bool) -> None:
    """Create the broker's server certificate for the --host names clients connect to."""
    from edge_runtime.fleet.certs import CertRole, make_cert

    files = make_cert(ca_dir, name, output_dir, role=CertRole.SERVER, hosts=hosts, days=days, force=force)
    click.echo(f"wrote {files.cert} and {files.key} (for {', '.join(hosts)})")
