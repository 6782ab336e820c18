"""MQTT: the link (the one module importing paho), topic names, request/response and stream bindings, outbox sender."""
