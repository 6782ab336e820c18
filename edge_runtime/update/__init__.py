"""Model updates over MQTT (the install state machine); empty until the update flow lands."""
