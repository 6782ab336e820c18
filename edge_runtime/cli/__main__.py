"""`python -m edge_runtime.cli`: the same as `edgectl`."""

from edge_runtime.cli import main

main()
