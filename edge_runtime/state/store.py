"""The model store: a directory the daemon owns, holding verified bundles per model and version.

Layout::

    <root>/<model>/<version>/bundle.edgebundle   an installed bundle (verified before it is copied)
    <root>/<model>/state.json                    {"v": 1, "active": "<version>", "previous": ...}

Installing never activates; ``activate`` and ``rollback`` rewrite ``state.json`` atomically, so a
crash leaves either the old or the new state. Keeping every installed version side by side leaves
room for the A/B update flow (install into the inactive version, trial it, commit or roll back).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.artifact import signing
from edge_runtime.artifact.bundle import BUNDLE_SUFFIX, Bundle, read_bundle
from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import BundleError, NotFoundError, UsageError
from edge_runtime.core.files import atomic_write, sha256_hex

__all__ = ["STATE_VERSION", "ModelState", "ModelStore", "check_compatible"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
"""Schema version of ``state.json``."""
BUNDLE_FILE = "bundle" + BUNDLE_SUFFIX
STATE_FILE = "state.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


@dataclass(frozen=True)
class ModelState:
    """Which installed version of one model is active, and which one rollback returns to."""

    active: str | None
    previous: str | None = None

    def to_json(self) -> bytes:
        """The versioned JSON written to ``state.json``."""
        data = {"v": STATE_VERSION, "active": self.active, "previous": self.previous}
        return json.dumps(data, sort_keys=True).encode("utf-8")


def check_compatible(manifest: Manifest, device: DeviceProfile) -> None:
    """Raise BundleError unless the bundle was built for an engine, arch and CPU this device has."""
    where = f"bundle {manifest.name} {manifest.version}"
    if manifest.engine != device.runtime.engine:
        raise BundleError(
            f"{where} needs engine '{manifest.engine}', this device ({device.name}) runs "
            f"'{device.runtime.engine}'"
        )
    built_for = manifest.report.get("profile")
    if not isinstance(built_for, dict):
        if manifest.profile != device.name:
            raise BundleError(
                f"{where} was built for profile '{manifest.profile}', this device is '{device.name}' "
                "(and the bundle carries no profile details to check compatibility with)"
            )
        return
    hardware: dict[str, Any] = built_for.get("hardware") or {}
    arch = hardware.get("arch")
    if arch != device.hardware.arch:
        raise BundleError(f"{where} was built for arch '{arch}', this device is '{device.hardware.arch}'")
    missing = sorted(set(hardware.get("cpu_features") or ()) - set(device.hardware.cpu_features))
    if missing:
        raise BundleError(
            f"{where} was built for CPU features this device ({device.name}) lacks: {', '.join(missing)}"
        )


def _check_name(value: str, what: str) -> str:
    """A model name or version that is safe to use as one path component."""
    if not _SAFE_NAME.match(value):
        raise BundleError(f"{what} '{value}' cannot be stored (letters, digits, '._+-' only, at most 128)")
    return value


class ModelStore:
    """Installed bundles per model and version, plus which version of each model is active."""

    def __init__(self, root: Path, public_key: signing.PublicKey, device_profile: DeviceProfile) -> None:
        self.root = Path(root)
        self.public_key = public_key
        self.device_profile = device_profile
        self.root.mkdir(parents=True, exist_ok=True)

    def bundle_path(self, name: str, version: str) -> Path:
        """Where version `version` of model `name` lives (whether installed or not)."""
        return self.root / _check_name(name, "model name") / _check_name(version, "version") / BUNDLE_FILE

    def install(self, bundle_path: Path) -> Manifest:
        """Verify a bundle (signature, sha256, compatibility), then copy it into the store; never activates."""
        bundle_path = Path(bundle_path)
        manifest = read_bundle(bundle_path, self.public_key).manifest
        check_compatible(manifest, self.device_profile)
        target = self.bundle_path(manifest.name, manifest.version)
        try:
            raw = bundle_path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {bundle_path}: {exc.strerror or exc}") from exc
        if target.exists():
            if sha256_hex(target.read_bytes()) == sha256_hex(raw):
                log.info("%s %s is already installed", manifest.name, manifest.version)
                return manifest
            raise BundleError(
                f"{manifest.name} version {manifest.version} is already installed with other content; "
                "a version is immutable, give the new bundle a new version"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, raw)
        try:
            self.open(manifest.name, manifest.version)  # the bytes on disk, not the ones we were given
        except BundleError:
            target.unlink(missing_ok=True)
            raise
        log.info("installed %s %s into %s", manifest.name, manifest.version, target.parent)
        return manifest

    def open(self, name: str, version: str) -> Bundle:
        """Read an installed bundle, verifying signature, checksums and compatibility again."""
        path = self.bundle_path(name, version)
        if not path.is_file():
            raise NotFoundError(f"model '{name}' version '{version}' is not installed")
        bundle = read_bundle(path, self.public_key)
        if (bundle.manifest.name, bundle.manifest.version) != (name, version):
            raise BundleError(
                f"{path} holds {bundle.manifest.name} {bundle.manifest.version}, not {name} {version}"
            )
        check_compatible(bundle.manifest, self.device_profile)
        return bundle

    def versions(self, name: str) -> list[str]:
        """Installed versions of model `name`, sorted."""
        folder = self.root / _check_name(name, "model name")
        if not folder.is_dir():
            return []
        return sorted(p.parent.name for p in folder.glob(f"*/{BUNDLE_FILE}"))

    def models(self) -> list[str]:
        """Names of every model with at least one installed version, sorted."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _SAFE_NAME.match(p.name))

    def state(self, name: str) -> ModelState:
        """The active/previous versions of model `name` (both None when never activated)."""
        path = self.root / _check_name(name, "model name") / STATE_FILE
        if not path.exists():
            return ModelState(active=None)
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise BundleError(f"model store: {path} is unreadable: {exc}") from exc
        if not isinstance(data, dict) or data.get("v") != STATE_VERSION:
            raise BundleError(f"model store: {path} is not a v{STATE_VERSION} state file")
        return ModelState(active=data.get("active"), previous=data.get("previous"))

    def _write_state(self, name: str, state: ModelState) -> None:
        atomic_write(self.root / name / STATE_FILE, state.to_json())

    def activate(self, name: str, version: str) -> None:
        """Make an installed version the active one; the formerly active one becomes `previous`."""
        if not self.bundle_path(name, version).is_file():
            raise NotFoundError(f"model '{name}' version '{version}' is not installed")
        current = self.state(name)
        if current.active == version:
            return
        self._write_state(name, ModelState(active=version, previous=current.active))
        log.info("activated %s %s (previous: %s)", name, version, current.active)

    def rollback(self, name: str) -> str:
        """Make the previous version active again (the current one becomes previous); returns it."""
        current = self.state(name)
        if current.previous is None:
            raise NotFoundError(f"model '{name}' has no previous version to roll back to")
        if not self.bundle_path(name, current.previous).is_file():
            raise NotFoundError(
                f"model '{name}' previous version '{current.previous}' is no longer installed"
            )
        self._write_state(name, ModelState(active=current.previous, previous=current.active))
        log.info("rolled %s back from %s to %s", name, current.active, current.previous)
        return current.previous

    def active(self) -> dict[str, str]:
        """Model name -> active version, for every model that has one."""
        result: dict[str, str] = {}
        for name in self.models():
            try:
                state = self.state(name)
            except BundleError as exc:
                log.error("skipping model %s: %s", name, exc)
                continue
            if state.active is not None:
                result[name] = state.active
        return result
