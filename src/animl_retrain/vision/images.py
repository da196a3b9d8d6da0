"""Opening camera-trap images safely: a pixel ceiling against decompression bombs, truncation as an error."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageFile

try:  # the optional C extension (vision/_jpegcrop.c): partial JPEG decoding; Pillow does everything without it
    from animl_retrain.vision import _jpegcrop
except ImportError:
    _jpegcrop = None

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
            if scale > 1 and img.format in ("JPEG", "MPO"):  # an MPO's first picture is a JPEG (the one decoded)
                img.draft("RGB", (-(-full[0] // scale), -(-full[1] // scale)))
            img.load()
            drafted = -(-full[0] // pillow_scale(*full, scale)), -(-full[1] // pillow_scale(*full, scale))
            if img.format in ("JPEG", "MPO") and img.size != drafted:  # draft() not taken as asked: decode whole
                if hasattr(source, "seek"):
                    source.seek(0)
                img = Image.open(source)
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


def pillow_scale(width: int, height: int, scale: int) -> int:
    """The DCT scale Pillow's ``draft()`` really takes when asked for 1/``scale`` (it can take less)."""
    if scale <= 1:
        return 1
    wanted = min(width // -(-width // scale), height // -(-height // scale))
    return next(s for s in (8, 4, 2, 1) if wanted >= s)


@dataclass(frozen=True)
class RGBRows:
    """A decoded region as the C extension returns it: ``height`` rows of ``width`` RGB pixels, packed."""

    data: bytes
    width: int
    height: int

    def image(self) -> Image.Image:
        """The region as a Pillow image (a copy: Pillow keeps RGB as 4 bytes per pixel)."""
        return Image.frombuffer("RGB", (self.width, self.height), self.data, "raw", "RGB", 0, 1)


def cut_resized(rows: RGBRows, box: tuple[int, int, int, int], size: int) -> Image.Image | None:
    """``rows``' ``box`` (zeros outside) resized to ``size`` x ``size``: exactly Pillow's crop + BILINEAR resize.

    The extension's resize (3x Pillow's on the crop stage's squares) reproduces Pillow's weights and rounding and
    its horizontal-then-vertical order. Pillow 13 takes the vertical pass first for some boxes taller than wide
    (seen from h/w about 1.03 on; which rule it follows is not documented), so only boxes whose sides differ by at
    most one pixel (every square the crop rule cuts) take this path, checked against Pillow for every such shape
    up to 4x the output size in tests/test_jpegcrop.py. None: not for this path (no extension, other shapes).
    """
    left, top, right, bottom = box
    if _jpegcrop is None or abs((right - left) - (bottom - top)) > 1 or right <= left or bottom <= top:
        return None
    pixels = _jpegcrop.resize(rows.data, rows.width, rows.height, left, top, right, bottom, size)
    return Image.frombuffer("RGB", (size, size), pixels, "raw", "RGB", 0, 1)


def open_region(
    path: Path,
    max_pixels: int,
    scale_for: Callable[[int, int], int],
    region_for: Callable[[int, int], tuple[int, int, int, int]],
    packed: bool = False,
):
    """Decode only the part of an image that is needed, at reduced scale, as RGB.

    Baseline YCbCr or greyscale JPEGs go to the optional C extension (libjpeg-turbo's partial decoding: rows
    above the region skip the IDCT and colour conversion, rows below are never decoded, columns outside are
    cropped), which gives exactly the pixels of Pillow's decode at the same scale. Everything else (PNG,
    progressive JPEG, CMYK, any decoder warning, or no extension)
    is decoded whole by :func:`open_image`, with its checks and errors.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this.
        scale_for: given the full ``(width, height)``, the DCT scale (1, 2, 4 or 8) wanted.
        region_for: given the scaled ``(width, height)``, the ``(x0, y0, x1, y1)`` box needed from it.
        packed: return the extension's decode as :class:`RGBRows` (no copy into a Pillow image); the Pillow
            fallback still returns an image.

    Returns:
        ``(image, offset, scaled_size)``: the decoded part, where its top-left corner lies in the scaled image,
        and the scaled image's size (the same coordinates the whole-image fallback returns, at offset 0, 0).
    """
    _strict()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                kind, mode, (w, h), progressive = img.format, img.mode, img.size, "progression" in img.info
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        kind = None  # open_image below raises the error, worded as everywhere else
    fast = kind in ("JPEG", "MPO") and mode in ("RGB", "L") and not progressive and w * h <= max_pixels
    if _jpegcrop is not None and fast:
        scale = pillow_scale(w, h, scale_for(w, h))
        size = (-(-w // scale), -(-h // scale))
        x0, y0, x1, y1 = region_for(*size)
        data = Path(path).read_bytes()
        # Without the end marker as its last bytes, the file is read to the first picture's end (truncation check)
        decoded = _jpegcrop.decode(data, scale, x0, y0, x1, y1, not data.endswith(JPEG_EOI))
        if decoded is not None:
            pixels, left, top, width, height = decoded
            rows = RGBRows(pixels, width, height)
            return (rows if packed else rows.image()), (left, top), size
    img, _ = open_image(path, max_pixels, scale_for)
    return img, (0, 0), img.size


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


# A marker inside entropy-coded data: FF followed by anything but a stuffed 00, a restart marker or a fill FF.
_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def jpeg_end(data: bytes) -> int | None:
    """Where a JPEG's first picture ends (just past its end-of-image marker), found from its markers alone.

    Marker segments carry their length and are skipped whole (an EXIF thumbnail, with its own end marker, sits in
    APP1); entropy-coded data cannot contain a marker (an FF byte is stuffed as FF 00), so after a scan the next
    marker is found by a search in C, without decoding: the end marker, or the tables and header of the next
    scan of a progressive JPEG. Bytes after the end marker (an MPO's second picture, a camera's maker data) are
    not read. None when the structure shows no end (a layout this walk does not follow, or a file cut inside a
    marker segment).

    Raises:
        BadImageError: a scan's data runs to the end of the file: the file is truncated (a decoder would pad it,
            silently when the bytes left happen to decode, as zeros padding a cut-short file do).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, size, scanned = 2, len(data), False
    while pos + 1 < size:
        if data[pos] != 0xFF:
            return None  # bytes between segments: libjpeg skips them with a warning; leave it to the decoder
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:
            return pos + 2 if scanned else None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7 or length < 2 or pos + 4 > size:
            return None  # a marker without a length out of place, or a segment cut short
        pos += 2 + length
        if marker == 0xDA:  # start of scan: its entropy-coded data follows the header
            scanned = True
            found = _MARKER.search(data, min(pos, size))
            if found is None:
                raise BadImageError(
                    "cannot decode: truncated JPEG: its scan data runs to the end of the file, with no end marker"
                )
            pos = found.start()
    return None


def verify_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Prove the image is whole (not truncated, not garbage, under the pixel ceiling); return its full size.

    A JPEG (or MPO, whose first picture is one) whose header parses and whose markers lead to the end-of-image
    marker of its first picture (:func:`jpeg_end`) is whole: a truncated file lacks that marker, which cannot
    occur inside the entropy-coded data, and one whose scan data runs to the end of the file is refused. Bytes
    after the marker (an MPO's other pictures, a camera's maker data) are allowed. That walk costs well under a
    millisecond, where decoding a 5 MP JPEG costs ~10 ms of a core even at 1/8 scale (the whole Huffman stream
    is read), a decode the crop stage does anyway and reports failures of. Every other file (other formats, or a
    JPEG whose layout the walk does not follow) is decoded at reduced scale, which raises on a broken stream.
    """
    _strict()
    try:
        data = Path(path).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
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
    if kind in ("JPEG", "MPO") and jpeg_end(data) is not None:
        return full
    _, full = open_image(io.BytesIO(data), max_pixels=max_pixels, scale_for=lambda w, h: 8)
    return full
