"""Stage 4, crop: cut a square crop around every box and store it resized, once, at the training size.

Boxes come from MegaDetector-format files: the ground truth written by cct-to-md, the detect stage's
MegaDetector results, or both (ground truth wins where it locates the animal; detector boxes take the image's
Animl label, and ``box_source`` in ``crops.csv`` says which it was). Each image is decoded once,
at the smallest JPEG scale that still leaves every crop at full resolution and, for baseline JPEGs, only where
its crops lie (:func:`~animl_retrain.vision.preprocessing.crop_squares`), and its crops are cut with the
shared rule in :mod:`animl_retrain.vision.preprocessing`. Images are spread over every core. ``crops.csv`` lists
each crop with its source image, annotation id, label, location and box; unreadable images are reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, Field
from tqdm import tqdm

from animl_retrain.config import StageConfig
from animl_retrain.core import cache
from animl_retrain.core.checks import safe_filename, safe_relpath
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import atomic_write, remove_partial_files
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import layout, mdformat, tables
from animl_retrain.vision.images import DEFAULT_MAX_PIXELS, BadImageError
from animl_retrain.vision.preprocessing import CROP_RULE, crop_squares

CACHE_VERSION = 1  # bump when the crop's pixels change for the same image, box and settings
CACHED_IMAGES_DIR = ".cached-images"  # images fetched from the cache for this run, removed at its end


class CropConfig(StageConfig):
    """Settings of the crop stage."""

    images: Path = Field(description="output folder of the download stage")
    ground_truth: Path = Field(description="output folder of cct-to-md (or a MegaDetector-format results file)")
    out: Path = Field(description="output folder")
    crop_size: int = Field(224, ge=16, le=1024, description="side of the stored square crops, in pixels")
    jpeg_quality: int = Field(95, ge=50, le=100, description="JPEG quality of the stored crops")
    workers: int = Field(0, ge=0, description="processes; 0 means one per core")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="refuse images with more pixels than this")
    detections: Path | None = Field(None, description="output folder of the detect stage (or its results file)")
    box_source: Literal["ground_truth", "detector", "both"] = Field(
        "both", description="'both': ground truth where it locates the animal, else the detector's boxes"
    )
    detection_threshold: float | None = Field(
        None, gt=0, le=1, description="animal detections at or above this become crops (default: the detect stage's)"
    )
    cache_uri: str = Field(
        "", description="content-addressed cache (s3://bucket/prefix or a folder) shared by reruns; '' turns it off"
    )
    cache_max_gb: float = Field(50.0, gt=0, description="size limit of the cache; the oldest entries go first")


class CropResult(BaseModel):
    """What the crop stage produced."""

    crops: int
    per_class: dict[str, int]
    failed_images: int
    from_cache: int = 0


def crop_name(annotation_id: str) -> str:
    """A collision-free file name for a crop, derived from its annotation id."""
    digest = hashlib.sha1(annotation_id.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{safe_filename(annotation_id, 80)}-{digest}.jpg"


def _crop_image(job: tuple) -> tuple[list[dict], str | None]:
    """Cut every crop of one image; return the crop rows, or an error message for the image."""
    image_path, out_root, dets, size, quality, max_pixels = job
    boxes = [(d["x"], d["y"], d["w"], d["h"]) for d in dets]
    try:
        squares = crop_squares(image_path, boxes, size, max_pixels)
    except BadImageError as e:
        return [], str(e)
    rows = []
    for det, square in zip(dets, squares, strict=True):
        encoded = io.BytesIO()  # encoded in memory, then written in one go: 0.6 -> 0.3 ms per crop with the write
        square.save(encoded, format="JPEG", quality=quality)
        path = _crop_path(det)
        atomic_write(Path(out_root) / path, encoded.getvalue())
        rows.append({**det, "crop": path})
    return rows, None


def _crop_path(det: dict) -> str:
    return f"{safe_filename(det['label'], 60)}/{crop_name(det['annotation_id'])}"


def cache_key(checksum: str, det: dict, cfg: CropConfig) -> str:
    """The content-derived key of one crop: the image's checksum, the box and every setting that shapes the pixels."""
    what = [CACHE_VERSION, CROP_RULE, checksum, [round(det[k], 9) for k in "xywh"], cfg.crop_size, cfg.jpeg_quality]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def _from_cache(cached: list[tuple], store: cache.ContentCache, index: dict) -> tuple[list[dict], list[tuple]]:
    """Write the crops of ``cached`` (jobs with their crop keys, every key in ``index``) out of the cache's packs.

    Returns the rows written and the jobs to redo: those with an entry refused (its bytes do not match), whose
    crops are all cut again (one decode per image).
    """
    hits = store.get_packed([k for _, keys in cached for k in keys], index)
    rows, redo, files = [], [], []
    for job, keys in cached:
        if not all(k in hits for k in keys):
            redo.append((job, keys))
            continue
        for det, key in zip(job[2], keys, strict=True):
            crop_path = _crop_path(det)
            files.append((Path(job[1], crop_path), hits[key]))
            rows.append({**det, "crop": crop_path})
    # Creating a file costs 0.03-0.7 ms of kernel CPU here, depending on the file system's recent history, more
    # than writing a crop's bytes; one thread per core (the system calls release the GIL) beat one thread in a warm
    # rerun (bench/README.md, retrain_cache), more threads did not.
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for _ in pool.map(lambda file: atomic_write(*file), files):
            pass  # a failed write (a full disk) raises here
    return rows, redo


def _with_image(job: tuple, checksum: str, store: cache.ContentCache, cfg: CropConfig) -> tuple:
    """The job, with its image fetched from the cache (checked against its checksum) if it is not on disk.

    The download stage leaves images in the cache; one neither on disk nor in the cache fails in :func:`_crop_image`.
    """
    if job[0].is_file() or not checksum:
        return job
    data = store.get_image(checksum)
    if data is None:
        return job
    local = Path(cfg.out) / CACHED_IMAGES_DIR / checksum
    atomic_write(local, data)
    return (local, *job[1:])


def _checksums(jobs: list[tuple], images: pd.DataFrame, root: Path) -> dict[Path, str]:
    """Each job's image checksum: the download stage's (from the source), else a hash of the file on disk."""
    known = dict(zip(images["file"], images["checksum"], strict=True))
    out = {}
    for job in jobs:
        checksum = known.get(job[0].relative_to(root).as_posix(), "")
        if not checksum and job[0].is_file():
            checksum = cache.file_checksum(job[0])
        out[job[0]] = checksum
    return out


def _image_name(job: tuple, cfg: CropConfig) -> str:
    root = Path(cfg.images) / layout.IMAGES_DIR
    return str(job[0].relative_to(root)) if job[0].is_relative_to(root) else job[0].name


def _ground_truth_boxes(results: dict, by_file: dict[str, dict], report: Report) -> dict[str, list[dict]]:
    """Crop rows (without the crop path) for every ground-truth box, by image file."""
    labels = results.get("classification_categories") or {}
    boxes: dict[str, list[dict]] = {}
    for im in results["images"]:
        file = im["file"]
        if file not in by_file:
            report.problem("box on an image that is not downloaded", file)
            continue
        safe_relpath(file, "results file entry")
        meta = by_file[file]
        dets = boxes.setdefault(file, [])
        for det in im.get("detections") or []:
            cls = det.get("classifications") or []
            if not isinstance(cls, list) or not cls or not isinstance(cls[0], list) or not cls[0]:
                cls = [[None]]
            if str(cls[0][0]) not in labels:
                report.problem("box without a class", file, f"detection {det.get('annotation_id', '?')}")
                continue
            why = mdformat.box_problem(det["bbox"])
            if why:
                report.problem("unusable box", file, f"detection {det.get('annotation_id', '?')}: {why}")
                continue
            dets.append(
                _row(meta, file, labels[str(cls[0][0])], det, "ground_truth", det.get("annotation_id"), len(dets))
            )
    return boxes


def _row(meta, file: str, label: str, det: dict, source: str, annotation_id: str | None, k: int) -> dict:
    x, y, w, h = det["bbox"]
    return {
        "annotation_id": str(annotation_id or f"{meta['image_id']}#{k}"),
        "image_id": meta["image_id"],
        "file": file,
        "label": label,
        "location": meta["location"],
        "camera": meta["camera"],
        "datetime": meta["datetime"],
        "box_source": source,
        "x": x,
        "y": y,
        "w": w,
        "h": h,
        "conf": float(det.get("conf", 1.0)),
    }


def _located(ground_truth: dict[str, list[dict]]) -> set[str]:
    """Images with a ground-truth box that locates the animal (not only full-frame image-level labels)."""
    return {
        file
        for file, rows in ground_truth.items()
        if any(not mdformat.is_full_frame([r["x"], r["y"], r["w"], r["h"]]) for r in rows)
    }


def _detector_boxes(
    detections: dict,
    ground_truth: dict[str, list[dict]],
    by_file: dict[str, dict],
    threshold: float,
    report: Report,
    skip: set[str],
) -> dict[str, list[dict]]:
    """Crop rows for every ``animal`` detection at or above ``threshold``, labelled with the image's label.

    The label is the image's one Animl label (from its ground-truth, usually full-frame, boxes); an image with
    several different labels is ambiguous and skipped. Person and vehicle detections are counted, never cropped.
    Images in ``skip`` (where ground truth wins) are left out.
    """
    boxes: dict[str, list[dict]] = {}
    excluded: Counter[str] = Counter()
    for im in detections["images"]:
        file = im["file"]
        if im.get("failure") or file not in by_file or file in skip:
            continue  # the detect stage reported a failure; ground truth (if any) stands in
        safe_relpath(file, "results file entry")
        labels = sorted({row["label"] for row in ground_truth.get(file, [])})
        kept = []
        for k, d in enumerate(im.get("detections") or []):
            if d.get("conf", 0) < threshold:
                continue
            why = mdformat.box_problem(d["bbox"])
            if why:
                report.problem("unusable box", file, f"detector box {k}: {why}")
                continue
            kept.append(d)
        excluded.update(mdformat.DETECTION_CATEGORIES.get(d.get("category"), "other") for d in kept)
        animals = [d for d in kept if d.get("category") == mdformat.ANIMAL]
        if not animals:
            report.problem("no animal found by the detector", file, f"no animal detection at >= {threshold}")
            boxes[file] = []
        elif len(labels) != 1:
            what = "ambiguous image label" if labels else "no label for detector boxes"
            report.problem(what, file, f"labels {labels}; {len(animals)} detector boxes not used")
            boxes[file] = []
        else:
            meta = by_file[file]
            boxes[file] = [
                _row(meta, file, labels[0], d, "detector", f"{meta['image_id']}#md{k}", k)
                for k, d in enumerate(animals)
            ]
    del excluded["animal"]
    report.details["detections_not_animal"] = dict(excluded)
    return boxes


def _choose_boxes(
    ground_truth: dict[str, list[dict]], detector: dict[str, list[dict]], source: str
) -> dict[str, list[dict]]:
    """Per image: ground truth where it locates the animal, else the detector's boxes (``source='both'``)."""
    if source == "ground_truth":
        return ground_truth
    if source == "detector":
        return detector
    located = _located(ground_truth)
    return {
        file: detector[file] if file in detector and file not in located else ground_truth.get(file, [])
        for file in sorted(set(ground_truth) | set(detector))
    }


def _jobs_from_results(
    results: dict, detections: dict | None, images: pd.DataFrame, cfg: CropConfig, out_root: Path, report: Report
):
    """Turn the box sources into one job per image, checking every referenced file against the image table."""
    by_file = images.set_index("file").to_dict("index")  # a dict: a row lookup per image costs no pandas call
    boxes = _ground_truth_boxes(results, by_file, report)
    if detections is not None and cfg.box_source != "ground_truth":
        info = detections.get("info") if isinstance(detections.get("info"), dict) else {}
        metadata = info.get("detector_metadata") if isinstance(info.get("detector_metadata"), dict) else {}
        threshold = cfg.detection_threshold or metadata.get("typical_detection_threshold", 0.2)
        report.details["detection_threshold"] = threshold
        skip = _located(boxes) if cfg.box_source == "both" else set()
        detected = _detector_boxes(detections, boxes, by_file, threshold, report, skip)
        boxes = _choose_boxes(boxes, detected, cfg.box_source)
    elif cfg.box_source == "detector":
        raise PipelineError("crop: box_source 'detector' needs the detect stage's output (--detections)")
    return [
        (Path(cfg.images) / layout.IMAGES_DIR / file, out_root, dets, cfg.crop_size, cfg.jpeg_quality, cfg.max_pixels)
        for file, dets in boxes.items()
        if dets
    ]


def _crop_all(jobs: list[tuple], cfg: CropConfig, stack: contextlib.ExitStack):
    """Each job's outcome, in order, cut in processes started now (none for no jobs, and never more than jobs)."""
    if not jobs:
        return iter(())
    workers = min(cfg.workers or os.cpu_count() or 1, len(jobs))
    pool = stack.enter_context(ProcessPoolExecutor(workers))
    return pool.map(_crop_image, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 4) or 1)))


def run(cfg: CropConfig) -> CropResult:
    """Crop every box of the results file; write ``crops/``, ``crops.csv`` and the report."""
    report = Report("crop")
    gt = Path(cfg.ground_truth)
    results = mdformat.read_results(gt / layout.GROUND_TRUTH_FILE if gt.is_dir() else gt)
    detections = None
    if cfg.detections is not None:
        det = Path(cfg.detections)
        detections = mdformat.read_results(det / layout.DETECTIONS_FILE if det.is_dir() else det)
    images = tables.read_table(Path(cfg.images) / layout.IMAGES_TABLE, tables.IMAGES)
    out_root = Path(cfg.out) / layout.CROPS_DIR
    out_root.mkdir(parents=True, exist_ok=True)
    report.details["removed_partial_files"] = remove_partial_files(out_root)
    jobs = _jobs_from_results(results, detections, images, cfg, out_root, report)
    n_images = len(jobs)

    # With a cache: jobs whose every crop is in a pack are written from it while the processes cut the others.
    store, cached, keys, index = None, [], [[""] * len(job[2]) for job in jobs], {}
    if cfg.cache_uri:
        store = cache.ContentCache(cfg.cache_uri, cfg.cache_max_gb)
        checksums = _checksums(jobs, images, Path(cfg.images) / layout.IMAGES_DIR)
        # an image with no checksum (neither on disk nor listed with one) has no keys: it fails to decode below
        keys = [[cache_key(checksums[job[0]], d, cfg) if checksums[job[0]] else "" for d in job[2]] for job in jobs]
        index = store.pack_index()
        todo = []
        for job, ks in zip(jobs, keys, strict=True):
            if all(k in index for k in ks):
                cached.append((job, ks))
            else:
                todo.append((_with_image(job, checksums[job[0]], store, cfg), ks))
    else:
        todo = list(zip(jobs, keys, strict=True))
    rows: list[dict] = []
    failed = 0
    new_entries: dict[str, bytes] = {}
    with contextlib.ExitStack() as stack:
        cropped = _crop_all([job for job, _ in todo], cfg, stack)
        if store is not None:
            rows, redo = _from_cache(cached, store, index)
            redo = [(_with_image(job, checksums[job[0]], store, cfg), ks) for job, ks in redo]
            todo += redo
            cropped = itertools.chain(cropped, _crop_all([job for job, _ in redo], cfg, stack))
        from_cache = len(rows)
        for (job, job_keys), (crop_rows, error) in tqdm(
            zip(todo, cropped, strict=True), total=len(todo), desc="crop", disable=None
        ):
            if error:
                failed += 1
                report.problem("unreadable image", _image_name(job, cfg), error)
            elif store is not None:
                new_entries.update(
                    {k: (out_root / r["crop"]).read_bytes() for k, r in zip(job_keys, crop_rows, strict=True) if k}
                )
            rows.extend(crop_rows)
    if store is not None:
        shutil.rmtree(Path(cfg.out) / CACHED_IMAGES_DIR, ignore_errors=True)
        store.put_packed(new_entries)
        report.details["cache"] = {
            "uri": cfg.cache_uri,
            "crops_from_cache": from_cache,
            "crops_added": len(new_entries),
            "entries_refused": store.refused,
        }
    if not rows:
        raise PipelineError(f"crop: no crop could be made from {n_images} images; see {Path(cfg.out) / 'report.json'}")

    crops = pd.DataFrame(rows)
    tables.write_table(crops, Path(cfg.out) / layout.CROPS_TABLE, tables.CROPS)
    per_class = dict(sorted(Counter(crops["label"]).items()))
    report.counts.update(images=n_images, crops=len(crops), failed_images=failed, crops_from_cache=from_cache)
    report.details["per_box_source"] = dict(sorted(Counter(crops["box_source"]).items()))
    report.details.update(per_class=per_class, crop_size=cfg.crop_size)
    report.finish(cfg.out)
    log.info(
        "crop: %d crops from %d images (%d unreadable, %d crops from the cache)",
        len(crops),
        n_images,
        failed,
        from_cache,
    )
    return CropResult(crops=len(crops), per_class=per_class, failed_images=failed, from_cache=from_cache)
