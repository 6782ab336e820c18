"""The model store: a directory the daemon owns, holding verified bundles per model and version.

Layout::

    <root>/.lock                                 flock(2) held by every writer of a state.json
    <root>/.staging/                             bundles being copied in (same file system: rename)
    <root>/<model>/<version>/bundle.edgebundle   an installed bundle (verified before it is moved in)
    <root>/<model>/<version>/bundle.sha256       its sha256, valid while the file's identity matches
    <root>/<model>/state.json                    {"v": 1, "active": "<version>", "previous": ...}

Installing never activates; ``activate`` and ``rollback`` rewrite ``state.json`` atomically under
the store lock, so a crash leaves either the old or the new state and two writers (the daemon,
``edgectl store``, the update flow) never interleave. Every installed version stays side by side:
the update flow installs into a new version (the inactive slot), trials it, then activates it
(commit) or leaves the active one alone (roll back); ``remove`` frees versions nothing points at.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.artifact import signing
from edge_runtime.artifact.bundle import BUNDLE_SUFFIX, DEFAULT_LIMITS, Bundle, ReadLimits, read_bundle
from edge_runtime.artifact.manifest import Manifest, is_safe_name, load_json_object
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import BundleError, NotFoundError, UsageError
from edge_runtime.core.files import atomic_write
from edge_runtime.state.lock import FolderLock

__all__ = ["DIGEST_FILE", "STATE_VERSION", "ModelState", "ModelStore", "check_compatible", "parse_state"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
"""Schema version of ``state.json``."""
BUNDLE_FILE = "bundle" + BUNDLE_SUFFIX
DIGEST_FILE = "bundle.sha256"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
STAGING_DIR = ".staging"
MAX_STATE_BYTES = 64 * 1024
PUBLIC_MODE = 0o644
"""Store files are readable by the daemon's user whoever wrote them (e.g. root running edgectl)."""
_STATE_KEYS = frozenset({"v", "active", "previous"})


@dataclass(frozen=True)
class ModelState:
    """Which installed version of one model is active, and which one rollback returns to."""

    active: str | None
    previous: str | None = None

    def to_json(self) -> bytes:
        """The versioned JSON written to ``state.json``."""
        data = {"v": STATE_VERSION, "active": self.active, "previous": self.previous}
        return json.dumps(data, sort_keys=True).encode("utf-8")


def parse_state(raw: bytes, where: str) -> ModelState:
    """Parse ``state.json`` bytes strictly (BundleError naming `where` for anything odd)."""
    try:
        data = load_json_object(raw, where, MAX_STATE_BYTES)
    except BundleError as exc:
        raise BundleError(f"model store: {exc}") from None
    version = data.get("v")
    if version != STATE_VERSION or isinstance(version, bool):
        raise BundleError(f"model store: {where} is not a v{STATE_VERSION} state file")
    unknown = sorted(set(data) - _STATE_KEYS)
    if unknown:
        raise BundleError(f"model store: {where} has an unknown field '{unknown[0][:64]}'")
    for key in ("active", "previous"):
        value = data.get(key)
        if value is not None and not is_safe_name(value):
            shown = value[:64] if isinstance(value, str) else type(value).__name__
            raise BundleError(f"model store: {where}: '{key}' must be a version name or null, not {shown!r}")
    return ModelState(active=data.get("active"), previous=data.get("previous"))


def check_compatible(manifest: Manifest, device: DeviceProfile) -> None:
    """Raise BundleError unless the bundle was built for an engine, arch and CPU this device has."""
    where = f"bundle {manifest.name} {manifest.version}"
    if manifest.engine not in device.runtime.engines:
        raise BundleError(
            f"{where} needs engine '{manifest.engine}', this device ({device.name}) runs "
            f"{', '.join(repr(str(engine)) for engine in device.runtime.engines)}"
        )
    built_for = manifest.report.get("profile")
    if not isinstance(built_for, dict):
        if manifest.profile != device.name:
            raise BundleError(
                f"{where} was built for profile '{manifest.profile}', this device is '{device.name}' "
                "(and the bundle carries no profile details to check compatibility with)"
            )
        return
    hardware = built_for.get("hardware") or {}
    features = hardware.get("cpu_features") or [] if isinstance(hardware, dict) else None
    if not isinstance(features, list | tuple) or not all(isinstance(f, str) for f in features):
        raise BundleError(f"{where} carries malformed profile details (report.profile.hardware)")
    arch = hardware.get("arch")
    if arch != device.hardware.arch:
        raise BundleError(f"{where} was built for arch '{arch}', this device is '{device.hardware.arch}'")
    missing = sorted(set(features) - set(device.hardware.cpu_features))
    if missing:
        raise BundleError(
            f"{where} was built for CPU features this device ({device.name}) lacks: {', '.join(missing)}"
        )


def _check_name(value: str, what: str) -> str:
    """A model name or version that is safe to use as one path component."""
    if not is_safe_name(value):
        shown = value[:64] if isinstance(value, str) else type(value).__name__
        raise BundleError(f"{what} {shown!r} cannot be stored (letters, digits, '._+-' only, at most 128)")
    return value


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_root(root: Path, create: bool) -> None:
    """Refuse a store path that is missing (unless `create`) or not a folder."""
    if root.is_dir():
        return
    if root.exists():
        raise UsageError(f"model store {root} is not a folder")
    if not create:
        raise UsageError(
            f"model store {root} does not exist (check the path or that the device is mounted; "
            "`edgectl store install --create` makes a new store)"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create model store {root}: {exc.strerror or exc}") from exc


class ModelStore:
    """Installed bundles per model and version, plus which version of each model is active.

    `public_key` and `device_profile` are needed to install or open bundles; listing, activating
    and rolling back work without them (the daemon verifies again whatever it loads).
    """

    def __init__(
        self,
        root: Path,
        public_key: signing.PublicKey | None,
        device_profile: DeviceProfile | None,
        *,
        create: bool = True,
        limits: ReadLimits = DEFAULT_LIMITS,
        lock_timeout_s: float = 30.0,
    ) -> None:
        self.root = Path(root)
        self.public_key = public_key
        self.device_profile = device_profile
        self.limits = limits
        _open_root(self.root, create)
        self._lock = FolderLock(self.root / LOCK_FILE, timeout_s=lock_timeout_s)

    def lock(self) -> AbstractContextManager[None]:
        """Hold the store's write lock (``with store.lock(): ...``): re-entrant, across processes."""
        return self._lock.hold()

    def verifier(self) -> tuple[signing.PublicKey, DeviceProfile]:
        """The key and device profile bundles are checked with; UsageError when the store has none."""
        if self.public_key is None or self.device_profile is None:
            raise UsageError("verifying bundles needs the signing public key and the device profile")
        return self.public_key, self.device_profile

    def _model_dir(self, name: str) -> Path:
        folder = self.root / _check_name(name, "model name")
        if folder.is_symlink():
            raise BundleError(f"model store: {folder} is a symbolic link; refusing to follow it")
        return folder

    def bundle_path(self, name: str, version: str) -> Path:
        """Where version `version` of model `name` lives (whether installed or not)."""
        folder = self._model_dir(name) / _check_name(version, "version")
        if folder.is_symlink():
            raise BundleError(f"model store: {folder} is a symbolic link; refusing to follow it")
        return folder / BUNDLE_FILE

    def staging_dir(self) -> Path:
        """A folder on the store's file system for bundles on their way in (downloads, copies)."""
        folder = self.root / STAGING_DIR
        if folder.is_symlink():
            raise BundleError(f"model store: {folder} is a symbolic link; refusing to follow it")
        folder.mkdir(exist_ok=True)
        return folder

    def free_bytes(self) -> int:
        """Bytes free on the store's file system."""
        return shutil.disk_usage(self.root).free

    def install(self, bundle_path: Path) -> Manifest:
        """Copy a bundle in, verify the copy (signature, sha256, compatibility), then move it into place.

        Never activates. Installing the same bytes again is a no-op; other bytes under an installed
        version are refused (versions are immutable). A file already in `staging_dir()` (a finished
        download) is moved rather than copied, and removed if it is refused.
        """
        public_key, profile = self.verifier()
        source = Path(bundle_path)
        in_staging = source.parent.resolve() == self.staging_dir().resolve() and source.is_file()
        staged = source if in_staging else self._stage(source)
        try:
            manifest = read_bundle(staged, public_key, limits=self.limits).manifest
            check_compatible(manifest, profile)
            target = self.bundle_path(manifest.name, manifest.version)
            with self.lock():
                if target.exists():
                    if self.bundle_sha256(manifest.name, manifest.version) == _file_sha256(staged):
                        log.info("%s %s is already installed", manifest.name, manifest.version)
                        return manifest
                    raise BundleError(
                        f"{manifest.name} version {manifest.version} is already installed with other "
                        "content; a version is immutable, give the new bundle a new version"
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)
                _fsync_dir(target.parent)
                _fsync_dir(target.parent.parent)
        finally:
            staged.unlink(missing_ok=True)
        log.info("installed %s %s into %s", manifest.name, manifest.version, target.parent)
        self.bundle_sha256(manifest.name, manifest.version)  # computed once, here
        return manifest

    def bundle_sha256(self, name: str, version: str) -> str:
        """Hex sha256 of an installed bundle, from its sidecar while the file is the one it was computed
        for (same inode, size, mtime and ctime), else computed and the sidecar rewritten."""
        path = self.bundle_path(name, version)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise NotFoundError(f"model '{name}' version '{version}' is not installed") from None
        identity = [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        sidecar = path.with_name(DIGEST_FILE)
        try:
            doc = json.loads(sidecar.read_bytes()[:1024])
            if doc["file"] == identity and isinstance(doc["sha256"], str) and len(doc["sha256"]) == 64:
                return doc["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # missing, unreadable or stale: compute it again
        digest = _file_sha256(path)
        try:
            atomic_write(sidecar, json.dumps({"file": identity, "sha256": digest}).encode(), mode=PUBLIC_MODE)
        except OSError as exc:  # a read-only store still answers, only slower
            log.debug("cannot write %s: %s", sidecar, exc)
        return digest

    def _stage(self, source: Path) -> Path:
        """A private copy of `source` in the staging folder, flushed to disk."""
        try:
            with source.open("rb") as src:
                fd, name = tempfile.mkstemp(suffix=BUNDLE_SUFFIX, dir=self.staging_dir())
                os.fchmod(fd, PUBLIC_MODE)
                with os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
        except IsADirectoryError as exc:
            raise UsageError(f"{source} is a directory, not a bundle") from exc
        except FileNotFoundError as exc:
            raise UsageError(f"{source}: no such file") from exc
        except OSError as exc:
            raise UsageError(f"cannot copy {source} into the store: {exc.strerror or exc}") from exc
        return Path(name)

    def open(self, name: str, version: str) -> Bundle:
        """Read an installed bundle, verifying signature, checksums and compatibility again."""
        public_key, profile = self.verifier()
        path = self.bundle_path(name, version)
        if not path.is_file():
            raise NotFoundError(f"model '{name}' version '{version}' is not installed")
        bundle = read_bundle(path, public_key, limits=self.limits)
        if (bundle.manifest.name, bundle.manifest.version) != (name, version):
            raise BundleError(
                f"{path} holds {bundle.manifest.name} {bundle.manifest.version}, not {name} {version}"
            )
        check_compatible(bundle.manifest, profile)
        return bundle

    def versions(self, name: str) -> list[str]:
        """Installed versions of model `name`, sorted."""
        folder = self._model_dir(name)
        if not folder.is_dir():
            return []
        found = (p.parent.name for p in folder.glob(f"*/{BUNDLE_FILE}") if not p.parent.is_symlink())
        return sorted(v for v in found if is_safe_name(v))

    def models(self) -> list[str]:
        """Names of every model folder in the store (safe names only, no symbolic links), sorted."""
        try:
            entries = list(self.root.iterdir())
        except OSError as exc:
            raise UsageError(f"cannot read model store {self.root}: {exc.strerror or exc}") from exc
        return sorted(p.name for p in entries if is_safe_name(p.name) and p.is_dir() and not p.is_symlink())

    def state(self, name: str) -> ModelState:
        """The active/previous versions of model `name` (both None when never activated)."""
        path = self._model_dir(name) / STATE_FILE
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return ModelState(active=None)
        except OSError as exc:
            raise BundleError(f"model store: {path} is unreadable: {exc.strerror or exc}") from exc
        return parse_state(raw, str(path))

    def write_state(self, name: str, state: ModelState) -> None:
        """Write `name`'s state.json atomically, under the store lock."""
        for version in (state.active, state.previous):
            if version is not None:
                _check_name(version, "version")
        with self.lock():
            folder = self._model_dir(name)
            if not folder.is_dir():
                raise NotFoundError(f"model '{name}' is not installed")
            atomic_write(folder / STATE_FILE, state.to_json(), mode=PUBLIC_MODE)

    def activate(self, name: str, version: str) -> ModelState:
        """Make an installed version the active one; the formerly active one becomes `previous`."""
        with self.lock():
            if not self.bundle_path(name, version).is_file():
                raise NotFoundError(f"model '{name}' version '{version}' is not installed")
            current = self.state(name)
            if current.active == version:
                return current
            new = ModelState(active=version, previous=current.active)
            self.write_state(name, new)
        log.info("activated %s %s (previous: %s)", name, version, current.active)
        return new

    def rollback(self, name: str) -> str:
        """Make the previous version active again (the current one becomes previous); returns it."""
        with self.lock():
            current = self.state(name)
            if current.previous is None:
                raise NotFoundError(f"model '{name}' has no previous version to roll back to")
            if not self.bundle_path(name, current.previous).is_file():
                raise NotFoundError(
                    f"model '{name}' previous version '{current.previous}' is no longer installed"
                )
            self.write_state(name, ModelState(active=current.previous, previous=current.active))
        log.info("rolled %s back from %s to %s", name, current.active, current.previous)
        return current.previous

    def remove(self, name: str, version: str) -> None:
        """Delete an installed version that is neither active nor previous."""
        with self.lock():
            current = self.state(name)
            if version in (current.active, current.previous):
                raise UsageError(f"model '{name}' version '{version}' is in use ({current}); not removing it")
            path = self.bundle_path(name, version)
            if not path.is_file():
                raise NotFoundError(f"model '{name}' version '{version}' is not installed")
            shutil.rmtree(path.parent)
            _fsync_dir(path.parent.parent)
        log.info("removed %s %s", name, version)

    def active(self) -> dict[str, str]:
        """Model name -> active version, for every model whose state is readable and has one."""
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
