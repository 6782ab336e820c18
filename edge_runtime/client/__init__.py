"""The host side: talk to devices over HTTP and MQTT (no onnx, no torch)."""
