"""What the device keeps on disk: the model store (versions, active/previous) and the telemetry outbox."""
