"""Animl's COCO-for-camera-traps (CCT) export: parse and validate it, naming the field and record at fault.

See ``docs/data-contracts.md`` for the format. Structural errors (not JSON, missing keys, duplicate ids,
dangling references, boxes of no size) stop the run with every error listed; records that are merely unusable
(an unsafe ``file_name``) are skipped and reported by the export stage.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from animl_retrain.core.checks import finite_number
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import decode_json

MAX_ERRORS_SHOWN = 15
# Image sides above this are a broken or hostile record (the largest camera-trap frames are ~10,000 px wide).
MAX_SIDE = 1_000_000


@dataclass
class Export:
    """A parsed export: categories by id, image records by id, annotation records in file order."""

    categories: dict[int, str]
    images: dict[str, dict[str, Any]]
    annotations: list[dict[str, Any]]
    info: dict[str, Any]


class _Errors:
    def __init__(self, where: str):
        self.where = where
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = "\n  ".join(self.items[:MAX_ERRORS_SHOWN])
        more = len(self.items) - MAX_ERRORS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise PipelineError(f"{self.where}: {len(self.items)} structural error(s):\n  {shown}{tail}")


def camera_of(file_name: str) -> str:
    """The camera serial in an Animl ``file_name`` (``<project>/<camera serial>/<deployment>/<id>.<ext>``), or "".

    Animl's export has no camera field; its ``file_name`` is built from the project, the camera's serial number
    and the deployment, so the serial is the second of at least three ``/``-separated parts.
    """
    parts = file_name.split("/")
    return parts[1] if len(parts) >= 3 else ""


def parse_datetime(text: str) -> dt.datetime | None:
    """An image's ``datetime`` (ISO 8601, with an offset in Animl's exports) as an aware datetime; None if unusable.

    A time without an offset is read as UTC (only differences between one camera's images are used).
    """
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _record_name(kind: str, index: int, record: object) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{kind}[{index}]" + (f" (id {rid!r})" if rid is not None else "")


def decode(raw: bytes, where: str) -> dict[str, Any]:
    """Decode the export's JSON, with a clear message for broken or absurdly nested files."""
    data = decode_json(raw, where)
    if not isinstance(data, dict):
        raise PipelineError(f"{where}: top level must be a JSON object, got {type(data).__name__}")
    return data


def parse(data: dict[str, Any], where: str) -> Export:
    """Validate a decoded CCT export and return it; raise with every structural error found."""
    errors = _Errors(where)
    for key in ("categories", "images", "annotations"):
        if not isinstance(data.get(key), list):
            errors.add(f"top-level '{key}' is missing or not a list")
    errors.raise_if_any()
    info = data.get("info") if isinstance(data.get("info"), dict) else {}

    categories: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        name = _record_name("categories", i, cat)
        if not isinstance(cat, dict):
            errors.add(f"{name}: must be an object")
            continue
        cid, cname = cat.get("id"), cat.get("name")
        if not isinstance(cid, int) or isinstance(cid, bool):
            errors.add(f"{name}: 'id' must be an integer")
        elif not isinstance(cname, str) or not cname.strip():
            errors.add(f"{name}: 'name' must be a non-empty string")
        elif cid in categories:
            errors.add(f"{name}: duplicate category id {cid}")
        else:
            categories[cid] = cname

    images: dict[str, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        name = _record_name("images", i, img)
        if not isinstance(img, dict):
            errors.add(f"{name}: must be an object")
            continue
        iid = img.get("id")
        if not isinstance(iid, str | int) or isinstance(iid, bool) or iid == "":
            errors.add(f"{name}: 'id' must be a non-empty string")
            continue
        iid = str(iid)
        if iid in images:
            errors.add(f"{name}: duplicate image id {iid!r}")
            continue
        if not isinstance(img.get("file_name"), str):
            errors.add(f"{name}: 'file_name' must be a string")
        keys = [img.get(k) for k in ("serving_bucket_key", "original_relative_path")]
        if not any(isinstance(k, str) and k for k in keys):
            errors.add(f"{name}: needs 'serving_bucket_key' (or legacy 'original_relative_path') as a string")
        for dim in ("width", "height"):
            v = img.get(dim)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_SIDE):
                errors.add(f"{name}: '{dim}' must be a positive integer up to {MAX_SIDE} when present, got {v!r:.40}")
        for opt in ("location", "datetime"):
            v = img.get(opt)
            if v is not None and not isinstance(v, str):
                errors.add(f"{name}: '{opt}' must be a string when present, got {type(v).__name__}")
        images[iid] = img

    annotations: list[dict[str, Any]] = []
    seen_ann: set[str] = set()
    for i, ann in enumerate(data["annotations"]):
        name = _record_name("annotations", i, ann)
        if not isinstance(ann, dict):
            errors.add(f"{name}: must be an object")
            continue
        aid = ann.get("id")
        if not isinstance(aid, str | int) or isinstance(aid, bool) or aid == "":
            errors.add(f"{name}: 'id' must be a non-empty string")
            continue
        if str(aid) in seen_ann:
            errors.add(f"{name}: duplicate annotation id {aid!r}")
            continue
        seen_ann.add(str(aid))
        image_id, cat_id = ann.get("image_id"), ann.get("category_id")
        if not isinstance(image_id, str | int) or str(image_id) not in images:
            errors.add(f"{name}: image_id {image_id!r} is not in images")
        if not isinstance(cat_id, int) or isinstance(cat_id, bool) or cat_id not in categories:
            errors.add(f"{name}: category_id {cat_id!r} is not in categories")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(finite_number(v) for v in bbox):
            errors.add(f"{name}: 'bbox' must be [x, y, width, height] of finite numbers, got {bbox!r:.80}")
        elif bbox[2] <= 0 or bbox[3] <= 0:
            errors.add(f"{name}: bbox {bbox} has negative or zero size")
        validated = ann.get("validated")
        if validated is not None and not isinstance(validated, bool):
            errors.add(f"{name}: 'validated' must be true or false, got {validated!r}")
        annotations.append(ann)
    errors.raise_if_any()
    return Export(categories=categories, images=images, annotations=annotations, info=info)
