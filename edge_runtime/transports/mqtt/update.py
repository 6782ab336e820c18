"""The MQTT side of model updates on a device: a thin adapter between the link and the update machine.

It subscribes to offers, blocks and commands and hands the raw bytes to the callbacks it is given
(which run on the link's worker threads, never on paho's); it publishes block requests, state
reports (retained, one per model), error reports and command replies. What the bytes mean is the
business of `codecs.update_payloads` and `update/`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_runtime.transports.mqtt.link import Incoming, MqttLink
from edge_runtime.transports.mqtt.topics import DeviceTopics

__all__ = ["UpdateChannel"]

log = logging.getLogger(__name__)

BLOCK_QOS = 1
"""Blocks and block requests travel at QoS 1: the broker takes them over, the device re-asks for losses."""


class UpdateChannel:
    """Update topics of one device over one `MqttLink`."""

    def __init__(self, link: MqttLink, topics: DeviceTopics) -> None:
        self.link = link
        self.topics = topics

    def attach(
        self,
        *,
        on_offer: Callable[[bytes], None],
        on_block: Callable[[str, bytes], None],
        on_command: Callable[[bytes], None],
        on_connected: Callable[[], None],
    ) -> None:
        """Subscribe; `on_block(job, raw)`; `on_connected()` after every (re)connect (on paho's thread)."""
        topics = self.topics

        def block(message: Incoming) -> None:
            job = topics.job_of(message.topic)
            if job is not None:
                on_block(job, message.payload)

        self.link.subscribe(topics.update_offer, lambda m: on_offer(m.payload), qos=1)
        self.link.subscribe(topics.update_block_filter, block, qos=BLOCK_QOS)
        self.link.subscribe(topics.update_cmd, lambda m: on_command(m.payload), qos=1)
        self.link.add_connection_listener(lambda up: on_connected() if up else None)

    @property
    def connected(self) -> bool:
        """True while the broker connection is up."""
        return self.link.connected

    def request_blocks(self, job: str, payload: bytes) -> None:
        """Ask the host serving `job` for blocks."""
        self.link.publish(self.topics.update_get(job), payload, qos=BLOCK_QOS)

    def report_state(self, model: str, payload: bytes) -> None:
        """Publish the state of `model`'s update (retained: a late subscriber sees it)."""
        self.link.publish(self.topics.update_state(model), payload, qos=1, retain=True)

    def report_error(self, payload: bytes) -> None:
        """Publish an error about a message that belongs to no running job."""
        self.link.publish(self.topics.update_errors, payload, qos=1)

    def reply(self, token: str, payload: bytes) -> None:
        """Answer a command."""
        self.link.publish(self.topics.update_reply(token), payload, qos=1)
