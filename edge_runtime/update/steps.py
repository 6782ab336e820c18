"""The work behind each state of the install machine, over the model store and the registry.

Every handler is idempotent (a restart re-runs the state it was in): installing an installed
bundle is a no-op, activating the active version is a no-op, a swap is skipped when the registry
already serves the version. Every write to the store goes through `store_writes`, and so does
every swap that follows one: the daemon's SIGHUP reload holds the same lock, so it never reads a
state the update is about to serve differently (nor swaps in a version the update just left).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

from edge_runtime.artifact.bundle import read_bundle
from edge_runtime.codecs.update_payloads import Offer
from edge_runtime.core.errors import BundleError, EdgeError, NotFoundError, UsageError
from edge_runtime.core.files import atomic_write
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import DIGEST_FILE, ModelStore, check_compatible
from edge_runtime.update.encoding import apply_delta
from edge_runtime.update.journal import Journal
from edge_runtime.update.machine import Event, Handler, Interrupted, Job, State

__all__ = ["FREE_SPACE_MARGIN", "InstallSteps", "check_offer", "store_writes"]

log = logging.getLogger(__name__)

FREE_SPACE_MARGIN = 16 << 20
"""Bytes the store keeps free beyond what an update needs."""
Outcome = tuple[Event, str]
OK: Outcome = (Event.SUCCESS, "")


@contextlib.contextmanager
def store_writes(store: ModelStore) -> Iterator[None]:
    """Hold the store's writer lock (an flock shared with the CLI and SIGHUP reloads) around writes."""
    with store.lock():
        yield


def check_offer(
    store: ModelStore, offer: Offer, running: dict[str, str], *, reserve_bytes: int = FREE_SPACE_MARGIN
) -> None:
    """Refuse an offer before anything is written: unknown model, busy model, no space, bad base."""
    versions = store.versions(offer.model)
    if not versions and not offer.new_model:
        raise NotFoundError(
            f"model '{offer.model}' is not on this device; offer it as a new model "
            "(edgectl flash --new) to install a first version"
        )
    if offer.model in running:
        raise UsageError(
            f"an update of model '{offer.model}' is already running (job {running[offer.model]})"
        )
    needed = offer.payload_size + 2 * offer.size + reserve_bytes
    free = shutil.disk_usage(store.root).free
    if free < needed:
        raise BundleError(f"the update needs {needed} bytes in the model store, {free} are free")
    if offer.version in versions and store.bundle_sha256(offer.model, offer.version) != offer.sha256:
        raise BundleError(
            f"{offer.model} version {offer.version} is already installed with other content; "
            "a version is immutable, give the new bundle a new version"
        )
    if offer.delta is not None:
        base = offer.delta.base_version
        if base not in versions or store.bundle_sha256(offer.model, base) != offer.delta.base_sha256:
            raise NotFoundError(
                f"the delta's base {offer.model} {offer.delta.base_version} is not installed with "
                "the bytes it was made against; offer the full bundle"
            )


def serving_version(registry: ModelRegistry, name: str) -> str | None:
    """The version of `name` the registry serves now, or None."""
    try:
        return registry.get(name).version
    except EdgeError:
        return None


class InstallSteps:
    """The state handlers of the install machine."""

    def __init__(
        self,
        store: ModelStore,
        registry: ModelRegistry,
        journal: Journal,
        *,
        download: Callable[[Job], None],
        model_stats: Callable[[str], dict[str, Any] | None],
        stopping: threading.Event,
    ) -> None:
        self.store, self.registry, self.journal = store, registry, journal
        self.download = download
        self.model_stats = model_stats
        self.stopping = stopping

    def handlers(self) -> dict[State, Handler]:
        """State -> handler, for `run_job`."""
        return {
            State.OFFERED: self.offered,
            State.DOWNLOADING: self.downloading,
            State.VERIFYING: self.verifying,
            State.INSTALLING: self.installing,
            State.TRIAL: self.trial,
            State.COMMITTING: self.committing,
            State.PROBATION: self.probation,
            State.ROLLING_BACK: self.rolling_back,
        }

    def offered(self, job: Job) -> Outcome:
        """Note what runs now (the rollback target); nothing to do if the offered version runs already."""
        offer = job.offer
        job.from_version = self.store.state(offer.model).active
        job.preinstalled = offer.version in self.store.versions(offer.model)
        if job.from_version == offer.version and serving_version(self.registry, offer.model) == offer.version:
            job.reason = f"version {offer.version} is already active"
            return Event.NOTHING_TO_DO, job.reason
        return OK

    def downloading(self, job: Job) -> Outcome:
        """Pull every missing payload block into the part file."""
        self.download(job)
        return OK

    def verifying(self, job: Job) -> Outcome:
        """Rebuild the bundle from the payload; check sizes, sha256, signature, name, profile."""
        offer = job.offer
        payload = self.journal.part_path(job.id).read_bytes()
        if len(payload) != offer.payload_size or hashlib.sha256(payload).hexdigest() != offer.payload_sha256:
            return Event.FAILURE, "the payload does not match the sha256 in the offer"
        bundle = payload
        if offer.delta is not None:
            base = self.store.bundle_path(offer.model, offer.delta.base_version).read_bytes()
            bundle = apply_delta(base, payload, offer.delta.format, max_size=offer.size)
        if len(bundle) != offer.size or hashlib.sha256(bundle).hexdigest() != offer.sha256:
            return Event.FAILURE, "the rebuilt bundle does not match the size and sha256 in the offer"
        path = self.journal.bundle_path(job.id)
        atomic_write(path, bundle)
        public_key, device_profile = self.store.verifier()
        manifest = read_bundle(path, public_key).manifest
        if (manifest.name, manifest.version) != (offer.model, offer.version):
            return Event.FAILURE, f"the bundle holds {manifest.name} {manifest.version}, not what was offered"
        with zipfile.ZipFile(path) as archive:
            if archive.read("manifest.sig").hex() != offer.signature:
                return Event.FAILURE, "the bundle's signature is not the one in the offer"
        check_compatible(manifest, device_profile)
        return OK

    def installing(self, job: Job) -> Outcome:
        """Copy the verified bundle into the store as an inactive version."""
        with store_writes(self.store):
            self.store.install(self.journal.bundle_path(job.id))
        return OK

    def trial(self, job: Job) -> Outcome:
        """Load the installed version and run its golden inputs, without serving it."""
        loaded = self.registry.load(self.store.open(job.model, job.offer.version))
        loaded.backend.close()
        return OK

    def committing(self, job: Job) -> Outcome:
        """Activate the new version, then hot-swap it in (the new model loads before the old goes)."""
        version = job.offer.version
        with store_writes(self.store):  # a SIGHUP reload (under the same lock) sees both or neither
            self.store.activate(job.model, version)
            if serving_version(self.registry, job.model) != version:
                self.registry.swap(job.model, self.store.open(job.model, version))
        return OK

    def probation(self, job: Job) -> Outcome:
        """Watch the new version's error rate and latency for the offer's window."""
        rules = job.offer.probation
        if rules is None:
            return OK
        deadline = time.monotonic() + rules.seconds
        while time.monotonic() < deadline:
            if self.stopping.wait(0.1):
                raise Interrupted("the daemon is stopping")
            if serving_version(self.registry, job.model) != job.offer.version:
                return Event.FAILURE, "another version replaced this one during probation"
            verdict = self._judge(job)
            if verdict:
                return Event.FAILURE, verdict
        return OK

    def _judge(self, job: Job) -> str:
        """Why the new version fails probation now ('' when it does not)."""
        rules = job.offer.probation
        stats = self.model_stats(job.model)
        if rules is None or not stats or stats.get("version") != job.offer.version:
            return ""
        requests, errors = int(stats.get("requests", 0)), int(stats.get("errors", 0))
        if requests < rules.min_requests:
            return ""
        if errors / requests > rules.max_error_rate:
            return f"error rate {errors}/{requests} is over {rules.max_error_rate:g}"
        p95 = (stats.get("latency_ms") or {}).get("p95")
        if rules.max_p95_ms is not None and p95 is not None and p95 > rules.max_p95_ms:
            return f"p95 latency {p95:g} ms is over {rules.max_p95_ms:g} ms"
        return ""

    def rolling_back(self, job: Job) -> Outcome:
        """Return store and registry to the version that ran before; drop a version that never served."""
        name, version, before = job.model, job.offer.version, job.from_version
        with store_writes(self.store):
            if self.store.state(name).active == version:
                if before is None or before == version:
                    return (
                        Event.FAILURE,
                        f"{name} {version} is the model's first version: nothing to return to",
                    )
                self.store.activate(name, before)
            if before is not None and serving_version(self.registry, name) != before:
                self.registry.swap(name, self.store.open(name, before))
            state = self.store.state(name)
            if not job.preinstalled and version not in (state.active, state.previous):
                _remove_version(self.store, name, version)
        return OK


def _remove_version(store: ModelStore, name: str, version: str) -> None:
    """Delete an installed version that never served (its trial failed)."""
    path = store.bundle_path(name, version)
    path.unlink(missing_ok=True)
    path.with_name(DIGEST_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()
    log.info("removed %s %s from the store (it never served)", name, version)
