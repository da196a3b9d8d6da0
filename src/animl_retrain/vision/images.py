"""Opening camera-trap images safely: a pixel ceiling against decompression bombs, truncation as an error."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile

# Full-size camera-trap frames are at most ~50 MP; anything far beyond that is a bomb or a broken header.
DEFAULT_MAX_PIXELS = 120_000_000
JPEG_EOI = b"\xff\xd9"

ImageFile.LOAD_TRUNCATED_IMAGES = False


def _strict() -> None:
    """Treat truncation as an error again, whatever a library imported later did to Pillow's global.

    megadetector's ``visualization_utils`` sets ``LOAD_TRUNCATED_IMAGES = True`` on import; truncated images
    would then load silently, padded with grey.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImageError(Exception):
    """The file is not an image we can decode, or is larger than the configured ceiling."""


def open_image(
    source: Path | BinaryIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    scale_for: Callable[[int, int], int] | None = None,
):
    """Open and fully decode an image as RGB.

    Args:
        source: the image file, or a binary stream.
        max_pixels: refuse images with more pixels than this (PIL's own guard stays on as well).
        scale_for: given the full ``(width, height)``, the factor (1, 2, 4 or 8) by which the JPEG decoder may
            scale the image down while decoding; decoding at reduced scale is several times faster.

    Returns:
        ``(image, (width, height))`` where the size is the file's full size, before any reduced-scale decoding.
    """
    _strict()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            full = img.size
            if full[0] * full[1] > max_pixels:
                raise BadImageError(f"{full[0]}x{full[1]} pixels is over the ceiling of {max_pixels}")
            scale = scale_for(*full) if scale_for else 1
            if scale > 1 and img.format == "JPEG":
                img.draft("RGB", (-(-full[0] // scale), -(-full[1] // scale)))
            img.load()
            if img.mode != "RGB":  # convert() of an RGB image would copy every pixel for nothing
                img = img.convert("RGB")
            return img, full
    except BadImageError:
        raise
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise BadImageError(f"cannot decode: {e}") from e


def image_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Read an image's size from its header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot read header: {e}") from e
    if w * h > max_pixels:
        raise BadImageError(f"{w}x{h} pixels is over the ceiling of {max_pixels}")
    return w, h


def _ends_with_jpeg_eoi(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < 4:
            return False
        f.seek(-2, 2)
        return f.read(2) == JPEG_EOI


def verify_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Prove the image is whole (not truncated, not garbage, under the pixel ceiling); return its full size.

    A JPEG whose header parses and whose data ends with the end-of-image marker is whole: a truncated file
    lacks the marker, which cannot occur inside the entropy-coded data. That check costs microseconds, where
    decoding a 3 MP JPEG costs ~6 ms of a core even at 1/8 scale (the whole Huffman stream is read), a decode
    the crop stage does anyway and reports failures of. Every other file (other formats, or a JPEG with bytes
    after its end marker or none) is decoded at reduced scale, which raises on a broken stream.
    """
    _strict()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                kind, full = img.format, img.size
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise BadImageError(f"cannot decode: {e}") from e
    if full[0] * full[1] > max_pixels:
        raise BadImageError(f"{full[0]}x{full[1]} pixels is over the ceiling of {max_pixels}")
    if kind == "JPEG" and _ends_with_jpeg_eoi(path):
        return full
    _, full = open_image(path, max_pixels=max_pixels, scale_for=lambda w, h: 8)
    return full
