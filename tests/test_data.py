"""Calibration data files: .npz/.npy/folders, labels, safe casts, clear errors, held-out split."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from compressor.data import load_dataset, split
from edge_runtime.core.errors import DataError
from edge_runtime.core.types import TensorSpec

IMAGE = (TensorSpec("image", "float32", ("N", 3, 4, 4)),)
TWO_INPUTS = (TensorSpec("ids", "int64", ("N", 8)), TensorSpec("mask", "int64", ("N", 8)))


def test_npz_stack_of_batch1_samples_with_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 3, 4, 4))  # float64 on purpose: safely cast
    np.savez(tmp_path / "calib.npz", image=images, labels=np.arange(5))
    data = load_dataset(tmp_path / "calib.npz", IMAGE)
    assert len(data.samples) == 5 and data.samples[2]["image"].shape == (1, 3, 4, 4)
    assert data.samples[2]["image"].dtype == np.float32
    np.testing.assert_allclose(data.samples[2]["image"][0], images[2].astype(np.float32))
    assert data.labels.tolist() == [0, 1, 2, 3, 4]
    assert data.notes == ("'image' cast to float32",)


def test_rank_plus_one_arrays_are_whole_feeds_and_folders_concatenate(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    np.savez(folder / "a.npz", ids=np.ones((2, 1, 8), np.int64), mask=np.ones((2, 1, 8), np.int64))
    np.savez(folder / "b.npz", ids=np.zeros((3, 8), np.int64), mask=np.zeros((3, 8), np.int64))
    data = load_dataset(folder, TWO_INPUTS)
    assert [s["ids"].shape for s in data.samples] == [(1, 8)] * 5
    assert data.labels is None


def test_npy_is_for_single_input_models(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 4, 4), np.float32))
    assert len(load_dataset(tmp_path / "x.npy", IMAGE).samples) == 4
    with pytest.raises(DataError, match="fits single-input models"):
        load_dataset(tmp_path / "x.npy", TWO_INPUTS)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"img": np.zeros((2, 3, 4, 4), np.float32)}, "'img' is not an input of the model"),
        ({"image": np.zeros((2, 3, 5, 4), np.float32)}, "has shape [1, 3, 5, 4], the model takes"),
        ({"image": np.zeros((2, 4, 4), np.float32)}, "give [samples, ...] with rank 4 or 5"),
        ({"image": np.zeros((2, 3, 4, 4), np.uint8)}, "is uint8, the model takes float32"),
        ({"image": np.zeros((2, 3, 4, 4), np.float32), "labels": np.arange(3)}, "3 labels for 2 samples"),
    ],
)
def test_mismatches_are_named(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset(tmp_path / "bad.npz", IMAGE)


def test_missing_paths_and_wrong_suffixes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(tmp_path / "nope.npz", IMAGE)
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"expected an \.npz or \.npy file"):
        load_dataset(tmp_path / "data.csv", IMAGE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.npz or \.npy files"):
        load_dataset(tmp_path / "empty", IMAGE)


def test_split_is_deterministic_disjoint_and_keeps_labels_aligned(tmp_path: Path) -> None:
    images = np.arange(8 * 48, dtype=np.float32).reshape(8, 3, 4, 4)
    np.savez(tmp_path / "calib.npz", image=images, labels=np.arange(8) * 10)
    data = load_dataset(tmp_path / "calib.npz", IMAGE)
    calibration, validation = split(data, seed=3)
    again = split(data, seed=3)[1]
    assert len(calibration.samples) == 6 and len(validation.samples) == 2
    ids = lambda part: [int(s["image"][0, 0, 0, 0]) // 48 for s in part.samples]  # noqa: E731
    assert ids(validation) == ids(again)
    assert not set(ids(calibration)) & set(ids(validation))
    assert validation.labels.tolist() == [i * 10 for i in ids(validation)]
