"""The device's update service: offers in, jobs through the machine, blocks to their receivers, reports out.

One thread per running job (at most one job per model); the verify-to-commit steps of all jobs
take turns, so two trials never load at once. Unfinished jobs in the journal resume at start.
Anything that belongs to no running job (a malformed offer, a block for a finished or unknown
job, a refused offer) is answered on ``update/error``; the retained ``update/state/<model>``
carries only the states of accepted jobs, so a refused offer never hides a running one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_runtime.codecs.update_payloads import (
    MAX_OFFER_BYTES,
    Command,
    CommandOp,
    decode_block,
    decode_command,
    decode_offer,
    decode_update_json,
    encode_json,
)
from edge_runtime.config.settings import UpdateSettings
from edge_runtime.core.errors import EdgeError, UpdateError, UsageError
from edge_runtime.serving.registry import ModelRegistry
from edge_runtime.state.store import ModelStore
from edge_runtime.transports.mqtt.update import UpdateChannel
from edge_runtime.update.encoding import max_wire_bytes
from edge_runtime.update.journal import Journal
from edge_runtime.update.machine import STATES, TERMINAL, Handler, Interrupted, Job, State, run_job
from edge_runtime.update.steps import (
    InstallSteps,
    check_offer,
    serving_version,
    store_writes,
)
from edge_runtime.update.transfer import BlockReceiver

__all__ = ["TransferSettings", "UpdateService"]

log = logging.getLogger(__name__)

_REMEMBER_FINISHED = 256
_ERRORS_PER_JOB = 5
CANCEL_REASON = "cancelled by operator"
CANCELLABLE = frozenset({State.OFFERED, State.DOWNLOADING, State.VERIFYING})
"""States a cancel can end a job in: nothing of it is in the store yet (verifying writes only its journal)."""
CANCEL_WAIT_S = 5.0
"""Error reports about one job id at most (a flood of stray blocks costs a few messages)."""


TransferSettings = UpdateSettings
"""The transfer knobs are the device config's ``[update]`` table (`config.settings.UpdateSettings`)."""


class UpdateService:
    """Model updates over MQTT for one daemon."""

    def __init__(
        self,
        store: ModelStore,
        registry: ModelRegistry,
        channel: UpdateChannel,
        *,
        model_stats: Callable[[str], dict[str, Any] | None],
        transfer: UpdateSettings | None = None,
        wrap_handlers: Callable[[dict[State, Handler]], dict[State, Handler]] | None = None,
    ) -> None:
        self.store, self.registry, self.channel = store, registry, channel
        self.journal = Journal(store.root)
        self.transfer = transfer or UpdateSettings()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._install_turn = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._by_model: dict[str, str] = {}
        self._receivers: dict[str, BlockReceiver] = {}
        self._cancelled: set[str] = set()
        self._job_threads: dict[str, threading.Thread] = {}
        self._threads: list[threading.Thread] = []
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._error_counts: collections.Counter[str] = collections.Counter()
        steps = InstallSteps(store, registry, self.journal, download=self._download,
                             model_stats=model_stats, stopping=self._stopping)  # fmt: skip
        guarded = {state: self._unless_stopping(handler) for state, handler in steps.handlers().items()}
        handlers = self._take_turns(guarded)
        self.handlers = wrap_handlers(handlers) if wrap_handlers else handlers

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe, then resume every unfinished job of the journal."""
        self.channel.attach(on_offer=self.on_offer, on_block=self.on_block,
                            on_command=self.on_command, on_connected=self.on_connected)  # fmt: skip
        for job in self.journal.load_all():
            if job.state in TERMINAL:
                self._remember(job)
            elif job.model in self._by_model:
                log.error("update %s: another job of %s is unfinished; failing this one", job.id, job.model)
            else:
                log.info("update %s: resuming %s %s in %s", job.id, job.model, job.offer.version, job.state)
                self._launch(job)

    def stop(self, timeout: float = 10.0) -> None:
        """Interrupt the jobs (they stay in the journal and resume at next start) and join their threads."""
        self._stopping.set()
        with self._lock:
            receivers = list(self._receivers.values())
        for receiver in receivers:
            receiver.abort("the daemon is stopping")
        for thread in self._threads:
            thread.join(timeout)

    def jobs(self) -> list[Job]:
        """The running jobs."""
        with self._lock:
            return list(self._jobs.values())

    # -- incoming (MQTT worker threads) --------------------------------------------------------
    def on_offer(self, raw: bytes) -> None:
        """Accept an offer (start its job) or answer why not on ``update/error``."""
        job_id = model = None
        try:
            doc = decode_update_json(raw, max_bytes=MAX_OFFER_BYTES)
            job_id = doc.get("job") if isinstance(doc.get("job"), str) else None
            model = doc.get("model") if isinstance(doc.get("model"), str) else None
            offer = decode_offer(doc)
            with self._lock:
                known = self._jobs.get(offer.job) or self._finished.get(offer.job)
                if known is not None:  # the host offered again (no report reached it): say where it stands
                    self._report(known)
                    return
                check_offer(self.store, offer, self._by_model, reserve_bytes=self.transfer.reserve_bytes)
                job = Job(offer)
                self._launch_locked(job)
        except EdgeError as exc:
            self._error(job_id, model, f"offer refused: {exc}")

    def on_block(self, job_id: str, raw: bytes) -> None:
        """Hand a block to its job's receiver; a stray block gets an error report."""
        with self._lock:
            receiver = self._receivers.get(job_id)
            finished = self._finished.get(job_id)
            running = job_id in self._jobs
        if receiver is None:
            if finished is not None:
                self._error(
                    job_id, finished.model, f"block for job {job_id}, which is {finished.state.value}"
                )
            elif not running:
                self._error(job_id, None, f"block for job {job_id}, which this device does not know")
            return  # (a late duplicate for a job past downloading is dropped quietly)
        offer = receiver.offer
        try:
            index, data = decode_block(raw, max_bytes=max_wire_bytes(offer.block_size, offer.compression))
            receiver.receive(index, data)
        except EdgeError as exc:
            self._error(job_id, offer.model, str(exc))

    def on_command(self, raw: bytes) -> None:
        """Answer ``models``, ``rollback`` or ``cancel`` on the command's reply topic."""
        try:
            command = decode_command(raw)
        except EdgeError as exc:
            self._error(None, None, f"command refused: {exc}")
            return
        try:
            if command.op is CommandOp.MODELS:
                answer: dict[str, Any] = {"models": self.models()}
            elif command.op is CommandOp.CANCEL:
                answer = self._cancel(command)
            else:
                answer = self._rollback(command)
            reply = encode_json({"op": command.op.value, "ok": True, **answer})
        except EdgeError as exc:
            reply = encode_json({"op": command.op.value, "ok": False, "error": str(exc)})
        self.channel.reply(command.token, reply)

    def on_connected(self) -> None:
        """On paho's thread after a (re)connect: every download asks for its window again."""
        for receiver in list(self._receivers.values()):
            receiver.wake()

    # -- jobs --------------------------------------------------------------------------------------
    def _launch(self, job: Job) -> None:
        with self._lock:
            self._launch_locked(job)

    def _launch_locked(self, job: Job) -> None:
        self._jobs[job.id] = job
        self._by_model[job.model] = job.id
        thread = threading.Thread(target=self._run, args=(job,), name=f"update-{job.id}", daemon=True)
        self._job_threads[job.id] = thread
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _run(self, job: Job) -> None:
        try:
            run_job(job, self.handlers, self.journal.save, self._report)
        except Interrupted:
            log.info("update %s interrupted in %s; it resumes at next start", job.id, job.state.value)
            return
        except Exception:  # the journal cannot be written (disk full...): the job resumes at next start
            log.exception("update %s stopped in %s", job.id, job.state.value)
            return
        finally:
            with self._lock:
                self._jobs.pop(job.id, None)
                self._job_threads.pop(job.id, None)
                self._cancelled.discard(job.id)
                if self._by_model.get(job.model) == job.id:
                    del self._by_model[job.model]
        self.journal.finish(job)
        with self._lock:
            self._remember(job)

    def _remember(self, job: Job) -> None:
        self._finished[job.id] = job
        while len(self._finished) > _REMEMBER_FINISHED:
            self._finished.popitem(last=False)

    def _unless_stopping(self, handler: Handler) -> Handler:
        """A handler that does not start once the daemon stops (the job resumes at next start) or,
        before anything is installed, once the job was cancelled (it fails)."""

        def run(job: Job) -> Any:
            if self._stopping.is_set():
                raise Interrupted("the daemon is stopping")
            if job.id in self._cancelled and job.state in CANCELLABLE:
                raise UpdateError(CANCEL_REASON)
            return handler(job)

        return run

    def _take_turns(self, handlers: dict[State, Handler]) -> dict[State, Handler]:
        """Verify-to-rollback steps of all jobs run one at a time (downloads run side by side)."""

        def turn(handler: Handler) -> Handler:
            def run(job: Job) -> Any:
                with self._install_turn:
                    return handler(job)

            return run

        parallel = {State.OFFERED, State.DOWNLOADING, State.PROBATION}
        return {state: h if state in parallel else turn(h) for state, h in handlers.items()}

    def _download(self, job: Job) -> None:
        settings = self.transfer
        receiver = BlockReceiver(
            job, self.journal.part_path(job.id),
            request=lambda payload: self.channel.request_blocks(job.id, payload),
            progress=self._report,
            window=settings.window, save_bytes=settings.save_bytes,
            stall_s=settings.stall_s, give_up_s=settings.give_up_s,
        )  # fmt: skip
        with self._lock:
            if self._stopping.is_set():
                raise Interrupted("the daemon is stopping")
            self._receivers[job.id] = receiver
        try:
            receiver.run()
        finally:
            with self._lock:
                self._receivers.pop(job.id, None)

    # -- reports -------------------------------------------------------------------------------------
    def _report(self, job: Job) -> None:
        info = STATES[job.state]
        doc: dict[str, Any] = {
            "job": job.id, "model": job.model, "version": job.offer.version, "state": info.report_as,
            "from_version": job.from_version, "ts": round(time.time(), 3),
        }  # fmt: skip
        if job.state is State.DOWNLOADING:
            receiver = self._receivers.get(job.id)
            done = sum(bin(byte).count("1") for byte in job.have)
            doc["percent"] = receiver.percent if receiver else 100 * done // max(1, job.offer.blocks)
        if job.blocks:
            doc["blocks"] = dict(job.blocks)
        if job.reason and job.state is not State.COMMITTED:
            doc["reason"] = job.reason
        try:
            self.channel.report_state(job.model, encode_json(doc))
        except EdgeError as exc:
            log.warning("update %s: state report not sent: %s", job.id, exc)

    def _error(self, job_id: str | None, model: str | None, message: str) -> None:
        key = job_id or ""
        if len(self._error_counts) > 4096:  # many distinct stray job ids: forget, stay bounded
            self._error_counts.clear()
        self._error_counts[key] += 1
        if self._error_counts[key] > _ERRORS_PER_JOB:
            return
        log.warning("update: %s", message)
        payload = encode_json({"job": job_id, "model": model, "error": message, "ts": round(time.time(), 3)})
        try:
            self.channel.report_error(payload)
        except EdgeError as exc:
            log.warning("update error report not sent: %s", exc)

    # -- commands --------------------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        """What the device has: per model active, previous, serving, each version's sha256 and role."""
        result: dict[str, Any] = {}
        with self._lock:
            running = {job.model: job for job in self._jobs.values()}
            last = {job.model: job for job in self._finished.values()}
        for name in self.store.models():
            try:
                state = self.store.state(name)
            except EdgeError as exc:
                result[name] = {"error": str(exc)}
                continue
            versions = {}
            for version in self.store.versions(name):
                path = self.store.bundle_path(name, version)
                role = (
                    "active"
                    if version == state.active
                    else "previous"
                    if version == state.previous
                    else "installed"
                )
                versions[version] = {"role": role, "size": path.stat().st_size,
                                     "sha256": self.store.bundle_sha256(name, version)}  # fmt: skip
            job = running.get(name) or last.get(name)
            update = None if job is None else {"job": job.id, "version": job.offer.version,
                                               "state": STATES[job.state].report_as, "reason": job.reason}  # fmt: skip
            result[name] = {"active": state.active, "previous": state.previous,
                            "serving": serving_version(self.registry, name), "versions": versions, "update": update}  # fmt: skip
        return result

    def _rollback(self, command: Command) -> dict[str, Any]:
        name = str(command.model)
        with self._lock:
            if name in self._by_model:
                raise UsageError(
                    f"an update of '{name}' is running (job {self._by_model[name]}); try when it ends"
                )
        with self._install_turn, store_writes(self.store):
            before = self.store.state(name)
            target = self.store.rollback(name)
            try:
                self.registry.swap(name, self.store.open(name, target))
            except EdgeError:
                self.store.rollback(name)  # back to what serves
                raise
        report = {"job": None, "model": name, "version": target, "state": "rolled_back",
                  "from_version": before.active, "reason": "operator rollback", "ts": round(time.time(), 3)}  # fmt: skip
        self.channel.report_state(name, encode_json(report))
        return {"model": name, "active": target, "previous": before.active}

    def _cancel(self, command: Command) -> dict[str, Any]:
        """End the model's running update as failed, if nothing of it is installed yet; wait for the end."""
        name = str(command.model)
        with self._lock:
            job = self._jobs.get(self._by_model.get(name, ""))
            if job is None:
                raise UsageError(f"no update of '{name}' is running")
            if job.state not in CANCELLABLE:
                raise UsageError(
                    f"the update of '{name}' (job {job.id}) is {STATES[job.state].report_as}, too far to "
                    "cancel; wait for its end (`edgectl rollback` returns to the previous version)"
                )
            self._cancelled.add(job.id)
            receiver = self._receivers.get(job.id)
            thread = self._job_threads.get(job.id)
        if receiver is not None:
            receiver.abort(CANCEL_REASON, cancel=True)
        if thread is not None:
            thread.join(CANCEL_WAIT_S)
        if job.state is not State.FAILED or CANCEL_REASON not in job.reason:
            raise UsageError(
                f"job {job.id} of '{name}' went on to {STATES[job.state].report_as} before the cancel"
            )
        log.info("update %s of %s %s cancelled by the operator", job.id, name, job.offer.version)
        return {
            "model": name,
            "job": job.id,
            "version": job.offer.version,
            "state": "failed",
            "reason": job.reason,
        }
