"""Real pretrained models (PP-OCR, shipped in rapidocr-onnxruntime) with rendered evaluation data.

Images are rendered with Pillow and preprocessed the way rapidocr 1.4.4 does it (BGR order,
OpenCV-style bilinear resize, (x/255 - 0.5) / 0.5, zero padding on the right), in numpy only:
importing the rapidocr package would pull in OpenCV.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from compressor.demo_model import DigitsTask, train_digits_model

__all__ = [
    "CLS_SHAPE",
    "REC_SHAPE",
    "cls_preprocess",
    "ctc_greedy_decode",
    "det_preprocess",
    "detection_dataset",
    "detection_samples",
    "digits_task",
    "ppocr_model",
    "rec_charset",
    "rec_preprocess",
    "recognition_dataset",
    "recognition_lines",
    "render_line",
    "resize_bilinear",
    "text_direction_dataset",
]

ModelKind = Literal["cls", "det", "rec"]
CLS_SHAPE = (3, 48, 192)
"""rapidocr's `cls_image_shape`."""
REC_SHAPE = (3, 48, 320)
"""rapidocr's `rec_img_shape`."""
_MODEL_FILES = {
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
}
_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
_FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
_WORD_TEXT = (
    "the quick brown fox jumps over lazy dog open close exit entry north south east west "
    "total price order invoice date time station platform gate room floor level street road "
    "avenue park market city hotel coffee bread milk sale new free stop slow danger warning "
    "power water light sensor device model serial number batch lot page chapter section "
    "Monday Friday January March June October London Berlin Paris Tokyo Sydney Boston"
)
_WORDS = tuple(_WORD_TEXT.split())


# ---------------------------------------------------------------- models


def _rapidocr_dir() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("rapidocr-onnxruntime is not installed (pip install -e '.[test]')")
    return Path(next(iter(spec.submodule_search_locations)))


def ppocr_model(kind: ModelKind) -> Path:
    """Path of a PP-OCR ONNX model shipped in rapidocr-onnxruntime: text direction, detection or recognition."""
    path = _rapidocr_dir() / "models" / _MODEL_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


@functools.cache
def rec_charset() -> tuple[str, ...]:
    """CTC classes of the recognizer: blank, the dictionary from the model's metadata, then space."""
    import onnx

    model = onnx.load(str(ppocr_model("rec")), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ("", *meta["character"].splitlines(), " ")


def ctc_greedy_decode(probs: np.ndarray) -> list[str]:
    """Best-path CTC decode of rec outputs [N, T, C]: argmax, merge repeats, drop blanks."""
    charset = rec_charset()
    lines = []
    for best in np.asarray(probs).argmax(axis=-1):
        keep = np.ones(len(best), dtype=bool)
        keep[1:] = best[1:] != best[:-1]
        keep &= best != 0
        lines.append("".join(charset[i] for i in best[keep]))
    return lines


@functools.cache
def digits_task(seed: int = 0) -> DigitsTask:
    """The embedded digits MLP with its data (trained once per process and seed)."""
    return train_digits_model(seed)


# ---------------------------------------------------------------- preprocessing (as rapidocr does)


def _axis_taps(out_len: int, in_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src = (np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5
    lo = np.floor(src).astype(np.int64)
    frac = (src - lo).astype(np.float32)
    frac[lo < 0] = 0.0
    lo = np.clip(lo, 0, in_len - 1)
    frac[lo >= in_len - 1] = 0.0
    return lo, np.minimum(lo + 1, in_len - 1), frac


def resize_bilinear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a uint8 HxWxC image like `cv2.resize(img, (width, height))` (half-pixel bilinear)."""
    y0, y1, fy = _axis_taps(height, img.shape[0])
    x0, x1, fx = _axis_taps(width, img.shape[1])
    src = img.astype(np.float32)
    rows = src[y0] * (1 - fy)[:, None, None] + src[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _normalize_chw(img: np.ndarray) -> np.ndarray:
    return ((img.astype(np.float32).transpose(2, 0, 1) / 255.0) - 0.5) / 0.5


def _resize_norm_pad(img_bgr: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    channels, height, width = shape
    ratio = img_bgr.shape[1] / img_bgr.shape[0]
    resized_w = min(width, math.ceil(height * ratio))
    out = np.zeros((1, channels, height, width), dtype=np.float32)
    out[0, :, :, :resized_w] = _normalize_chw(resize_bilinear(img_bgr, resized_w, height))
    return out


def cls_preprocess(img_bgr: np.ndarray) -> np.ndarray:
    """A text-line crop (BGR uint8) as the cls input [1, 3, 48, 192] (rapidocr `resize_norm_img`)."""
    return _resize_norm_pad(img_bgr, CLS_SHAPE)


def rec_preprocess(img_bgr: np.ndarray) -> np.ndarray:
    """A text-line crop (BGR uint8) as the rec input [1, 3, 48, 320] (lines wider than 320/48 squeeze)."""
    return _resize_norm_pad(img_bgr, REC_SHAPE)


def det_preprocess(img_bgr: np.ndarray, limit_side_len: int = 736) -> np.ndarray:
    """A whole image (BGR uint8) as the det input [1, 3, H, W], sides multiples of 32 (limit_type "min")."""
    h, w = img_bgr.shape[:2]
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    new_h = round(int(h * ratio) / 32) * 32
    new_w = round(int(w * ratio) / 32) * 32
    resized = img_bgr if (new_h, new_w) == (h, w) else resize_bilinear(img_bgr, new_w, new_h)
    return ((resized.astype(np.float64) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


# ---------------------------------------------------------------- rendering


@functools.cache
def _font(index: int, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    files = [_FONT_DIR / name for name in _FONT_FILES if (_FONT_DIR / name).is_file()]
    if not files:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(files[index % len(files)]), size)


def _random_text(rng: np.random.Generator) -> str:
    kind = rng.integers(4)
    if kind == 0:
        return " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 3))))
    if kind == 1:
        return f"{rng.choice(_WORDS).capitalize()} {rng.integers(1, 999)}"
    if kind == 2:
        return f"{rng.integers(1, 28):02d}.{rng.integers(1, 12):02d}.{rng.integers(1990, 2030)}"
    letters = "".join(rng.choice(list("ABCDEFGHJKLMNPRSTUVWXYZ"), size=int(rng.integers(2, 4))))
    return f"{letters}-{rng.integers(100, 99999)}"


def _contrasting_colors(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    light = rng.random() < 0.75
    base = rng.integers(150, 256, size=3) if light else rng.integers(0, 100, size=3)
    ink = rng.integers(0, 110, size=3) if light else rng.integers(160, 256, size=3)
    return tuple(int(v) for v in base), tuple(int(v) for v in ink)


def render_line(
    rng: np.random.Generator, text: str | None = None, max_ratio: float | None = None
) -> tuple[np.ndarray, str]:
    """A tight text-line crop (BGR uint8) with varied font, size, margins, contrast and noise."""
    text = text if text is not None else _random_text(rng)
    font = _font(int(rng.integers(len(_FONT_FILES))), int(rng.integers(20, 44)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(2, 14)), int(rng.integers(2, 10))
    width, height = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    if max_ratio is not None and width / height > max_ratio and " " in text:
        return render_line(rng, text.rsplit(" ", 1)[0], max_ratio)
    background, ink = _contrasting_colors(rng)
    image = Image.new("RGB", (width, height), background)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, fill=ink, font=font)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    pixels = np.asarray(image, dtype=np.float32)
    shade = np.linspace(0, rng.uniform(-40, 40), width, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, rng.uniform(0, 10), pixels.shape).astype(np.float32)
    pixels = np.clip(pixels + shade + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels[:, :, ::-1]), text


# ---------------------------------------------------------------- datasets


def text_direction_dataset(n: int, seed: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """`n` cls feeds {"x": [1, 3, 48, 192]} of text lines, half of them (shuffled) turned 180° (label 1)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 2
    rng.shuffle(labels)
    feeds = []
    for label in labels:
        line, _ = render_line(rng)
        if label:
            line = np.ascontiguousarray(line[::-1, ::-1])
        feeds.append({"x": cls_preprocess(line)})
    return feeds, labels


def recognition_lines(n: int, seed: int) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """`n` rec feeds {"x": [1, 3, 48, 320]} of text lines that fit unsqueezed, with their text."""
    rng = np.random.default_rng(seed)
    max_ratio = REC_SHAPE[2] / REC_SHAPE[1]
    feeds, texts = [], []
    for _ in range(n):
        line, text = render_line(rng, max_ratio=max_ratio)
        feeds.append({"x": rec_preprocess(line)})
        texts.append(text)
    return feeds, texts


def recognition_dataset(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`n` rec feeds {"x": [1, 3, 48, 320]} of rendered text lines."""
    return recognition_lines(n, seed)[0]


@functools.cache
def _backgrounds() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(img, dtype=np.uint8) for img in load_sample_images().images)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    photos = _backgrounds()
    photo = photos[int(rng.integers(len(photos)))]
    side = int(rng.integers(min(size, *photo.shape[:2]) // 2, min(photo.shape[:2]) + 1))
    top = int(rng.integers(photo.shape[0] - side + 1))
    left = int(rng.integers(photo.shape[1] - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    return crop.resize((size, size), Image.Resampling.BILINEAR)


def _paste_line(rng: np.random.Generator, canvas: Image.Image, mask: np.ndarray) -> None:
    size = canvas.size[0]
    text = _random_text(rng)
    font = _font(int(rng.integers(len(_FONT_FILES))), int(rng.integers(16, max(17, size // 10))))
    left, top, right, bottom = font.getbbox(text)
    if right - left >= size - 8:
        return
    x = int(rng.integers(4, size - (right - left) - 3))
    y = int(rng.integers(4, size - (bottom - top) - 3))
    box = (x, y, x + right - left, y + bottom - top)
    region = np.asarray(canvas.crop(box), dtype=np.float32).mean()
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.4:
        background, ink = _contrasting_colors(rng)
        draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=background)
    else:
        ink = (20, 20, 20) if region > 128 else (240, 240, 240)
    draw.text((x - left, y - top), text, fill=ink, font=font)
    mask[box[1] : box[3], box[0] : box[2]] = True


def detection_samples(n: int, seed: int, size: int = 320) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` (BGR image [size, size, 3], bool mask of the text boxes) pairs: text lines on photo crops."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        canvas = _background(rng, size)
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(1, 5))):
            _paste_line(rng, canvas, mask)
        pixels = np.asarray(canvas, dtype=np.uint8)[:, :, ::-1]
        samples.append((np.ascontiguousarray(pixels), mask))
    return samples


def detection_dataset(n: int, seed: int, size: int = 320) -> list[dict[str, np.ndarray]]:
    """`n` det feeds {"x": [1, 3, size, size]} (size a multiple of 32) of text on photo crops."""
    if size % 32:
        raise ValueError(f"size must be a multiple of 32, got {size}")
    return [{"x": det_preprocess(image, size)} for image, _ in detection_samples(n, seed, size)]
