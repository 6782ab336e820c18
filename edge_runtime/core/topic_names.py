"""What makes a valid MQTT topic name, filter or level (syntax only; topics are built in transports/mqtt)."""

from __future__ import annotations

from edge_runtime.core.errors import UsageError

__all__ = ["check_level", "check_topic", "expand"]

_FORBIDDEN_IN_LEVEL = ("/", "+", "#", "\x00")


def check_level(value: str, what: str) -> str:
    """Return `value` if it can be one topic level (non-empty, no '/', '+', '#' or NUL)."""
    if not value or any(char in value for char in _FORBIDDEN_IN_LEVEL):
        raise UsageError(f"{what} '{value}' cannot be used in an MQTT topic (empty, or holds / + # or NUL)")
    return value


def check_topic(topic: str, *, wildcards: bool = False) -> str:
    """Return `topic` if it is a valid topic name (or filter when `wildcards`)."""
    if not topic or "\x00" in topic or len(topic.encode("utf-8")) > 65535:
        raise UsageError(f"'{topic}' is not a valid MQTT topic")
    if not wildcards and ("+" in topic or "#" in topic):
        raise UsageError(f"'{topic}' is a topic filter; a topic to publish to cannot hold + or #")
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or index != len(levels) - 1)):
            raise UsageError(f"'{topic}' misuses a wildcard (+ and # must fill a whole level, # only last)")
    return topic


def expand(template: str, device_id: str, *, wildcards: bool = False) -> str:
    """Replace ``{device}`` in a configured topic and validate the result."""
    return check_topic(template.replace("{device}", device_id), wildcards=wildcards)
