"""Property tests over the update decoders (issue 11): offers, block requests, block frames and their
zstd payloads, commands, bsdiff4 deltas and journal files. Each call returns a well-formed object or
raises one of our `EdgeError`s, within a memory bound; a mangled journal file costs that job only."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_runtime.codecs.update_payloads import (
    MAX_WINDOW,
    BlockRequest,
    Command,
    CommandOp,
    Compression,
    Offer,
    decode_block,
    decode_block_request,
    decode_command,
    decode_offer,
    encode_block,
    encode_json,
)
from edge_runtime.core.errors import EdgeError
from edge_runtime.update.encoding import apply_delta, decode_block_data, max_wire_bytes
from edge_runtime.update.journal import Journal
from edge_runtime.update.machine import Job, State
from tests.fuzzing import corrupt, json_values, mutate, outcome, scratch_root

FAST = settings(max_examples=200, deadline=timedelta(seconds=2))
FILES = settings(max_examples=80, deadline=timedelta(seconds=5),
                 suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

_BLOCK = 1024
_PAYLOAD = bytes(range(256)) * 9  # 2304 bytes: three blocks, the last one short
_DIGESTS = tuple(
    hashlib.sha256(_PAYLOAD[i : i + _BLOCK]).hexdigest() for i in range(0, len(_PAYLOAD), _BLOCK)
)
OFFER = Offer(job="job-1", model="mlp", version="2", size=len(_PAYLOAD), sha256=hashlib.sha256(_PAYLOAD).hexdigest(),
              signature="ab" * 64, payload_size=len(_PAYLOAD), payload_sha256=hashlib.sha256(_PAYLOAD).hexdigest(),
              block_size=_BLOCK, block_sha256=_DIGESTS)  # fmt: skip
OFFER_DOC = json.loads(OFFER.encode())
OFFER_DOC["delta"] = {"format": "bsdiff4", "base_version": "1", "base_sha256": "cd" * 32}
OFFER_DOC["probation"] = {"seconds": 5, "max_error_rate": 0.1, "max_p95_ms": 20, "min_requests": 3}


def _check_offer(offer: Offer) -> None:
    """A decoded offer is internally consistent: one digest per block, sizes within bounds."""
    assert offer.blocks == -(-offer.payload_size // offer.block_size) and offer.blocks >= 1
    assert 0 < offer.block_length(offer.blocks - 1) <= offer.block_size
    assert isinstance(offer.compression, Compression) and isinstance(offer.new_model, bool)
    assert decode_offer(offer.encode()) == offer  # what a device accepts, it can write back and re-read


@FAST
@given(st.data())
def test_offers_decode_or_refuse(data: st.DataObject) -> None:
    doc = corrupt(OFFER_DOC, data.draw, at_most=3)
    for raw in (json.dumps(doc).encode(), mutate(json.dumps(OFFER_DOC).encode(), data.draw)):
        result = outcome(lambda raw=raw: decode_offer(raw))
        if not isinstance(result, EdgeError):
            _check_offer(result)


@FAST
@given(json_values)
def test_any_json_as_an_offer_or_a_command(value: Any) -> None:
    raw = json.dumps(value).encode()
    for decode in (decode_offer, decode_block_request, decode_command):
        result = outcome(lambda decode=decode: decode(raw))
        assert isinstance(result, EdgeError | Offer | BlockRequest | Command)


@FAST
@given(st.data())
def test_block_requests_decode_or_refuse(data: st.DataObject) -> None:
    indices = sorted(data.draw(st.sets(st.integers(0, 5000), min_size=1, max_size=MAX_WINDOW)))
    if indices[-1] - indices[0] >= MAX_WINDOW:
        indices = [i for i in indices if i < indices[0] + MAX_WINDOW]
    doc = corrupt(json.loads(BlockRequest.of("job-1", indices).encode()), data.draw)
    result = outcome(lambda: decode_block_request(json.dumps(doc).encode()))
    if not isinstance(result, EdgeError):
        asked = result.indices()
        assert len(asked) <= MAX_WINDOW and all(
            result.offset <= i < result.offset + MAX_WINDOW for i in asked
        )
        assert BlockRequest.of(result.job, asked).indices() == asked if asked else True


@FAST
@given(st.data())
def test_block_frames_and_their_payloads_decode_or_refuse(data: st.DataObject) -> None:
    compression = data.draw(st.sampled_from(list(Compression)))
    block = _PAYLOAD[:_BLOCK]
    if compression is Compression.ZSTD:
        import zstandard

        block = zstandard.ZstdCompressor(level=3).compress(block)
    raw = mutate(encode_block(0, block), data.draw)
    limit = max_wire_bytes(_BLOCK, compression)

    def decode() -> bytes:
        index, wire = decode_block(raw, max_bytes=limit)
        assert index >= 0 and len(wire) <= limit
        return decode_block_data(wire, compression, OFFER.block_length(min(index, OFFER.blocks - 1)))

    result = outcome(decode)
    if not isinstance(result, EdgeError):
        assert len(result) in (_BLOCK, OFFER.block_length(OFFER.blocks - 1))


@functools.cache
def _bomb() -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))  # 64 MiB of zeros in a few KB


@settings(max_examples=50, deadline=timedelta(seconds=2))
@given(st.binary(max_size=4096))
def test_a_zstd_bomb_or_junk_is_refused_within_the_block_size(junk: bytes) -> None:
    bomb = _bomb()
    for wire in (junk, bomb, bomb[: len(bomb) // 2]):
        result = outcome(lambda wire=wire: decode_block_data(wire, Compression.ZSTD, _BLOCK))
        assert isinstance(result, EdgeError) or len(result) == _BLOCK


@FAST
@given(st.data())
def test_commands_decode_or_refuse(data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(list(CommandOp)))
    doc = corrupt({"v": 1, "op": op.value, "token": "t-1", "model": "mlp"}, data.draw)
    result = outcome(lambda: decode_command(json.dumps(doc).encode()))
    if not isinstance(result, EdgeError):
        assert isinstance(result.op, CommandOp) and result.token
        assert (result.model is None) == (result.op is CommandOp.MODELS)


@FAST
@given(st.data())
def test_deltas_apply_or_refuse_within_the_offered_size(data: st.DataObject) -> None:
    import bsdiff4

    base = _PAYLOAD
    new = _PAYLOAD[:1000] + b"retrained head" + _PAYLOAD[1000:]
    patch = mutate(bsdiff4.diff(base, new), data.draw)
    result = outcome(lambda: apply_delta(base, patch, OFFER_DOC_DELTA_FORMAT, max_size=len(new) + 64))
    if not isinstance(result, EdgeError):
        assert len(result) <= len(new) + 64


OFFER_DOC_DELTA_FORMAT = decode_offer(json.dumps(OFFER_DOC).encode()).delta.format  # type: ignore[union-attr]


@FILES
@given(data=st.data())
def test_a_mangled_journal_costs_that_job_only(data: st.DataObject, tmp_path: Path) -> None:
    root = scratch_root(tmp_path)
    try:
        _mangle_one_of_two(data, Journal(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _mangle_one_of_two(data: st.DataObject, journal: Journal) -> None:
    good, bad = (
        Job(OFFER, state=State.DOWNLOADING, have=bytearray(b"\x03"), updated=1.0),
        Job(
            decode_offer({**OFFER_DOC, "job": "job-2", "delta": None, "probation": None}),
            state=State.TRIAL,
            updated=2.0,
        ),
    )
    journal.save(good)
    journal.save(bad)
    path = journal.root / "job-2.json"
    raw = path.read_bytes()
    mangled = (
        json.dumps(corrupt(json.loads(raw), data.draw, at_most=3)).encode()
        if data.draw(st.booleans())
        else mutate(raw, data.draw)
    )
    path.write_bytes(mangled)
    loaded = outcome(journal.load_all)
    assert not isinstance(loaded, EdgeError)
    by_id = {job.id: job for job in loaded}
    assert by_id["job-1"].to_json() == good.to_json()  # the other job is untouched
    if "job-2" in by_id:
        job = by_id["job-2"]
        assert isinstance(job.state, State) and job.offer.blocks >= 1
        assert encode_json(job.to_json())  # and it can be saved again
    else:
        assert (journal.root / "job-2.bad").is_file() and not path.exists()
