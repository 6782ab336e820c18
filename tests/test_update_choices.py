"""What `edgectl flash` chooses to send (a delta only when it is smaller on the wire, and bsdiff only
when the base shares content), and the store's cached bundle digests behind `edgectl models`."""

from __future__ import annotations

import hashlib
import json
import os
import re

from edge_runtime.client.flash import DELTA_MIN_SHARED, prepare, shared_fraction
from edge_runtime.state.store import DIGEST_FILE, ModelStore


def test_a_delta_is_sent_only_when_smaller_and_computed_only_when_the_base_shares_content(mlp_bundle_factory):
    v1 = mlp_bundle_factory("mlp", "1", seed=1).read_bytes()
    same_weights = mlp_bundle_factory("mlp", "2", seed=1).read_bytes()  # a new version, weights kept
    retrained = mlp_bundle_factory("mlp", "2", seed=2).read_bytes()  # every weight changed
    full = prepare(same_weights, block_size=1024)
    assert full.offer.delta is None and full.notes == ()

    small = prepare(same_weights, block_size=1024, base=("1", v1))
    assert small.offer.delta is not None and small.offer.delta.base_version == "1"
    assert small.offer.delta.base_sha256 == hashlib.sha256(v1).hexdigest()
    assert small.wire_bytes < full.wire_bytes and "sending the delta" in small.notes[0]

    assert shared_fraction(v1, same_weights) > 0.5 and shared_fraction(v1, retrained) < DELTA_MIN_SHARED
    skipped = prepare(retrained, block_size=1024, base=("1", v1))
    assert skipped.offer.delta is None and skipped.notes[0].startswith("no delta against 1:")
    assert skipped.wire_bytes == prepare(retrained, block_size=1024).wire_bytes

    forced = prepare(retrained, block_size=1024, base=("1", v1), delta_min_shared=0.0)  # bsdiff runs
    assert forced.offer.delta is None and "sending the full" in forced.notes[0]  # and loses: not sent
    delta_bytes, full_bytes = (int(n) for n in re.findall(r": (\d+)", forced.notes[0]))
    assert delta_bytes >= full_bytes == forced.wire_bytes

    tiny_base = prepare(same_weights, block_size=1024, base=("0", b"PK\x03\x04 not much"))
    assert tiny_base.offer.delta is None and "no delta against 0: 0%" in tiny_base.notes[0]


def test_bundle_digests_come_from_the_sidecar_while_the_file_is_the_same(
    tmp_path, signing_keys, device_profile, mlp_bundle_factory
):
    store = ModelStore(tmp_path / "store", signing_keys.public_key, device_profile)
    store.install(mlp_bundle_factory("mlp", "1", seed=1))
    path = store.bundle_path("mlp", "1")
    real = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar = path.with_name(DIGEST_FILE)
    assert json.loads(sidecar.read_text())["sha256"] == real == store.bundle_sha256("mlp", "1")

    doc = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**doc, "sha256": "0" * 64}))
    assert store.bundle_sha256("mlp", "1") == "0" * 64  # answered from the sidecar: the file is not read

    before = path.stat()
    other = mlp_bundle_factory("mlp", "1", seed=7).read_bytes()
    replacement = path.with_name("swap.tmp")
    replacement.write_bytes(other[: before.st_size].ljust(before.st_size, b"\0"))  # same size
    os.replace(replacement, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same mtime
    assert store.bundle_sha256("mlp", "1") == hashlib.sha256(path.read_bytes()).hexdigest() != real
    sidecar.write_text("not json")
    assert store.bundle_sha256("mlp", "1") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert store.versions("mlp") == ["1"]
