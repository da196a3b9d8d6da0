"""Stage 3, cct-to-md: write the export's ground-truth boxes as a MegaDetector-format results file.

Every kept object becomes an ``animal`` detection with ``conf`` 1.0, its box normalised to the image (read from
the export or, when the export lacks ``width``/``height``, from the image header) and clipped to the frame, and
a classification naming its output label. Each detection also carries its ``annotation_id`` so the crop
stage can trace every crop back to Animl. The file passes MegaDetector's ``validate_batch_results``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field

from animl_retrain.config import StageConfig
from animl_retrain.core.checks import safe_relpath
from animl_retrain.core.io import read_json
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import layout, mdformat, tables
from animl_retrain.vision.images import BadImageError, image_size


class CctToMdConfig(StageConfig):
    """Settings of the cct-to-md stage."""

    export: Path = Field(description="output folder of the export stage")
    images: Path = Field(description="output folder of the download stage")
    out: Path = Field(description="output folder")


class CctToMdResult(BaseModel):
    """What the cct-to-md stage produced."""

    images: int
    detections: int
    clipped: int
    skipped: int


def run(cfg: CctToMdConfig) -> CctToMdResult:
    """Convert the kept objects of downloaded images into ``ground_truth.json``."""
    report = Report("cct-to-md")
    images = tables.read_table(Path(cfg.images) / layout.IMAGES_TABLE, tables.IMAGES).set_index("image_id")
    objects = tables.read_table(Path(cfg.export) / layout.OBJECTS_TABLE, tables.OBJECTS)
    labels = sorted(read_json(Path(cfg.export) / layout.LABEL_SPEC_FILE, "label spec"))
    class_id = {label: str(i) for i, label in enumerate(labels)}
    results = mdformat.new_results(
        "ground truth (Animl export)",
        classification_labels=labels,
        detector_metadata={"typical_detection_threshold": 1.0},
    )
    counts = {"clipped": 0, "skipped": 0}
    image_root = Path(cfg.images) / layout.IMAGES_DIR
    for image_id, group in objects.groupby("image_id", sort=True):
        if image_id not in images.index:
            counts["skipped"] += len(group)  # the download stage reported why
            continue
        img = images.loc[image_id]
        try:
            width, height = _dimensions(img, image_root)
        except BadImageError as e:
            report.problem("unreadable image", f"{img['file']}", str(e))
            counts["skipped"] += len(group)
            continue
        detections = _detections(group, width, height, class_id, counts, report)
        if detections:
            results["images"].append({"file": img["file"], "detections": detections})

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mdformat.write_results(out / layout.GROUND_TRUTH_FILE, results)
    n_det = sum(len(im["detections"]) for im in results["images"])
    report.counts = {"images": len(results["images"]), "detections": n_det, **counts}
    report.finish(out)
    log.info(
        "cct-to-md: %d boxes on %d images (%d clipped to the frame, %d skipped)",
        n_det,
        len(results["images"]),
        counts["clipped"],
        counts["skipped"],
    )
    return CctToMdResult(images=len(results["images"]), detections=n_det, **counts)


def _detections(group, width: int, height: int, class_id: dict, counts: dict, report: Report) -> list[dict]:
    """One image's objects as MegaDetector detections, boxes normalised and clipped; those outside are reported."""
    detections = []
    for obj in group.itertuples():
        converted = mdformat.normalise_box(obj.x, obj.y, obj.w, obj.h, width, height)
        if converted is None:
            report.problem(
                "box outside the frame",
                f"annotation {obj.annotation_id!r} on {obj.file}",
                f"[{obj.x}, {obj.y}, {obj.w}, {obj.h}] in a {width}x{height} image",
            )
            counts["skipped"] += 1
            continue
        box, was_clipped = converted
        counts["clipped"] += was_clipped
        detections.append(
            {
                "category": mdformat.ANIMAL,
                "conf": 1.0,
                "bbox": box,
                "classifications": [[class_id[obj.label], 1.0]],
                "annotation_id": obj.annotation_id,
            }
        )
    return detections


def _dimensions(img, image_root: Path) -> tuple[int, int]:
    """Width and height from the export (the frame its pixel boxes are in), else from the file's header."""
    if not pd.isna(img["width"]) and not pd.isna(img["height"]):
        return int(img["width"]), int(img["height"])
    return image_size(image_root / safe_relpath(img["file"], "file"))
