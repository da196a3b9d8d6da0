"""Stage 4, crop: cut a square crop around every box and store it resized, once, at the training size.

Boxes come from MegaDetector-format files (the ground truth written by cct-to-md). Each image is decoded once,
at the smallest JPEG scale that still leaves every crop at full resolution, and its crops are cut with the
shared rule in :mod:`animl_retrain.preprocessing`. Images are spread over every core. ``crops.csv`` lists
each crop with its source image, annotation id, label, location and box; unreadable images are reported.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field
from tqdm import tqdm

from animl_retrain import mdformat, tables
from animl_retrain.common import PipelineError, Report, atomic_path, log, safe_filename, safe_relpath
from animl_retrain.config import StageConfig
from animl_retrain.images import DEFAULT_MAX_PIXELS, BadImageError, open_image
from animl_retrain.preprocessing import cut_square, draft_scale
from animl_retrain.stages.cct_to_md import RESULTS_FILE
from animl_retrain.stages.download import IMAGES_DIR

CROPS_DIR = "crops"


class CropConfig(StageConfig):
    """Settings of the crop stage."""

    images: Path = Field(description="output folder of the download stage")
    ground_truth: Path = Field(description="output folder of cct-to-md (or a MegaDetector-format results file)")
    out: Path = Field(description="output folder")
    crop_size: int = Field(224, ge=16, le=1024, description="side of the stored square crops, in pixels")
    jpeg_quality: int = Field(95, ge=50, le=100, description="JPEG quality of the stored crops")
    workers: int = Field(0, ge=0, description="processes; 0 means one per core")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="refuse images with more pixels than this")


class CropResult(BaseModel):
    """What the crop stage produced."""

    crops: int
    per_class: dict[str, int]
    failed_images: int


def crop_name(annotation_id: str) -> str:
    """A collision-free file name for a crop, derived from its annotation id."""
    digest = hashlib.sha1(annotation_id.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{safe_filename(annotation_id, 80)}-{digest}.jpg"


def _crop_image(job: tuple) -> tuple[list[dict], str | None]:
    """Cut every crop of one image; return the crop rows, or an error message for the image."""
    image_path, out_root, dets, size, quality, max_pixels = job
    boxes = [(d["x"], d["y"], d["w"], d["h"]) for d in dets]
    try:
        img, _ = open_image(image_path, max_pixels, scale_for=lambda w, h: draft_scale(boxes, w, h, size))
    except BadImageError as e:
        return [], str(e)
    rows = []
    for det, box in zip(dets, boxes, strict=True):
        rel = f"{safe_filename(det['label'], 60)}/{crop_name(det['annotation_id'])}"
        with atomic_path(Path(out_root) / rel) as tmp:
            cut_square(img, box, size).save(tmp, format="JPEG", quality=quality)
        rows.append({**det, "crop": rel})
    return rows, None


def _jobs_from_results(results: dict, images: pd.DataFrame, cfg: CropConfig, out_root: Path, report: Report):
    """Turn a results file into one job per image, checking every referenced file against the image table."""
    labels = results.get("classification_categories") or {}
    by_file = images.set_index("file")
    jobs = []
    for im in results["images"]:
        file = im["file"]
        if file not in by_file.index:
            report.problem("box on an image that is not downloaded", file)
            continue
        safe_relpath(file, "results file entry")
        meta = by_file.loc[file]
        dets = []
        for det in im.get("detections") or []:
            cls = det.get("classifications") or []
            if not cls or str(cls[0][0]) not in labels:
                report.problem("box without a class", file, f"detection {det.get('annotation_id', '?')}")
                continue
            x, y, w, h = det["bbox"]
            dets.append(
                {
                    "annotation_id": str(det.get("annotation_id") or f"{meta['image_id']}#{len(dets)}"),
                    "image_id": meta["image_id"],
                    "file": file,
                    "label": labels[str(cls[0][0])],
                    "location": meta["location"],
                    "box_source": "ground_truth",
                    "x": x,
                    "y": y,
                    "w": w,
                    "h": h,
                    "conf": float(det.get("conf", 1.0)),
                }
            )
        if dets:
            jobs.append(
                (
                    Path(cfg.images) / IMAGES_DIR / file,
                    out_root,
                    dets,
                    cfg.crop_size,
                    cfg.jpeg_quality,
                    cfg.max_pixels,
                )
            )
    return jobs


def run(cfg: CropConfig) -> CropResult:
    """Crop every box of the results file; write ``crops/``, ``crops.csv`` and the report."""
    report = Report("crop")
    gt = Path(cfg.ground_truth)
    results = mdformat.read_results(gt / RESULTS_FILE if gt.is_dir() else gt)
    images = tables.read_table(Path(cfg.images) / "images.csv", tables.IMAGES)
    out_root = Path(cfg.out) / CROPS_DIR
    out_root.mkdir(parents=True, exist_ok=True)
    jobs = _jobs_from_results(results, images, cfg, out_root, report)

    rows: list[dict] = []
    failed = 0
    workers = cfg.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        outcomes = pool.map(_crop_image, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 4) or 1)))
        for job, (crop_rows, error) in tqdm(
            zip(jobs, outcomes, strict=True), total=len(jobs), desc="crop", disable=None
        ):
            if error:
                failed += 1
                report.problem("unreadable image", str(job[0].relative_to(Path(cfg.images) / IMAGES_DIR)), error)
            rows.extend(crop_rows)
    if not rows:
        raise PipelineError(f"crop: no crop could be made from {len(jobs)} images; see {Path(cfg.out) / 'report.json'}")

    crops = pd.DataFrame(rows)
    tables.write_table(crops, Path(cfg.out) / "crops.csv", tables.CROPS)
    per_class = dict(sorted(Counter(crops["label"]).items()))
    report.counts = {"images": len(jobs), "crops": len(crops), "failed_images": failed}
    report.details.update(per_class=per_class, crop_size=cfg.crop_size)
    report.finish(cfg.out)
    log.info("crop: %d crops from %d images (%d unreadable)", len(crops), len(jobs), failed)
    return CropResult(crops=len(crops), per_class=per_class, failed_images=failed)
