"""Helpers for the update tests: a device made of a real store and registry, blocks fed without a broker,
and crash / failure injection around the real state handlers (after Mender's state_test.cpp)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import queue
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.client.flash import Prepared, _cut
from edge_runtime.codecs.update_payloads import Compression, Offer, decode_block_request
from edge_runtime.config.profiles import DeviceProfile
from edge_runtime.core.errors import RequestError
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelStore
from edge_runtime.update.journal import Journal
from edge_runtime.update.machine import Event, Handler, Interrupted, Job, State
from edge_runtime.update.steps import InstallSteps
from edge_runtime.update.transfer import BlockReceiver


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs, only what is on disk survives."""


NORMAL = [State.OFFERED, State.DOWNLOADING, State.VERIFYING, State.INSTALLING, State.TRIAL,
          State.COMMITTING, State.PROBATION, State.COMMITTED]  # fmt: skip


def failed_at(state: State) -> list[State]:
    """The chain of a job that fails in `state` before anything was activated."""
    return [*NORMAL[: NORMAL.index(state) + 1], State.FAILED]


def rolled_back_at(state: State) -> list[State]:
    """The chain of a job rolled back after failing in `state`."""
    return [*NORMAL[: NORMAL.index(state) + 1], State.ROLLING_BACK, State.ROLLED_BACK]


@dataclass
class Device:
    """What a daemon builds at start from its store folder (a fresh one after every 'kill')."""

    store: ModelStore
    registry: ModelRegistry
    journal: Journal

    @classmethod
    def boot(cls, root: Path, public_key: object, profile: DeviceProfile) -> Device:
        store = ModelStore(root, public_key, profile)  # type: ignore[arg-type]
        registry = ModelRegistry(profile)
        registry.load_all(store)
        return cls(store, registry, Journal(root))

    def serving(self, name: str = "mlp") -> str | None:
        try:
            return self.registry.get(name).version
        except Exception:
            return None


@dataclass
class Feeder:
    """Serves a job's blocks from memory on a thread of its own (as a host through a broker would),
    in the order they are asked for; counts what it sent."""

    prepared: Prepared
    sent: list[int] = field(default_factory=list)
    kill_after: int | None = None
    """Stop serving and 'kill' the daemon once this many blocks were handed over (mid-download kill)."""

    def download(self, device: Device, window: int = 4) -> Callable[[Job], None]:
        def run(job: Job) -> None:
            asked: queue.Queue[bytes | None] = queue.Queue()
            receiver = BlockReceiver(job, device.journal.part_path(job.id), request=asked.put,
                                     window=window, stall_s=2.0, give_up_s=10.0,
                                     save_bytes=window * self.prepared.offer.block_size)  # fmt: skip
            killed = threading.Event()

            def serve() -> None:
                while (raw := asked.get()) is not None:
                    for index in decode_block_request(raw).indices():
                        if self.kill_after is not None and len(self.sent) >= self.kill_after:
                            self.kill_after = None
                            killed.set()
                            receiver.abort("killed")  # nothing the receiver does after this is saved
                            return
                        self.sent.append(index)
                        with contextlib.suppress(RequestError):
                            receiver.receive(index, self.prepared.blocks[index])

            server = threading.Thread(target=serve, daemon=True)
            server.start()
            try:
                receiver.run()
            except Interrupted:
                if killed.is_set():
                    raise Killed from None
                raise
            finally:
                asked.put(None)
                server.join(10)

        return run


def handlers(
    device: Device,
    feeder: Feeder,
    *,
    fail_in: frozenset[State] = frozenset(),
    crash_in: State | None = None,
    crash_after: bool = False,
    model_stats: Callable[[str], dict | None] = lambda name: None,
) -> dict[State, Handler]:
    """The real handlers; `fail_in` states do their work then report failure; `crash_in` is killed once."""
    steps = InstallSteps(device.store, device.registry, device.journal, download=feeder.download(device),
                         model_stats=model_stats, stopping=threading.Event())  # fmt: skip
    real = steps.handlers()
    crashed = [False]

    def wrap(state: State, handler: Handler) -> Handler:
        def run(job: Job) -> tuple[Event, str]:
            if state is crash_in and not crashed[0] and not crash_after:
                crashed[0] = True
                raise Killed
            outcome = handler(job)
            if state is crash_in and not crashed[0]:
                crashed[0] = True
                raise Killed
            if state in fail_in:
                return Event.FAILURE, f"injected failure in {state.value}"
            return outcome

        return run

    return {state: wrap(state, handler) for state, handler in real.items()}


def hostile_offer(
    bundle: bytes, *, signature: str = "ab" * 64, block_size: int = 4096, job: str = "hostile"
) -> Prepared:
    """An offer a hostile or broken host could send: any bytes, any signature, digests that match them."""
    offer = Offer(job=job, model="mlp", version="2", size=len(bundle), sha256=hashlib.sha256(bundle).hexdigest(),
                  signature=signature, payload_size=len(bundle), payload_sha256=hashlib.sha256(bundle).hexdigest(),
                  block_size=block_size,
                  block_sha256=tuple(hashlib.sha256(b).hexdigest() for b in _cut(bundle, block_size)),
                  compression=Compression.NONE)  # fmt: skip
    return Prepared(offer, tuple(_cut(bundle, block_size)))


def without_member(bundle: bytes, member: str) -> bytes:
    """The bundle zip with one member left out."""
    return rewrite_member(bundle, member, None)


def rewrite_member(bundle: bytes, member: str, change: Callable[[bytes], bytes] | None) -> bytes:
    """The bundle zip with one member changed by `change` (None: left out); the manifest is kept."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(bundle)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == member:
                if change is None:
                    continue
                data = change(data)
            target.writestr(info, data)
    return out.getvalue()


def signature_of(bundle: bytes) -> str:
    """Hex of the bundle's manifest.sig."""
    with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
        return archive.read("manifest.sig").hex()
