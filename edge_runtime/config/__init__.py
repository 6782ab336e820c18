"""Configuration: device profiles and daemon settings, read once into frozen dataclasses. Imports core only."""
