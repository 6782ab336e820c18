"""Serving: the registry of loaded models and the one dataplane (validation, errors, metrics) every transport calls."""
