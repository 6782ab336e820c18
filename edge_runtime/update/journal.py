"""The update journal: one JSON file per job, written atomically before every step.

Layout, inside the model store (a folder name the store never takes for a model)::

    <store>/.updates/<job>.json        the job (offer, state, which blocks are on disk, history)
    <store>/.updates/<job>.part        the payload as it arrives (blocks written at their offset)
    <store>/.updates/<job>.edgebundle  the bundle rebuilt from the payload, before installing

A journal file that cannot be read is moved aside (``.bad``) and named in the log: one bad file
costs one job, never the daemon.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from edge_runtime.core.errors import EdgeError
from edge_runtime.core.files import atomic_write
from edge_runtime.update.machine import TERMINAL, Job

__all__ = ["JOURNAL_DIR", "Journal"]

log = logging.getLogger(__name__)

JOURNAL_DIR = ".updates"
KEEP_FINISHED = 20
"""Finished jobs kept in the journal (newest first) for `edgectl models` and diagnostics."""


class Journal:
    """Persisted update jobs of one model store."""

    def __init__(self, store_root: Path) -> None:
        self.root = Path(store_root) / JOURNAL_DIR
        self.root.mkdir(parents=True, exist_ok=True)

    def part_path(self, job: str) -> Path:
        """Where the payload of `job` is assembled."""
        return self.root / f"{job}.part"

    def bundle_path(self, job: str) -> Path:
        """Where the bundle rebuilt from the payload of `job` is kept until installed."""
        return self.root / f"{job}.edgebundle"

    def save(self, job: Job) -> None:
        """Write the job atomically (temp, fsync, rename, fsync the folder)."""
        data = json.dumps(job.to_json(), separators=(",", ":")).encode("utf-8")
        atomic_write(self.root / f"{job.id}.json", data)

    def load_all(self) -> list[Job]:
        """Every readable job, oldest first; unreadable files are moved aside and logged."""
        jobs: list[Job] = []
        for path in sorted(self.root.glob("*.json")):
            try:
                job = Job.from_json(json.loads(path.read_bytes()))
                if f"{job.id}.json" != path.name:
                    raise ValueError(f"holds job {job.id}")
            except (OSError, ValueError, KeyError, TypeError, EdgeError, RecursionError) as exc:
                log.error("update journal %s is unreadable (%s); moved aside", path, exc)
                os.replace(path, path.with_suffix(".bad"))
                continue
            jobs.append(job)
        return sorted(jobs, key=lambda job: job.updated)

    def finish(self, job: Job) -> None:
        """Drop a finished job's payload files and the oldest finished journals."""
        for path in (self.part_path(job.id), self.bundle_path(job.id)):
            path.unlink(missing_ok=True)
        finished = [j for j in self.load_all() if j.state in TERMINAL]
        for old in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            (self.root / f"{old.id}.json").unlink(missing_ok=True)
