"""Telemetry: health states, device figures, and the loop that queues records in the outbox."""
