"""Every MQTT topic the daemon uses, built in this one module.

Layout, rooted at ``edge/<device_id>/``::

    status                 retained presence: "online" on connect, "offline" as the last will
    facts                  retained facts: profile, groups, health, models and versions (on connect, on change)
    infer/<model>          inference requests in (v2-shaped JSON)
    reply/<model>          default reply topic when a request names none
    telemetry              periodic device + per-model telemetry (QoS 1, through the outbox)
    events                 model load failures, refused bundles, dropped-telemetry counts
    update/offer           update offers in (JSON, see codecs/update_payloads.py)
    update/jobs/<job>/get  block requests out (the device pulls the payload a window at a time)
    update/jobs/<job>/block  payload blocks in (binary)
    update/state/<model>   retained job-style state of the last update of each model
    update/error           refused offers and stray blocks (not retained)
    update/cmd             commands in (models, rollback, cancel); answered on update/reply/<token>
    inbox/<client>/...     replies a caller asked for (Response Topic or ``reply_to``)

Stream bindings subscribe and publish to topics named in the configuration; ``{device}`` in
them is replaced by the device id.

Reply topics come from outside (the MQTT 5 Response Topic, or ``reply_to`` in a 3.1.1 request), so
`DeviceTopics.check_reply_topic` vets them before anything is published there: no wildcards, no
``$`` broker topics, nothing a broker refuses as malformed UTF-8 (it would drop the connection),
and nothing in the ``edge/`` tree but this device's ``inbox/<client>/...``. The inbox is where a
caller confined by broker ACLs to its own topics gets answers (as AWS IoT answers under the
thing's own ``$aws/things/<thing>/...``): the device publishes only below ``edge/<device>/``, and a
client subscribes ``edge/+/inbox/<its client id>/#``. Topics outside ``edge/`` are the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.core.errors import RequestError, UsageError
from edge_runtime.core.topic_names import check_level, check_topic

__all__ = [
    "INBOX",
    "ROOT",
    "DeviceTopics",
    "broker_refuses",
    "device_of",
    "fleet_filter",
]

ROOT = "edge"
INBOX = "inbox"
_MAX_TOPIC_BYTES = 65535


def broker_refuses(char: str) -> bool:
    """True for a character an MQTT broker treats as malformed in a topic (Mosquitto disconnects us).

    MQTT 5 section 1.5.4: NUL, surrogates, control characters and non-characters.
    """
    code = ord(char)
    return (
        code <= 0x1F
        or 0x7F <= code <= 0x9F
        or 0xD800 <= code <= 0xDFFF
        or 0xFDD0 <= code <= 0xFDEF
        or (code & 0xFFFF) >= 0xFFFE
    )


def fleet_filter(suffix: str) -> str:
    """The filter matching `suffix` (e.g. ``status``, ``update/state/+``) of every device."""
    return check_topic(f"{ROOT}/+/{suffix}", wildcards=True)


def device_of(topic: str) -> tuple[str, str] | None:
    """(device id, the rest) of a topic under ``edge/<device>/``, or None if it is not one."""
    root, _, tail = topic.partition("/")
    device, _, rest = tail.partition("/")
    if root != ROOT or not device or not rest or any(char in device for char in "+#\x00"):
        return None
    return device, rest


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
    def facts(self) -> str:
        """Retained facts topic (profile, groups, health, models: what a fleet view shows at once)."""
        return f"{self.base}/facts"

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

    def default_reply(self, model: str | None) -> str:
        """Where a request on `model`'s topic is answered when it names no usable reply topic."""
        try:
            return self.reply(model) if model else f"{self.base}/reply"
        except UsageError:
            return f"{self.base}/reply"

    def inbox(self, client: str, *rest: str) -> str:
        """A reply topic under this device's inbox for caller `client` (for a client to ask for)."""
        levels = [check_level(client, "client"), *(check_level(level, "inbox level") for level in rest)]
        return "/".join((self.base, INBOX, *levels))

    def inbox_filter(self, client: str) -> str:
        """The filter a caller subscribes to receive every reply sent to its inbox on this device."""
        return f"{self.base}/{INBOX}/{check_level(client, 'client')}/#"

    def check_reply_topic(self, topic: str) -> str:
        """Return `topic` if a reply may be published there; RequestError saying why not."""
        reason = self._reply_topic_problem(topic)
        if reason:
            shown = topic if len(topic) <= 80 else topic[:77] + "..."
            raise RequestError(f"reply topic {shown!r} refused: {reason}")
        return topic

    def _reply_topic_problem(self, topic: str) -> str | None:
        if not topic:
            return "it is empty"
        if any(broker_refuses(char) for char in topic):
            return "it holds a NUL, control or non-character code point the broker refuses"
        if len(topic.encode("utf-8")) > _MAX_TOPIC_BYTES:
            return f"it is longer than {_MAX_TOPIC_BYTES} bytes"
        if "+" in topic or "#" in topic:
            return "it holds a wildcard (+ or #); a reply goes to one topic"
        if topic.startswith("$"):
            return "topics starting with $ belong to the broker"
        levels = topic.split("/")
        if levels[0] != ROOT:
            return None
        own = levels[1:3] == [self.device_id, INBOX] and len(levels) > 3
        if own and all(levels[3:]):
            return None
        return (
            f"the {ROOT}/ tree is reserved for devices; a reply may go to "
            f"{self.base}/{INBOX}/<client>/... or to a topic outside {ROOT}/"
        )

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
