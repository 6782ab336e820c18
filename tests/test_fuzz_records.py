"""Property tests over the collector's decoder (issue 12, item 2): whatever arrives on a fleet topic,
`records.decode` returns a bounded, well-typed record or raises `BadRecord`, within a memory bound;
and every record it returns can be stored (SQLite, in memory) without an error."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.codecs.payloads import Presence, encode_presence
from edge_runtime.fleet.records import MAX_MODELS, MAX_PAYLOAD_BYTES, MAX_TEXT, BadRecord, Record, decode
from edge_runtime.fleet.store_sqlite import SqliteStore
from edge_runtime.serving.metrics import Metrics
from edge_runtime.state.outbox import Outbox
from edge_runtime.telemetry.health import Health
from edge_runtime.telemetry.loop import TelemetryLoop
from tests.fuzzing import corrupt, json_values, mutate, outcome, tweak

FAST = settings(max_examples=300, deadline=timedelta(seconds=2))
_STORE = SqliteStore(":memory:")


def _real_telemetry() -> dict[str, Any]:
    """A telemetry record exactly as the daemon's loop builds it (system figures, models, outbox)."""
    metrics = Metrics()
    for index in range(20):
        metrics.observe("digits", "1", 0.001 * (index + 1), index != 3)
    loop = TelemetryLoop("gw1", "edge/gw1/telemetry", "edge/gw1/events", Outbox(None, 10), interval_s=60,
                         sources={"models": lambda: metrics.snapshot()["models"]},
                         health=lambda: Health.RUNNING)  # fmt: skip
    return {"v": 1, "key": "3f2a9c0d11e4-42", **loop.record()}


BASES: list[tuple[str, dict[str, Any]]] = [
    ("edge/gw1/telemetry", _real_telemetry()),
    ("edge/gw1/events", {"v": 1, "kind": "model_refused", "device": "gw1", "ts": 1.7e9, "key": "ab-7",
                         "model": "old", "version": "3", "reason": "signature"}),
    ("edge/gw1/status", json.loads(encode_presence(Presence.ONLINE, "gw1"))),
    ("edge/gw1/update/state/digits", {"v": 1, "job": "j-1", "model": "digits", "version": "2",
                                      "state": "downloading", "from_version": "1", "ts": 1.7e9,
                                      "percent": 42.0, "blocks": {"received": 3, "duplicate": 0, "bad": 0}}),
]  # fmt: skip
TOPICS = st.sampled_from([topic for topic, _ in BASES]) | st.sampled_from(
    ["edge/gw1/update/state/", "edge//telemetry", "edge/gw1/telemetry/x", "other/gw1/telemetry",
     "edge/\x00/status", "edge/gw1/update/state/a/b", "edge/" + "d" * 300 + "/events"]
) | st.text(max_size=30)  # fmt: skip


def _check(result: Record | Exception) -> None:
    """A record within its bounds that the store takes, or a BadRecord."""
    if isinstance(result, Exception):
        assert isinstance(result, BadRecord), f"{type(result).__name__}: {result}"
        return
    assert isinstance(result, Record)
    assert result.device and len(result.device) <= MAX_TEXT and result.device.isprintable()
    assert result.key and len(result.key) <= 4 * MAX_TEXT + 40 and result.key.isprintable()
    assert math.isfinite(result.ts) and len(result.body) <= 6 * MAX_PAYLOAD_BYTES + 64
    assert isinstance(json.loads(result.body), dict)
    assert len(result.models) <= MAX_MODELS
    for sample in result.models:
        assert sample.requests is None or 0 <= sample.requests < 2**63
        for value in (sample.p50_ms, sample.p95_ms, sample.p99_ms):
            assert value is None or math.isfinite(value)
    for text in (result.state, result.model, result.version, result.job):
        assert text is None or (0 < len(text) <= MAX_TEXT and text.isprintable())
    assert _STORE.add([result]) in (0, 1)


def test_the_real_payloads_decode() -> None:
    for topic, doc in BASES:
        record = decode(topic, json.dumps(doc).encode())
        assert record.device == "gw1" and record.body
    telemetry = decode(BASES[0][0], json.dumps(BASES[0][1]).encode())
    assert [(s.model, s.version, s.requests, s.errors) for s in telemetry.models] == [("digits", "1", 20, 1)]


@FAST
@given(st.data())
def test_corrupted_documents_give_a_record_or_bad_record(data: st.DataObject) -> None:
    topic, doc = data.draw(st.sampled_from(BASES))
    broken = data.draw(st.sampled_from([corrupt, tweak]))(doc, data.draw, at_most=3)
    payload = json.dumps(broken, default=str).encode()  # tweak may draw TOML datetimes
    where = data.draw(TOPICS) if data.draw(st.booleans()) else topic
    _check(outcome(lambda: decode(where, payload)))


@FAST
@given(st.data())
def test_mutated_bytes_give_a_record_or_bad_record(data: st.DataObject) -> None:
    topic, doc = data.draw(st.sampled_from(BASES))
    payload = mutate(json.dumps(doc).encode(), data.draw)
    _check(outcome(lambda: decode(topic, payload)))


@FAST
@given(TOPICS, st.binary(max_size=200) | json_values.map(lambda value: json.dumps(value).encode()))
def test_arbitrary_payloads_on_any_topic_give_a_record_or_bad_record(topic: str, payload: bytes) -> None:
    _check(outcome(lambda: decode(topic, payload)))


def test_size_and_nesting_bounds() -> None:
    topic, doc = BASES[0]
    assert isinstance(outcome(lambda: decode(topic, b"[" * 200_000)), BadRecord)
    padded = json.dumps({**doc, "pad": "x" * MAX_PAYLOAD_BYTES}).encode()
    assert "limit" in str(outcome(lambda: decode(topic, padded)))
    many = json.dumps({**doc, "models": {f"m{i}": {} for i in range(MAX_MODELS + 1)}}).encode()
    assert "models in one record" in str(outcome(lambda: decode(topic, many)))
