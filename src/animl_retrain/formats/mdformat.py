"""The MegaDetector results format ("MD format", version 1.6): write it, read it, convert boxes.

Boxes are ``[x_min, y_min, width, height]`` normalised to 0..1 with the origin at the top left; ``conf`` is a
float; ``classifications`` are ``[[class id, conf], ...]`` sorted by descending confidence.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

from animl_retrain.core.checks import finite_number
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json, write_json

FORMAT_VERSION = "1.6"
DETECTION_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}
ANIMAL = "1"
FAILURE_IMAGE_OPEN = "Failure image access"  # MegaDetector's own failure string for an unreadable image
# A box covering this share of both sides of the frame is an image-level label ("there is a fox in this
# image"), not a located animal: Animl stores image-level labels as full-frame boxes.
FULL_FRAME_COVER = 0.95


def new_results(detector: str, classification_labels: list[str] | None = None, **info: Any) -> dict[str, Any]:
    """An empty results document with the standard detection categories."""
    data: dict[str, Any] = {
        "info": {
            "format_version": FORMAT_VERSION,
            "detector": detector,
            "detection_completion_time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
            **info,
        },
        "detection_categories": dict(DETECTION_CATEGORIES),
        "images": [],
    }
    if classification_labels is not None:
        data["classification_categories"] = {str(i): name for i, name in enumerate(classification_labels)}
    return data


def normalise_box(x: float, y: float, w: float, h: float, width: int, height: int) -> tuple[list[float], bool] | None:
    """Convert an absolute-pixel box to a normalised one clipped to the frame.

    Returns ``(box, clipped)``, or None when nothing of the box lies inside the frame.
    """
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        return None
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    box = [
        round(x0 / width, 6),
        round(y0 / height, 6),
        round((x1 - x0) / width, 6),
        round((y1 - y0) / height, 6),
    ]
    return box, clipped


def box_problem(bbox: object) -> str | None:
    """Why a normalised ``[x, y, w, h]`` box cannot be cropped, or None when it can.

    Unusable: not four finite numbers, no area, or wholly outside the frame. A box partly outside the frame is
    usable: the crop is zero-padded there.
    """
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(finite_number(v) for v in bbox):
        return f"bbox {bbox!r:.80} is not four finite numbers"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return f"bbox {list(bbox)} has zero or negative size"
    if x >= 1 or y >= 1 or x + w <= 0 or y + h <= 0:
        return f"bbox {list(bbox)} lies wholly outside the image (coordinates are normalised to 0..1)"
    return None


def is_full_frame(bbox: list[float]) -> bool:
    """Whether a normalised ``[x, y, w, h]`` box is an image-level label rather than a located animal."""
    return bbox[2] >= FULL_FRAME_COVER and bbox[3] >= FULL_FRAME_COVER


def write_results(path: Path, data: dict[str, Any]) -> None:
    """Write a results file atomically."""
    write_json(Path(path), data)


def read_results(path: Path) -> dict[str, Any]:
    """Read a results file and check the parts this project relies on."""
    data = read_json(Path(path), "MegaDetector results file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PipelineError(f"{path}: not a MegaDetector results file (no 'images' list)")
    if not isinstance(data.get("detection_categories"), dict):
        raise PipelineError(f"{path}: no 'detection_categories'")
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("file"), str):
            raise PipelineError(f"{path}: images[{i}] has no 'file'")
        detections = im.get("detections")
        if detections is not None and not isinstance(detections, list):
            raise PipelineError(f"{path}: images[{i}] ({im['file']!r:.200}) 'detections' must be a list or null")
        for j, det in enumerate(detections or []):
            where = f"{path}: images[{i}] ({im['file']!r:.200}) detections[{j}]"
            box = det.get("bbox") if isinstance(det, dict) else None
            if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) or v is None for v in box):
                raise PipelineError(f"{where} has no valid 'bbox'")
            if None in box:  # strict JSON writes an undefined coordinate (NaN) as null; crop reports the box
                det["bbox"] = [math.nan if v is None else v for v in box]
            if "conf" in det and not _is_number(det["conf"]):
                raise PipelineError(f"{where}: 'conf' must be a number, got {det['conf']!r:.40}")
            if "category" in det and not isinstance(det["category"], str):
                raise PipelineError(f"{where}: 'category' must be a string, got {det['category']!r:.40}")
    return data


def _is_number(v: object) -> bool:
    """A JSON number, finite or not: results files may carry NaN boxes, which crop reports as unusable."""
    return isinstance(v, int | float) and not isinstance(v, bool)
