"""On-device runtime: bundles, model store, inference server, MQTT link (light dependencies only)."""

__version__ = "0.1.0"
