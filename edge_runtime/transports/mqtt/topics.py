"""Every MQTT topic the daemon uses, built in this one module.

Layout, rooted at ``edge/<device_id>/``::

    status                 retained presence: "online" on connect, "offline" as the last will
    infer/<model>          inference requests in (v2-shaped JSON)
    reply/<model>          default reply topic when a request names none
    telemetry              periodic device + per-model telemetry (QoS 1, through the outbox)
    events                 model load failures, refused bundles, dropped-telemetry counts
    update/...             reserved for model updates (not used yet)

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
        """Reserved: a topic under ``update/`` for the future model-update flow."""
        return check_topic(f"{self.base}/update/{suffix}")

    def model_of(self, topic: str) -> str | None:
        """The model named by an inference request topic, or None if `topic` is not one."""
        prefix = f"{self.base}/infer/"
        if not topic.startswith(prefix):
            return None
        model = topic[len(prefix) :]
        return model if model and "/" not in model else None
