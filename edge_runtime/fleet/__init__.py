"""The operator's side of a fleet: telemetry collection, the fleet view and staged rollouts (host-side, over MQTT)."""
