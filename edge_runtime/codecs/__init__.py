"""Bytes <-> requests: the KServe v2 codec and the versioned MQTT payloads. Imports core only."""
