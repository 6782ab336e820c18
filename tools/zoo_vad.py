"""A real pretrained recurrent model: Silero VAD (16 kHz, opset 15), shipped inside the `silero-vad`
wheel, with a synthetic audio stream whose voiced chunks are known.

Install it without its torch/torchaudio requirements: ``pip install --no-deps silero-vad==6.2.3``
(only the ONNX file is used; the package is never imported).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["CHUNK", "CONTEXT", "SAMPLE_RATE", "vad_feeds", "vad_model", "vad_stream"]

SAMPLE_RATE = 16000
CHUNK = 512
"""Samples per decision at 16 kHz."""
CONTEXT = 64
"""Samples of the previous chunk the model sees before each chunk (as silero's own wrapper feeds it)."""
_MODEL_FILE = "silero_vad_16k_op15.onnx"


def vad_model() -> Path:
    """Path of the Silero VAD ONNX model inside the installed silero-vad package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("silero-vad is not installed (pip install --no-deps silero-vad==6.2.3)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / _MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def _voiced(times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A voice-like segment: harmonics of a gliding pitch under a syllable-rate envelope."""
    f0 = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * 3 * times))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 6) * times))
    return rng.uniform(0.05, 0.3) * voice * envelope


def vad_stream(chunks: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One batched feed as a user holds it (`input` [chunks, 576], `state` [2, chunks, 128] zeros,
    `sr` given once) and, per chunk, whether it lies in a voiced segment."""
    rng = np.random.default_rng(seed)
    times = np.arange(chunks * CHUNK) / SAMPLE_RATE
    audio = rng.normal(0, 0.003, times.size)
    voiced = np.zeros(chunks, bool)
    position = 0
    while position < times.size:
        length = int(rng.integers(8, 30)) * CHUNK
        if rng.random() < 0.5:
            audio[position : position + length] += _voiced(times[position : position + length], rng)
            voiced[position // CHUNK : (position + length) // CHUNK] = True
        position += length
    frames = audio.astype(np.float32).reshape(chunks, CHUNK)
    context = np.concatenate([np.zeros((1, CONTEXT), np.float32), frames[:-1, -CONTEXT:]])
    feed = {
        "input": np.concatenate([context, frames], axis=1),
        "state": np.zeros((2, chunks, 128), np.float32),
        "sr": np.array(SAMPLE_RATE, np.int64),
    }
    return feed, voiced


def vad_feeds(chunks: int, seed: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """The stream as per-chunk feeds with the states the fp32 model itself carries, and the labels."""
    from compressor.data import carry_states
    from compressor.measure import make_session
    from edge_runtime.config.profiles import load_profile

    feed, voiced = vad_stream(chunks, seed)
    samples = [
        {"input": feed["input"][i : i + 1], "state": feed["state"][:, i : i + 1], "sr": feed["sr"]}
        for i in range(chunks)
    ]
    session = make_session(vad_model().read_bytes(), load_profile("x86-avx2-gateway"))
    names = [out.name for out in session.get_outputs()]
    run = lambda f: dict(zip(names, session.run(None, f), strict=True))  # noqa: E731
    return carry_states(samples, run, {"state": "stateN"}), voiced
