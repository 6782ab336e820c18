"""Artifacts: the bundle file, its signed manifest, golden self-test data and ed25519 signing."""
