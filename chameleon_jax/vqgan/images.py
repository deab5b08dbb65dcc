"""Image pre/post-processing identical to the official Chameleon tokenizer (spec §4.6).

1. EXIF orientation applied; 16-bit and float grayscale scaled to 8 bits; CMYK/palette/gray -> RGB.
2. Transparency: any alpha < 255 is blended onto white (vals = (1−a)·255 + a·rgb, truncated to uint8).
3. Shorter side -> `size` with LANCZOS (new size = round(scale·w), round(scale·h)), centre crop.
4. x/127.5 − 1 in [−1, 1] (the official mapping; HF's 0.0078 rescale differs slightly, spec §4.6).
Decoding: clamp to [−1, 1], (x+1)/2·255, truncated to uint8.

A file that cannot be decoded raises `BadImage` (with its reason) from `load_image`; `load_images`
turns those into counted, logged skips and never stops.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
from typing import Iterable, Union

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

ImageRef = Union[str, os.PathLike, bytes, Image.Image]


class BadImage(ValueError):
    """An image that cannot be decoded; the message says why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, upright, transparency composited on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F":
            top = 1.0 if a.max() <= 1.0 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "RGB":
        return img
    if img.mode == "CMYK":
        return img.convert("RGB")
    rgba = np.asarray(img.convert("RGBA"))
    if not (rgba[..., 3] < 255).any():
        return img.convert("RGB")
    # The float64 blend costs 56 bytes per pixel in temporaries; a band of rows at a time bounds that
    # at a few MB whatever the image size, with the same arithmetic (so the same bytes) per pixel.
    rgb = np.empty(rgba.shape[:2] + (3,), np.uint8)
    band = max(1, (1 << 18) // max(rgba.shape[1], 1))
    for y in range(0, rgba.shape[0], band):
        part = rgba[y:y + band]
        alpha = part[..., 3:4] / 255.0
        rgb[y:y + band] = ((1.0 - alpha) * 255.0 + alpha * part[..., :3]).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    scale = size / min(img.size)
    img = img.resize((round(scale * img.width), round(scale * img.height)), Image.LANCZOS)
    x0, y0 = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((x0, y0, x0 + size, y0 + size))


def preprocess(img: Image.Image, size: int = 512) -> np.ndarray:
    """PIL image -> float32 [size, size, 3] in [-1, 1]."""
    x = np.asarray(resize_center_crop(to_rgb(img), size), dtype=np.float32)
    return x / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """Decoder output in [-1, 1] (any float array) -> uint8, as the official postprocessing."""
    x = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    return ((x + 1.0) / 2.0 * 255.0).astype(np.uint8)


def max_pixels_for(size: int) -> int:
    """The default decoded-pixel limit for images preprocessed to `size`: 64·size² (4096² at 512 px),
    and never below 2**24 (16.8 MP).

    An RGB image decodes to 3 bytes per pixel and preprocessing holds a few copies (mode conversion,
    the resize input), so this keeps one image's working set near 0.2 GB where Pillow's own bomb
    guard (89 MP) allows ~1 GB. Larger JPEGs are decoded reduced (`open_image`), so only formats
    without reduced decoding (PNG, WebP, ...) ever meet the limit.
    """
    return max(64 * size * size, 1 << 24)


def open_image(ref: ImageRef, *, size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Opens and fully decodes a path, bytes or PIL image; raises BadImage naming the cause.

    With `size` (the preprocessing target), a JPEG whose shorter side is at least 4·size is decoded
    at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's draft mode), never below 2·size, so the
    LANCZOS resize still works from at least twice the target. With `max_pixels`, an image that
    would decode to more pixels than that is refused from its header, before any pixel is decoded.
    """
    if isinstance(ref, Image.Image):
        return ref
    name = "<bytes>" if isinstance(ref, (bytes, bytearray)) else str(ref)
    try:
        img = Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref)
        if size and img.format == "JPEG":
            img.draft(img.mode, (2 * size, 2 * size))
        if max_pixels and img.width * img.height > max_pixels:
            raise BadImage(f"{name}: {img.width}x{img.height} = {img.width * img.height / 1e6:.1f} MP decoded "
                           f"exceeds the limit of {max_pixels / 1e6:.1f} MP for {size or '?'} px images; "
                           "downscale it, or raise the limit (pretokenize --max_image_pixels)")
        img.load()  # decoding is lazy: truncation only shows here
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, BadImage):
            raise
        raise BadImage(f"{name}: {type(e).__name__}: {e}") from e


def load_image(ref: ImageRef, size: int = 512, max_pixels: int | None = None) -> np.ndarray:
    """Path / bytes / PIL image -> float32 [size, size, 3] in [-1, 1]; raises BadImage.

    `max_pixels` defaults to `max_pixels_for(size)`; 0 turns the limit off (Pillow's bomb guard remains).
    """
    img = open_image(ref, size=size, max_pixels=max_pixels_for(size) if max_pixels is None else max_pixels)
    try:
        return preprocess(img, size)
    except (OSError, ValueError) as e:
        raise BadImage(f"{ref if isinstance(ref, (str, os.PathLike)) else '<image>'}: {type(e).__name__}: {e}") from e


@dataclasses.dataclass
class Skips:
    """Counted skips with their reasons (kept for the run's report)."""
    count: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        self.reasons.append(reason)
        log.warning("skipping image (%d so far): %s", self.count, reason)


def load_images(refs: Iterable[ImageRef], size: int = 512, skips: Skips | None = None):
    """Loads what it can: (float32 [N, size, size, 3], kept indices, Skips). Corrupt files are skipped."""
    skips = skips if skips is not None else Skips()
    out, kept = [], []
    for i, ref in enumerate(refs):
        try:
            out.append(load_image(ref, size))
            kept.append(i)
        except BadImage as e:
            skips.add(str(e))
    arr = np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)
    return arr, kept, skips
