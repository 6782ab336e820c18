"""Core: errors, shared types (requests, responses, tensor specs), files and topic syntax. Imports nothing of ours."""
