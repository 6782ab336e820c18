"""Click commands of edgectl, one module per area (loaded lazily by edge_runtime.cli)."""
