"""Decoding what travels: zstd-compressed blocks and bsdiff4 deltas, each bounded before it runs.

The host (``client/flash.py``) encodes with the same libraries; formats are named in
`codecs.update_payloads` (`Compression`, `DeltaFormat`).
"""

from __future__ import annotations

import io
import struct

from edge_runtime.codecs.update_payloads import Compression, DeltaFormat
from edge_runtime.core.errors import BundleError, RequestError

__all__ = ["apply_delta", "decode_block_data", "max_wire_bytes"]

_BSDIFF_HEADER = struct.Struct("<8sqqq")
"""BSDIFF40 header: magic, control length, diff length, new file size (little-endian int64)."""


def max_wire_bytes(block_size: int, compression: Compression) -> int:
    """The largest a block may be on the wire (zstd can grow incompressible data a little)."""
    return block_size if compression is Compression.NONE else block_size + block_size // 64 + 1024


def decode_block_data(data: bytes, compression: Compression, length: int) -> bytes:
    """The block's payload bytes, which must be exactly `length` long (RequestError otherwise)."""
    if compression is Compression.ZSTD:
        import zstandard

        # A stream read of at most length + 1 bytes: `decompress()` would allocate whatever size the
        # frame header claims (a few KB of zeros can claim gigabytes), max_output_size notwithstanding.
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                data = reader.read(length + 1)
        except zstandard.ZstdError as exc:
            raise RequestError(f"update block is not a zstd frame of {length} bytes: {exc}") from exc
    if len(data) != length:
        raise RequestError(f"update block has {len(data)} bytes, expected {length}")
    return data


def apply_delta(base: bytes, patch: bytes, fmt: DeltaFormat, *, max_size: int) -> bytes:
    """Rebuild the new bundle from the installed `base` and a delta (BundleError if it does not apply)."""
    if fmt is not DeltaFormat.BSDIFF4:  # pragma: no cover (the codec admits bsdiff4 only)
        raise BundleError(f"delta format {fmt} is not supported")
    if len(patch) < _BSDIFF_HEADER.size:
        raise BundleError("the delta is too short to be a bsdiff4 patch")
    magic, _control, _diff, new_size = _BSDIFF_HEADER.unpack_from(patch)
    if magic != b"BSDIFF40" or not 0 < new_size <= max_size:
        raise BundleError(f"the delta is not a bsdiff4 patch for a file of at most {max_size} bytes")
    import bsdiff4

    try:
        return bytes(bsdiff4.patch(base, patch))
    except (ValueError, MemoryError, OSError) as exc:
        raise BundleError(f"the delta does not apply to the installed base version: {exc}") from exc
