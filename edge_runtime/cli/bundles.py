"""`edgectl profiles | keygen | inspect | verify`: device profiles, keys and bundles."""

from __future__ import annotations

import json
from pathlib import Path

import click

__all__ = ["inspect", "keygen", "profiles", "verify"]


@click.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def profiles(name: str | None, as_json: bool) -> None:
    """List the built-in device profiles, or show one (NAME or a .toml path) in full."""
    from edge_runtime.config.profiles import list_profiles, load_profile

    if name:
        profile = load_profile(name)
        click.echo(json.dumps(profile.to_dict(), indent=2, default=str))
        return
    found = list_profiles()
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in found], indent=2, default=str))
        return
    rows = [
        (
            p.name,
            p.hardware.arch,
            ",".join(p.runtime.engines),
            p.quantization.name + (" rr" if p.quantization.reduce_range else ""),
            f"{p.hardware.ram_mb} MB",
            f"{p.budgets.max_model_bytes / 1e6:g} MB",
            f"{p.budgets.max_accuracy_drop_pp} pp",
            p.description,
        )
        for p in found
    ]
    header = ("name", "arch", "engines", "int8", "ram", "max model", "max drop", "description")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    for row in (header, *rows):
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@click.command()
@click.option("-o", "--output-dir", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@click.option("--name", default="signing", show_default=True, help="Writes NAME.key and NAME.pub.")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(output_dir: Path, name: str, force: bool) -> None:
    """Create an ed25519 key pair: the private key signs bundles, devices get the public key."""
    from edge_runtime.artifact.signing import generate_keypair, key_id, load_public_key

    private_path, public_path = generate_keypair(output_dir, name, force=force)
    click.echo(
        f"wrote {private_path} (keep secret) and {public_path} (key id {key_id(load_public_key(public_path))})"
    )


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(bundle: Path, as_json: bool) -> None:
    """Show a bundle's manifest and report (checksums are checked; the signature is not: use verify)."""
    from edge_runtime.artifact.bundle import read_bundle

    manifest = read_bundle(bundle, public_key=None).manifest
    if as_json:
        click.echo(manifest.to_json().decode())
        return
    click.echo(
        f"{manifest.name} version {manifest.version} for {manifest.profile} ({manifest.engine}), "
        f"signed by key {manifest.signer or '-'} on {manifest.created}"
    )
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            click.echo(f"  {kind:6} {spec.name}: {spec.dtype} {list(spec.shape)}")
    for name, entry in sorted(manifest.files.items()):
        click.echo(f"  file   {name}: {entry.size} bytes sha256 {entry.sha256[:16]}...")
    if manifest.report.get("compressed"):
        from edge_runtime.artifact.report_text import format_report

        click.echo(format_report(manifest.report))


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path), help="Public key (.pub).")
@click.option("--profile", "profile_name", help="Device profile to self-test with (default: the bundle's).")
@click.option("--no-selftest", is_flag=True, help="Check signature and checksums only.")
def verify(bundle: Path, key_path: Path, profile_name: str | None, no_selftest: bool) -> None:
    """Verify a bundle's signature and checksums, then load it and run its golden self-test."""
    from edge_runtime.artifact.bundle import read_bundle
    from edge_runtime.artifact.signing import load_public_key
    from edge_runtime.config.profiles import load_profile
    from edge_runtime.core.errors import BundleError
    from edge_runtime.engines import load_backend
    from edge_runtime.engines.selftest import run_selftest

    loaded = read_bundle(bundle, load_public_key(key_path))
    manifest = loaded.manifest
    click.echo(
        f"{bundle}: signature OK (key {loaded.signed_by}), {len(manifest.files)} members match their sha256"
    )
    if no_selftest or manifest.golden is None:
        return
    profile = load_profile(profile_name or manifest.profile)
    backend = load_backend(manifest, loaded.model_bytes, profile)
    try:
        result = run_selftest(backend.run, loaded.golden_cases(), manifest.golden)
    finally:
        backend.close()
    if not result.passed:
        raise BundleError(f"{bundle}: self-test failed: {result.reason}")
    click.echo(f"self-test passed ({result.cases} golden cases)")
