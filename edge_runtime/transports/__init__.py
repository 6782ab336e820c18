"""Thin adapters over the dataplane: http/ (KServe v2) and mqtt/ (the one paho import, topics, infer, streams)."""
