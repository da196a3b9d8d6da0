"""Stage 1, export: read an Animl CCT export, validate it and apply the label spec.

Writes to ``out``: ``export.json`` (the exact input, for provenance), ``images.csv``, ``objects.csv`` (one row
per annotation kept), ``label_spec.json`` and ``report.json`` (counts per class and location, and every
annotation dropped, with the reason).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, Field

from animl_retrain import cct, mdformat, storage, tables
from animl_retrain.common import PipelineError, Report, UnsafePathError, log, safe_relpath, write_json
from animl_retrain.config import StageConfig
from animl_retrain.labelspec import EMPTY, OTHER, load_label_spec, normalise_name

EXPORT_FILE = "export.json"


class ExportConfig(StageConfig):
    """Settings of the export stage."""

    source: str = Field(description="Animl COCO (CCT) export: s3://bucket/key.json or a local path")
    label_spec: str = Field(description="label spec: inline JSON, a local path or an s3:// URI")
    out: Path = Field(description="output folder")
    unmapped: Literal["drop", "other"] = Field("drop", description="what to do with labels the spec does not list")
    only_validated: bool = Field(True, description="keep only annotations a person validated")
    max_export_mb: int = Field(1024, gt=0, description="refuse exports larger than this")


class ExportResult(BaseModel):
    """What the export stage produced."""

    fingerprint: str
    images: int
    objects: int
    classes: dict[str, int]
    locations: int


def fingerprint(raw: bytes) -> str:
    """A short content hash that identifies an export across runs."""
    return hashlib.sha256(raw).hexdigest()[:16]


def run(cfg: ExportConfig) -> ExportResult:
    """Read, validate and filter the export; write the tables and the report."""
    report = Report("export")
    raw = storage.read_bytes(cfg.source, max_bytes=cfg.max_export_mb << 20)
    spec = load_label_spec(cfg.label_spec)
    export = cct.parse(cct.decode(raw, f"export {cfg.source}"), f"export {cfg.source}")

    images = _image_rows(export, report)
    objects = _object_rows(export, images, spec.lookup(), cfg, report)
    if not objects:
        raise PipelineError(
            f"export {cfg.source}: no annotation is left after the label spec and filters "
            f"(dropped: {dict(report.details['dropped'])}); check the spec's label names against the "
            f"export's categories {sorted(set(export.categories.values()))}"
        )
    objects_df = pd.DataFrame(objects)
    kept_per_image = Counter(objects_df["image_id"])
    images_df = pd.DataFrame(images.values())
    images_df["n_objects"] = images_df["image_id"].map(kept_per_image).fillna(0).astype(int)
    images_df["needs_detection"] = images_df["image_id"].isin(_images_without_located_box(objects, images))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / EXPORT_FILE).write_bytes(raw)
    tables.write_table(images_df, out / "images.csv", tables.IMAGES)
    tables.write_table(objects_df, out / "objects.csv", tables.OBJECTS)
    labels = [*spec.labels, OTHER] if cfg.unmapped == "other" else spec.labels
    write_json(
        out / "label_spec.json",
        {**spec.to_json(), **({OTHER: {"dataset_labels": {}}} if OTHER in labels else {})},
    )

    per_class = dict(sorted(Counter(objects_df["label"]).items()))
    per_location = dict(sorted(Counter(objects_df["location"]).items()))
    used = {a["category_id"] for a in export.annotations}
    report.counts = {
        "images": len(export.images),
        "images_with_objects": int((images_df["n_objects"] > 0).sum()),
        "images_needing_detection": int(images_df["needs_detection"].sum()),
        "annotations": len(export.annotations),
        "objects": len(objects_df),
        "classes": len(per_class),
        "locations": len(per_location),
    }
    report.details.update(
        fingerprint=fingerprint(raw),
        source=cfg.source,
        per_class=per_class,
        per_location=per_location,
        empty_classes=[label for label in labels if label not in per_class],
        unused_categories=sorted(name for cid, name in export.categories.items() if cid not in used),
    )
    report.finish(out)
    log.info("export: %d objects in %d classes at %d locations", len(objects_df), len(per_class), len(per_location))
    return ExportResult(
        fingerprint=fingerprint(raw),
        images=len(images_df),
        objects=len(objects_df),
        classes=per_class,
        locations=len(per_location),
    )


def _image_rows(export: cct.Export, report: Report) -> dict[str, dict]:
    """One row per usable image; images with unsafe or clashing file names are skipped and reported."""
    rows: dict[str, dict] = {}
    files: dict[str, str] = {}
    labels_on_image: dict[str, set[str]] = {}
    for ann in export.annotations:
        labels_on_image.setdefault(str(ann["image_id"]), set()).add(export.categories[ann["category_id"]])
    for iid, img in export.images.items():
        try:
            file = safe_relpath(img["file_name"], "file_name")
        except UnsafePathError as e:
            report.problem("unsafe file_name", f"image {iid!r}", str(e))
            continue
        if file in files:
            report.problem("duplicate file_name", f"image {iid!r}", f"{file!r} is also image {files[file]!r}")
            continue
        files[file] = iid
        location = img.get("location")
        if not location:
            report.problem("no location", f"image {iid!r}", "grouped under location 'unknown'")
            location = "unknown"
        rows[iid] = {
            "image_id": iid,
            "file": file,
            "key": img.get("serving_bucket_key") or img.get("original_relative_path"),
            "location": location,
            "datetime": img.get("datetime") or "",
            "width": img.get("width"),
            "height": img.get("height"),
            "animl_labels": ";".join(sorted(labels_on_image.get(iid, ()))),
        }
    return rows


def _object_rows(
    export: cct.Export, images: dict[str, dict], lookup: dict[str, str], cfg: ExportConfig, report: Report
) -> list[dict]:
    """Apply the label spec and filters to every annotation; count what is dropped and why."""
    dropped: Counter[str] = Counter()
    unmapped: Counter[str] = Counter()
    rows = []
    for ann in export.annotations:
        iid = str(ann["image_id"])
        animl_label = export.categories[ann["category_id"]]
        label = lookup.get(normalise_name(animl_label))
        if iid not in images:
            dropped["image skipped"] += 1
            continue
        if normalise_name(animl_label) == EMPTY and label is None:
            dropped["empty"] += 1
            continue
        if cfg.only_validated and ann.get("validated") is False:
            dropped["not validated"] += 1
            continue
        if label is None:
            unmapped[animl_label] += 1
            if cfg.unmapped == "drop":
                dropped["not in label spec"] += 1
                continue
            label = OTHER
        x, y, w, h = (float(v) for v in ann["bbox"])
        rows.append(
            {
                "annotation_id": str(ann["id"]),
                "image_id": iid,
                "file": images[iid]["file"],
                "label": label,
                "animl_label": animl_label,
                "x": x,
                "y": y,
                "w": w,
                "h": h,
                "validated": ann.get("validated") is not False,
                "location": images[iid]["location"],
            }
        )
    report.details["dropped"] = dict(dropped)
    report.details["unmapped_labels"] = dict(unmapped.most_common())
    if unmapped:
        what = "dropped" if cfg.unmapped == "drop" else f"mapped to '{OTHER}'"
        log.info("export: labels not in the spec, %s: %s", what, dict(unmapped.most_common()))
    return rows


def _images_without_located_box(objects: list[dict], images: dict[str, dict]) -> set[str]:
    """Images whose kept objects are all image-level labels (full-frame boxes): MegaDetector must find the animal.

    Where the export lacks the image size, a box at the top-left corner may be full-frame: the image is listed,
    and the detect and crop stages decide on the box normalised with the size read from the file.
    """
    located: set[str] = set()
    for obj in objects:
        img = images[obj["image_id"]]
        if img.get("width") and img.get("height"):
            box = mdformat.normalise_box(obj["x"], obj["y"], obj["w"], obj["h"], img["width"], img["height"])
            is_located = box is not None and not mdformat.is_full_frame(box[0])
        else:
            is_located = obj["x"] > 1 or obj["y"] > 1
        if is_located:
            located.add(obj["image_id"])
    return {obj["image_id"] for obj in objects} - located
