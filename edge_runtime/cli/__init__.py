"""`edgectl`: the command line. Commands load lazily, so a device without onnx can still run it."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import click

from edge_runtime.core.errors import EdgeError

__all__ = ["main"]

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module:attribute, one-line help shown without importing the module)
    "demo": ("compressor.cli:demo", "Compress the embedded digits model end to end (no broker needed)."),
    "compress": (
        "compressor.cli:compress",
        "Compress an ONNX model for a device profile into a signed bundle.",
    ),
    "profiles": ("edge_runtime.cli.bundles:profiles", "List the device profiles (or show one)."),
    "keygen": ("edge_runtime.cli.bundles:keygen", "Create an ed25519 signing key pair."),
    "inspect": ("edge_runtime.cli.bundles:inspect", "Show a bundle's manifest and report."),
    "verify": (
        "edge_runtime.cli.bundles:verify",
        "Verify a bundle's signature, checksums and self-test.",
    ),
    "store": ("edge_runtime.cli.store:store", "Install, list, activate and roll back models in a store."),
    "serve": ("edge_runtime.cli.serve:serve", "Run the on-device daemon (HTTP v2 + MQTT)."),
    "predict": ("edge_runtime.cli.predict:predict", "Send one inference request over HTTP or MQTT."),
    "flash": ("edge_runtime.cli.flash:flash", "Push a bundle to devices over MQTT (A/B, trial, rollback)."),
    "rollback": ("edge_runtime.cli.flash:rollback", "Return a device's model to its previous version."),
    "models": ("edge_runtime.cli.flash:models", "Show what a device has installed, active and serving."),
    "devices": (
        "edge_runtime.cli.devices:devices",
        "List the fleet: presence, profile, health, models (--watch).",
    ),
    "rollout": (
        "edge_runtime.cli.rollout:rollout",
        "Push a bundle to a fleet in waves, canary first.",
    ),
    "certs": (
        "edge_runtime.cli.certs:certs",
        "Mint a throwaway CA and device, operator and broker certificates.",
    ),
    "telemetry": (
        "edge_runtime.cli.telemetry:telemetry",
        "Collect the fleet's telemetry into a database; summarize it.",
    ),
    "cancel": ("edge_runtime.cli.flash:cancel", "End a device's running (stuck) model update as failed."),
}


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use, with one place that reports errors."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        target, short_help = COMMANDS[cmd_name]
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or "a dependency"
            hint = " (pip install 'edge-runtime[compressor]')" if missing in ("onnx", "sklearn") else ""
            return _unavailable(cmd_name, f"'{cmd_name}' needs {missing}, which is not installed{hint}")
        command = getattr(module, attribute)
        command.short_help = command.short_help or short_help
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands from COMMANDS' one-line help, importing none of them (so `--help`
        works without the compressor's dependencies and never loads onnx)."""
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        # Our libraries' log lines (an MQTT link's reconnect WARNINGs, say) are not a command's
        # output: its error is one line. `serve` and `telemetry collect` configure logging to show them.
        logging.getLogger("edge_runtime").addHandler(logging.NullHandler())
        try:
            return super().invoke(ctx)
        except EdgeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _unavailable(name: str, message: str) -> click.Command:
    """A stand-in command that explains why the real one cannot load."""

    @click.command(name=name, context_settings={"ignore_unknown_options": True}, add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args: tuple[str, ...]) -> None:
        raise click.ClickException(message)

    stub.short_help = message
    return stub


@click.group(cls=LazyGroup)
@click.version_option(package_name="edge-runtime")
def cli() -> None:
    """Compress models per device profile, ship them as signed bundles, and serve them on the edge."""


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="edgectl")


if __name__ == "__main__":  # pragma: no cover
    main()
