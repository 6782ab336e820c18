"""`edgectl store install | list | activate | rollback`: manage a model store folder.

Works on the device's own store and on a mounted copy of it (the offline flash: an SD card or a
disk image mounted on a workstation). Every change to a model's ``state.json`` holds the store
lock, so running this beside the daemon is safe; the daemon applies changes on SIGHUP
(``systemctl reload edge-runtime``).

Exit codes: 0 done; 1 refused (bad or unsigned bundle, no such model or version, store busy);
2 usage (missing store folder, unreadable key, bad option).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from edge_runtime.config.profiles import DeviceProfile
    from edge_runtime.state.store import ModelStore

__all__ = ["store"]

RELOAD_HINT = "a running daemon serves it after a reload: systemctl reload edge-runtime (or kill -HUP <pid>)"

store_option = click.option(
    "--store",
    "store_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The model store folder: the daemon's `store` setting, or that folder on a mounted device.",
)


def _open(
    store_dir: Path,
    key_path: Path | None = None,
    profile: DeviceProfile | None = None,
    *,
    create: bool = False,
) -> ModelStore:
    """The store at `store_dir` (UsageError when missing, unless `create`)."""
    from edge_runtime.artifact.signing import load_public_key
    from edge_runtime.state.store import ModelStore

    key = load_public_key(key_path) if key_path is not None else None
    return ModelStore(store_dir, key, profile, create=create)


@click.group()
def store() -> None:
    """Install, list, activate and roll back models in a model store (on a device or a mounted copy)."""


@store.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@store_option
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path), help="Public key (.pub).")
@click.option("--profile", "profile_name", help="The device's profile (default: the one the bundle names).")
@click.option("--activate", is_flag=True, help="Make it the active version (the old one becomes previous).")
@click.option("--create", is_flag=True, help="Create the store folder if it does not exist.")
def install(
    bundle: Path, store_dir: Path, key_path: Path, profile_name: str | None, activate: bool, create: bool
) -> None:
    """Verify BUNDLE (signature, sha256, profile compatibility) and copy it into the store."""
    from edge_runtime.artifact.bundle import read_manifest
    from edge_runtime.artifact.signing import load_public_key
    from edge_runtime.config.profiles import load_profile

    declared, _ = read_manifest(bundle, load_public_key(key_path))
    profile = load_profile(profile_name or declared.profile)
    models = _open(store_dir, key_path, profile, create=create)
    manifest = models.install(bundle)
    click.echo(
        f"installed {manifest.name} {manifest.version} into {models.root} "
        f"(signed by key {manifest.signer}, checked against profile {profile.name})"
    )
    if activate:
        state = models.activate(manifest.name, manifest.version)
        click.echo(
            f"active: {manifest.name} {state.active} (previous: {state.previous or 'none'}); {RELOAD_HINT}"
        )


def _rows(models: ModelStore, verify: bool) -> list[dict[str, Any]]:
    """One row per installed version (or per model whose state cannot be read)."""
    from edge_runtime.artifact.bundle import read_manifest
    from edge_runtime.core.errors import EdgeError

    rows: list[dict[str, Any]] = []
    for name in models.models():
        try:
            state = models.state(name)
        except EdgeError as exc:
            rows.append({"model": name, "version": None, "state": "error", "error": str(exc)})
            continue
        for version in models.versions(name):
            path = models.bundle_path(name, version)
            role = "active" if version == state.active else "previous" if version == state.previous else ""
            row: dict[str, Any] = {
                "model": name,
                "version": version,
                "state": role,
                "size": path.stat().st_size,
            }
            try:
                manifest, verified_by = read_manifest(path, models.public_key if verify else None)
                row.update(signer=verified_by or manifest.signer, created=manifest.created)
            except EdgeError as exc:
                row.update(state=f"{role} refused".strip(), error=str(exc))
            rows.append(row)
    return rows


@store.command(name="list")
@store_option
@click.option("--key", "key_path", type=click.Path(path_type=Path), help="Also verify each signature.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_models(store_dir: Path, key_path: Path | None, as_json: bool) -> None:
    """List every installed version: which is active, which is previous, signer and size."""
    models = _open(store_dir, key_path)
    rows = _rows(models, verify=key_path is not None)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo(f"{models.root}: no models installed")
        return
    header = ("model", "version", "state", "signer", "size", "created")
    table = [
        (r["model"], r["version"] or "-", r["state"] or "-", r.get("signer", "-"),
         f"{r['size']:,}" if "size" in r else "-", r.get("created") or r.get("error", ""))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(header[i]), *(len(str(row[i])) for row in table)) for i in range(len(header))]
    for line in (header, *table):
        click.echo(
            "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


@store.command()
@click.argument("model")
@click.argument("version")
@store_option
@click.option(
    "--key", "key_path", type=click.Path(path_type=Path), help="Verify the bundle before activating."
)
def activate(model: str, version: str, store_dir: Path, key_path: Path | None) -> None:
    """Make VERSION of MODEL the active one (the active one becomes previous)."""
    models = _open(store_dir, key_path)
    if key_path is not None:
        from edge_runtime.artifact.bundle import read_bundle

        read_bundle(models.bundle_path(model, version), models.public_key, limits=models.limits)
    state = models.activate(model, version)
    click.echo(f"active: {model} {state.active} (previous: {state.previous or 'none'}); {RELOAD_HINT}")


@store.command()
@click.argument("model")
@store_option
def rollback(model: str, store_dir: Path) -> None:
    """Make MODEL's previous version active again (the active one becomes previous)."""
    models = _open(store_dir)
    version = models.rollback(model)
    click.echo(f"active: {model} {version} (previous: {models.state(model).previous}); {RELOAD_HINT}")
