"""The real-model zoo and the embedded digits model: deterministic data that the fp32 models get right."""

from __future__ import annotations

import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from compressor.demo_model import INPUT_NAME, OUTPUT_NAME, train_digits_model
from tests.conftest import require_module
from tools import zoo

CLS_MIN_ACCURACY = 0.95
"""Measured 0.99-0.9975 on 200-400 lines (DejaVu fonts); 0.9925 with Pillow's default font."""
REC_MIN_READ_RATE = 0.85
"""Measured 0.997 on 300 lines (DejaVu fonts); 0.975 with Pillow's default font."""


def _session(kind: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(zoo.ppocr_model(kind)), options, providers=["CPUExecutionProvider"])


def _same_feeds(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x["x"], y["x"]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", ["cls", "det", "rec"])
def test_ppocr_models_are_found_without_importing_rapidocr(kind: str) -> None:
    model = onnx.load(str(zoo.ppocr_model(kind)), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["x"]
    assert not model.graph.initializer  # Paddle exports keep every weight in Constant nodes
    assert any(node.op_type == "Constant" for node in model.graph.node)


def test_text_direction_dataset_is_deterministic_and_shaped() -> None:
    feeds, labels = zoo.text_direction_dataset(8, seed=3)
    again, labels_again = zoo.text_direction_dataset(8, seed=3)
    other, _ = zoo.text_direction_dataset(8, seed=4)
    assert _same_feeds(feeds, again) and np.array_equal(labels, labels_again)
    assert not _same_feeds(feeds, other)
    assert labels.dtype == np.int64 and sorted(labels.tolist()) == [0] * 4 + [1] * 4
    for feed in feeds:
        assert feed["x"].shape == (1, *zoo.CLS_SHAPE) and feed["x"].dtype == np.float32
        assert feed["x"].min() >= -1.0 and feed["x"].max() <= 1.0


def test_fp32_text_direction_classifier_is_accurate() -> None:
    feeds, labels = zoo.text_direction_dataset(200, seed=0)
    session = _session("cls")
    predicted = np.array([session.run(None, feed)[0].argmax() for feed in feeds])
    assert np.mean(predicted == labels) >= CLS_MIN_ACCURACY


def test_fp32_recognizer_reads_rendered_lines() -> None:
    feeds, texts = zoo.recognition_lines(40, seed=0)
    assert _same_feeds(feeds, zoo.recognition_dataset(40, seed=0))
    assert all(feed["x"].shape == (1, *zoo.REC_SHAPE) and feed["x"].dtype == np.float32 for feed in feeds)
    session = _session("rec")
    read = [zoo.ctc_greedy_decode(session.run(None, feed)[0])[0].strip() for feed in feeds]
    assert np.mean([a == b for a, b in zip(read, texts, strict=True)]) >= REC_MIN_READ_RATE


def test_fp32_detector_map_lights_up_on_the_text() -> None:
    feeds = zoo.detection_dataset(4, seed=0, size=256)
    assert _same_feeds(feeds, zoo.detection_dataset(4, seed=0, size=256))
    assert all(feed["x"].shape == (1, 3, 256, 256) and feed["x"].dtype == np.float32 for feed in feeds)
    session = _session("det")
    for image, mask in zoo.detection_samples(4, seed=0, size=256):
        probability = session.run(None, {"x": zoo.det_preprocess(image, 256)})[0][0, 0]
        assert mask.any()
        assert probability[mask].mean() > 0.05
        assert probability[~mask].mean() < 0.01
        assert np.mean(probability[~mask] > 0.3) < 0.01


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks() -> None:
    charset = zoo.rec_charset()
    assert len(charset) == 6625 and charset[0] == "" and charset[-1] == " "
    ids = [0, charset.index("a"), charset.index("a"), 0, charset.index("a"), charset.index("b"), 0]
    probs = np.zeros((1, len(ids), len(charset)), dtype=np.float32)
    probs[0, np.arange(len(ids)), ids] = 1.0
    assert zoo.ctc_greedy_decode(probs) == ["aab"]


def test_preprocessing_matches_rapidocr_within_one_grey_level() -> None:
    extra = "test extra: rapidocr-onnxruntime==1.4.4"
    cv2 = require_module("cv2", extra)
    text_cls = require_module("rapidocr_onnxruntime.ch_ppocr_cls.text_cls", extra)
    text_rec = require_module("rapidocr_onnxruntime.ch_ppocr_rec.text_recognize", extra)
    det_utils = require_module("rapidocr_onnxruntime.ch_ppocr_det.utils", extra)
    one_level = 2 / 255 + 1e-6
    rng = np.random.default_rng(0)
    for _ in range(10):
        line, _ = zoo.render_line(rng)
        assert np.abs(zoo.resize_bilinear(line, 77, 31).astype(int) - cv2.resize(line, (77, 31))).max() <= 1
        cls_ref = text_cls.TextClassifier.resize_norm_img(
            types.SimpleNamespace(cls_image_shape=[3, 48, 192]), line
        )
        assert np.abs(zoo.cls_preprocess(line)[0] - cls_ref).max() <= one_level
        rec_self = types.SimpleNamespace(rec_image_shape=[3, 48, 320])
        rec_ref = text_rec.TextRecognizer.resize_norm_img(rec_self, line, 320 / 48)
        assert np.abs(zoo.rec_preprocess(line)[0] - rec_ref).max() <= one_level
    image, _ = zoo.detection_samples(1, seed=0, size=320)[0]
    for limit in (320, 736):
        det_ref = det_utils.DetPreProcess(limit, "min")(image)
        assert np.abs(zoo.det_preprocess(image, limit) - det_ref).max() <= one_level


def test_digits_onnx_model_matches_sklearn() -> None:
    task = zoo.digits_task()
    model = onnx.load_from_string(task.model)
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm"]
    assert model.opset_import[0].version == 17
    assert model.graph.input[0].name == INPUT_NAME and model.graph.output[0].name == OUTPUT_NAME
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # free batch dimension
    assert len(task.calibration) == 200 and len(task.validation) == len(task.labels) == 360
    assert len(task.tuning) == len(task.tuning_labels) == 200
    assert all(f[INPUT_NAME].shape == (1, 64) and f[INPUT_NAME].dtype == np.float32 for f in task.validation)
    session = ort.InferenceSession(task.model, providers=["CPUExecutionProvider"])
    logits = session.run(None, {INPUT_NAME: np.concatenate([f[INPUT_NAME] for f in task.validation])})[0]
    assert logits.shape == (360, 10)
    assert np.mean(logits.argmax(axis=1) == task.labels) == task.sklearn_accuracy > 0.95


@pytest.mark.slow
def test_digits_training_is_deterministic() -> None:
    task, again = zoo.digits_task(), train_digits_model(0)
    assert again.model == task.model and np.array_equal(again.labels, task.labels)
    assert all(
        np.array_equal(a[INPUT_NAME], b[INPUT_NAME])
        for a, b in zip(again.calibration, task.calibration, strict=True)
    )
