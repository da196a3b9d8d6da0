"""The one definition of how a detection becomes model input, shared by crop, training, evaluation and serving.

1. **Square crop** around the box: side = max(w, h), centred on the box, shifted to stay inside the image
   where it fits, zero-padded where it cannot (the rule of MegaDetector's ``crop_detections`` with square crops
   and of Animl's MIRAv2 handler).
2. **Resize** the square to ``image_size`` with PIL's antialiased bilinear filter.
3. **Normalise** with the ImageNet mean and standard deviation.

The crop stage does steps 1-2 once and stores the result; training adds augmentation before step 3; serving
and ``mlflow`` models do 1-3 on the full image. A :class:`Preprocessing` travels with every checkpoint and
registered model, so evaluation, export and serving rebuild exactly the transform the model was trained with.

Steps 1-2 and the :class:`Preprocessing` record are here (PIL only: the CPU image's crop stage uses them); step 3,
the resize of tensors and the training augmentation are built from the record in
:mod:`animl_retrain.modeling.transforms`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RULE = "square-centred-clamped-zero-pad"


def square_region(box: Sequence[float], width: int, height: int) -> tuple[float, float, float]:
    """The square to cut for a normalised ``[x, y, w, h]`` box in a ``width`` x ``height`` image.

    Returns ``(left, top, side)`` in pixels. The square is centred on the box and moved inside the image
    when it fits; when it is larger than the image along an axis it is centred on the image on that axis.
    """
    x, y, w, h = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    side = max(w, h, 1.0)

    def place(start: float, length: float, limit: int) -> float:
        if side >= limit:
            return (limit - side) / 2
        return min(max(start + length / 2 - side / 2, 0.0), limit - side)

    return place(x, w, width), place(y, h, height), side


def draft_scale(boxes: Sequence[Sequence[float]], width: int, height: int, size: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8) that still leaves every crop at least ``size`` pixels wide."""
    smallest = min(max(b[2] * width, b[3] * height) for b in boxes)
    scale = 1
    while scale < 8 and smallest / (scale * 2) >= size:
        scale *= 2
    return scale


def _pixel_square(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    left, top, side = square_region(box, width, height)
    return round(left), round(top), round(left + side), round(top + side)


def cut_square(img: Image.Image, box: Sequence[float], size: int) -> Image.Image:
    """Steps 1-2: cut the square around ``box`` (normalised to ``img``) and resize it to ``size``."""
    square = img.crop(_pixel_square(box, img.width, img.height))  # PIL fills what lies outside with zeros
    return square.resize((size, size), Image.BILINEAR)


def crop_squares(path: Path, boxes: Sequence[Sequence[float]], size: int, max_pixels: int) -> list[Image.Image]:
    """Steps 1-2 for every box of one image file, decoding only the part of it the squares cover, once.

    The same pixels as :func:`cut_square` on the image decoded whole at :func:`draft_scale`; raises
    :class:`~animl_retrain.vision.images.BadImageError` for an image that cannot be decoded.
    """
    from animl_retrain.vision.images import RGBRows, cut_resized, open_region

    def region(width: int, height: int) -> tuple[int, int, int, int]:
        squares = [_pixel_square(b, width, height) for b in boxes]
        x0, y0 = max(0, min(s[0] for s in squares)), max(0, min(s[1] for s in squares))
        x1, y1 = min(width, max(s[2] for s in squares)), min(height, max(s[3] for s in squares))
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

    img, (dx, dy), (width, height) = open_region(
        path, max_pixels, lambda w, h: draft_scale(boxes, w, h, size), region, packed=True
    )
    crops = []
    for box in boxes:
        left, top, right, bottom = _pixel_square(box, width, height)
        square = (left - dx, top - dy, right - dx, bottom - dy)
        crop = cut_resized(img, square, size) if isinstance(img, RGBRows) else None
        if crop is None:  # the Pillow decode (or a box the extension does not resize): Pillow's crop and resize
            img = img.image() if isinstance(img, RGBRows) else img
            crop = img.crop(square).resize((size, size), Image.BILINEAR)
        crops.append(crop)
    return crops


@dataclass(frozen=True)
class Preprocessing:
    """Input size and normalisation of a model; stored with it and used by everything that feeds it."""

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop: str = CROP_RULE
    interpolation: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in checkpoints and MLflow."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_json`."""
        return cls(
            image_size=int(data["image_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            crop=data.get("crop", CROP_RULE),
            interpolation=data.get("interpolation", "bilinear"),
            extra=dict(data.get("extra", {})),
        )

    def crop_from_image(self, image: Image.Image | bytes | Path, box: Sequence[float] | None = None) -> Image.Image:
        """Steps 1-2 on a full image (a PIL image, encoded bytes or a path); ``box`` defaults to the frame."""
        from animl_retrain.vision.images import open_image

        box = list(box) if box is not None else [0.0, 0.0, 1.0, 1.0]
        if not isinstance(image, Image.Image):
            source = io.BytesIO(image) if isinstance(image, bytes | bytearray) else image
            image, _ = open_image(source, scale_for=lambda w, h: draft_scale([box], w, h, self.image_size))
        return cut_square(image.convert("RGB"), box, self.image_size)
