"""The loaded models: load, self-test, swap without a serving gap, look up by name and version."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.artifact.bundle import Bundle
from edge_runtime.artifact.manifest import Manifest
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import EdgeError, ModelError, NotFoundError, UnavailableError, UsageError
from edge_runtime.engines import Backend, load_backend
from edge_runtime.engines.selftest import run_selftest
from edge_runtime.state.store import ModelStore

__all__ = ["LoadFailure", "LoadedModel", "ModelRegistry", "ReloadReport"]

_MAX_REASON = 500
"""Longest refusal reason kept (health bodies and events carry it)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """One model serving requests: its manifest and the backend that runs it."""

    manifest: Manifest
    backend: Backend
    selftest_cases: int = 0
    loaded_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        """The model's name."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The model's version."""
        return self.manifest.version

    def predict(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the backend on already validated feeds."""
        return self.backend.run(feeds)


@dataclass(frozen=True)
class LoadFailure:
    """A model that was refused, and why."""

    name: str
    version: str
    reason: str


@dataclass(frozen=True)
class ReloadReport:
    """What one pass over the store changed."""

    loaded: tuple[tuple[str, str], ...]
    """(model, version) newly serving."""
    unloaded: tuple[tuple[str, str], ...]
    refused: tuple[LoadFailure, ...]
    unchanged: tuple[str, ...]

    def summary(self) -> str:
        """One log line: what was loaded, unloaded and refused."""
        parts = [
            "loaded " + ", ".join(f"{n} {v}" for n, v in self.loaded) if self.loaded else "",
            "unloaded " + ", ".join(f"{n} {v}" for n, v in self.unloaded) if self.unloaded else "",
            "refused " + ", ".join(f"{f.name} {f.version}" for f in self.refused) if self.refused else "",
        ]
        changes = "; ".join(part for part in parts if part)
        return f"{changes or 'no change'} ({len(self.unchanged)} unchanged)"


class ModelRegistry:
    """The models this device serves, several at once; every method is thread-safe."""

    def __init__(self, profile: DeviceProfile, *, threads: int | None = None) -> None:
        self.profile = profile
        self.threads = threads
        self._lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._failures: dict[str, LoadFailure] = {}
        self._loaded_once = threading.Event()
        self._sync_lock = threading.Lock()
        """One load_all/reload at a time (SIGHUP may arrive while one runs)."""

    def load(self, bundle: Bundle) -> LoadedModel:
        """Load a verified bundle and run its self-test; ModelError if either fails (nothing is kept)."""
        manifest = bundle.manifest
        backend = load_backend(manifest, bundle.model_bytes, self.profile, threads=self.threads)
        cases = bundle.golden_cases() if manifest.golden else []
        if manifest.golden is not None:
            result = run_selftest(backend.run, cases, manifest.golden)
            if not result.passed:
                backend.close()
                raise ModelError(f"{manifest.name} {manifest.version}: self-test failed: {result.reason}")
        return LoadedModel(manifest=manifest, backend=backend, selftest_cases=len(cases))

    def swap(self, name: str, bundle: Bundle) -> LoadedModel:
        """Load and self-test `bundle`, then replace the model serving as `name`; on failure the old one stays."""
        if bundle.manifest.name != name:
            raise UsageError(f"bundle holds model '{bundle.manifest.name}', not '{name}'")
        new = self.load(bundle)
        with self._lock:
            old = self._models.get(name)
            self._models[name] = new
            self._failures.pop(name, None)
            self._loaded_once.set()
        # The old backend is not closed: a request that already holds it finishes on it, and the
        # engine is released when the last reference goes.
        log.info("serving %s %s (was: %s)", name, new.version, old.version if old else "nothing")
        return new

    def load_all(self, store: ModelStore) -> list[LoadFailure]:
        """Load every active bundle of `store`; each failure is refused and reported, the rest serve.

        Never raises for what is in the store: any exception while loading one model (a hostile
        bundle, an odd state.json, MemoryError, OSError) refuses that model with the reason.
        """
        return list(self._sync(store, unload=False).refused)

    def reload(self, store: ModelStore) -> ReloadReport:
        """Bring the served models in line with `store`: load new or changed active versions (each
        swapped in without a gap), unload models no longer active; a version that fails to load
        leaves the one serving untouched."""
        report = self._sync(store, unload=True)
        log.info("reloaded the model store: %s", report.summary())
        return report

    def _sync(self, store: ModelStore, *, unload: bool) -> ReloadReport:
        with self._sync_lock:
            loaded: list[tuple[str, str]] = []
            refused: list[LoadFailure] = []
            unchanged: list[str] = []
            try:
                names = store.models()
            except Exception as exc:
                refused.append(self._refuse(str(store.root), "", exc, record=False))
                names = []
            seen: set[str] = set()
            for name in names:
                version = "?"
                try:
                    version = store.state(name).active or ""
                    if not version:
                        continue
                    seen.add(name)
                    current = self._models.get(name)
                    if current is not None and current.version == version:
                        unchanged.append(name)
                        continue
                    self.swap(name, store.open(name, version))
                    loaded.append((name, version))
                except Exception as exc:  # one bad file refuses one model, never the caller
                    seen.add(name)
                    refused.append(self._refuse(name, version, exc))
            unloaded = self._drop_all_but(seen) if unload else []
            self._loaded_once.set()
            return ReloadReport(tuple(loaded), tuple(unloaded), tuple(refused), tuple(unchanged))

    def _refuse(self, name: str, version: str, exc: BaseException, *, record: bool = True) -> LoadFailure:
        """Log and record why `name` is not serving (kept serving if an older version already is)."""
        reason = str(exc) if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"
        failure = LoadFailure(name=name, version=version, reason=reason[:_MAX_REASON])
        log.error("refused model %s %s: %s", name, version, failure.reason)
        log.debug("refusal of %s %s", name, version, exc_info=exc)
        if record:
            with self._lock:
                if name not in self._models:
                    self._failures[name] = failure
        return failure

    def _drop_all_but(self, keep: set[str]) -> list[tuple[str, str]]:
        """Unload every model (and forget every refusal) whose name is not in `keep`."""
        with self._lock:
            gone = [self._models.pop(name) for name in sorted(set(self._models) - keep)]
            for name in set(self._failures) - keep:
                del self._failures[name]
        for model in gone:
            log.info("unloaded %s %s (no longer active in the store)", model.name, model.version)
        return [(model.name, model.version) for model in gone]

    def unload(self, name: str) -> None:
        """Stop serving `name` (NotFoundError if it is not loaded)."""
        with self._lock:
            model = self._models.pop(name, None)
        if model is None:
            raise NotFoundError(f"model '{name}' is not loaded")
        log.info("unloaded %s %s", name, model.version)

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The model serving as `name` (at `version` if given); NotFoundError or UnavailableError."""
        model = self._models.get(name)
        if model is None:
            failure = self._failures.get(name)
            if failure is not None:
                raise UnavailableError(f"model '{name}' is not serving: {failure.reason}")
            raise NotFoundError(f"model '{name}' is not loaded")
        if version is not None and version != model.version:
            raise NotFoundError(
                f"model '{name}' version '{version}' is not loaded (serving '{model.version}')"
            )
        return model

    def models(self) -> list[LoadedModel]:
        """Every model serving now, sorted by name."""
        with self._lock:
            return [self._models[name] for name in sorted(self._models)]

    def failures(self) -> list[LoadFailure]:
        """Models refused at load and not serving, sorted by name."""
        with self._lock:
            return [self._failures[name] for name in sorted(self._failures)]

    @property
    def ready(self) -> bool:
        """True once the first load (load_all or swap) has finished."""
        return self._loaded_once.is_set()
