"""The local KServe v2 HTTP API on a standard-library asyncio server."""
