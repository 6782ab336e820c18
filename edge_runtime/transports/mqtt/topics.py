"""Every MQTT topic the daemon uses, built in this one module.

Layout, rooted at ``edge/<device_id>/``::

    status                 retained presence: "online" on connect, "offline" as the last will
    infer/<model>          inference requests in (v2-shaped JSON)
    reply/<model>          default reply topic when a request names none
    telemetry              periodic device + per-model telemetry (QoS 1, through the outbox)
    events                 model load failures, refused bundles, dropped-telemetry counts
    update/offer           update offers in (JSON, see codecs/update_payloads.py)
    update/jobs/<job>/get  block requests out (the device pulls the payload a window at a time)
    update/jobs/<job>/block  payload blocks in (binary)
    update/state/<model>   retained job-style state of the last update of each model
    update/error           refused offers and stray blocks (not retained)
    update/cmd             commands in (models, rollback); answered on update/reply/<token>

Stream bindings subscribe and publish to topics named in the configuration; ``{device}`` in
them is replaced by the device id.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.core.topic_names import check_level, check_topic

__all__ = [
    "ROOT",
    "DeviceTopics",
]

ROOT = "edge"
_FORBIDDEN_IN_LEVEL = ("/", "+", "#", "\x00")


@dataclass(frozen=True)
class DeviceTopics:
    """The topics of one device."""

    device_id: str

    def __post_init__(self) -> None:
        check_level(self.device_id, "device id")

    @property
    def base(self) -> str:
        """Prefix of every topic of this device."""
        return f"{ROOT}/{self.device_id}"

    @property
    def status(self) -> str:
        """Retained presence topic."""
        return f"{self.base}/status"

    @property
    def telemetry(self) -> str:
        """Periodic telemetry topic."""
        return f"{self.base}/telemetry"

    @property
    def events(self) -> str:
        """Event topic (failures, refusals, drops)."""
        return f"{self.base}/events"

    @property
    def infer_filter(self) -> str:
        """Filter matching the inference request topic of every model."""
        return f"{self.base}/infer/+"

    def infer(self, model: str) -> str:
        """Inference request topic of `model`."""
        return f"{self.base}/infer/{check_level(model, 'model name')}"

    def reply(self, model: str) -> str:
        """Default reply topic of `model` (used when a request names no reply topic)."""
        return f"{self.base}/reply/{check_level(model, 'model name')}"

    def update(self, suffix: str) -> str:
        """A topic under ``update/``."""
        return check_topic(f"{self.base}/update/{suffix}")

    @property
    def update_offer(self) -> str:
        """Update offers to this device."""
        return f"{self.base}/update/offer"

    def update_get(self, job: str) -> str:
        """Block requests of update job `job` (device to host)."""
        return f"{self.base}/update/jobs/{check_level(job, 'job id')}/get"

    def update_block(self, job: str) -> str:
        """Payload blocks of update job `job` (host to device)."""
        return f"{self.base}/update/jobs/{check_level(job, 'job id')}/block"

    @property
    def update_block_filter(self) -> str:
        """Filter matching the block topic of every job."""
        return f"{self.base}/update/jobs/+/block"

    def update_state(self, model: str) -> str:
        """Retained update state of `model`."""
        return f"{self.base}/update/state/{check_level(model, 'model name')}"

    @property
    def update_errors(self) -> str:
        """Refused offers and stray update messages."""
        return f"{self.base}/update/error"

    @property
    def update_cmd(self) -> str:
        """Update commands (models, rollback)."""
        return f"{self.base}/update/cmd"

    def update_reply(self, token: str) -> str:
        """Where the answer to the command carrying `token` goes."""
        return f"{self.base}/update/reply/{check_level(token, 'reply token')}"

    def job_of(self, topic: str) -> str | None:
        """The job named by a block topic, or None if `topic` is not one."""
        prefix = f"{self.base}/update/jobs/"
        if not topic.startswith(prefix) or not topic.endswith("/block"):
            return None
        job = topic[len(prefix) : -len("/block")]
        return job if job and "/" not in job else None

    def model_of(self, topic: str) -> str | None:
        """The model named by an inference request topic, or None if `topic` is not one."""
        prefix = f"{self.base}/infer/"
        if not topic.startswith(prefix):
            return None
        model = topic[len(prefix) :]
        return model if model and "/" not in model else None
