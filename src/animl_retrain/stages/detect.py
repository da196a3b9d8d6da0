"""Stage 3b, detect (between cct-to-md and crop): run MegaDetector on labelled images with no box on the animal.

Animl stores an image-level label ("a fox is in this frame") as a full-frame box, and imported or unreviewed
images may carry labels without useful boxes. This stage finds the animals in those images (``select=all``:
in every labelled image) with a MegaDetector ONNX model, batched, with decoding in worker processes overlapping
inference, in half precision on a GPU where a check on the first batch shows it changes nothing that matters.

Writes ``detections.json`` (MegaDetector format 1.6, every detection at or above ``min_conf``; images that do
not decode carry MegaDetector's ``failure``) and ``report.json``. The crop stage turns ``animal`` detections at
or above ``threshold`` (recorded as ``detector_metadata.typical_detection_threshold``) into crops labelled
with the image's Animl label; ``person`` and ``vehicle`` detections are counted here and never become crops.

Finished images are checkpointed in shards (atomically, every ``checkpoint_every`` images) under
``<out>/checkpoint`` or the ``checkpoint`` folder/``s3://`` prefix, so a killed run resumes where it stopped; a
restart under other settings (model, input size, ``min_conf``, decoding) is refused and names what changed.
Without ``weights`` the stage writes an empty results file and the pipeline crops ground-truth boxes only.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, Field
from tqdm import tqdm

from animl_retrain.config import StageConfig
from animl_retrain.core import storage
from animl_retrain.core.checks import safe_filename, safe_relpath
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.core.resumable import ResumableStore
from animl_retrain.formats import layout, mdformat, tables
from animl_retrain.vision.images import DEFAULT_MAX_PIXELS

# Half precision is kept only if, on the first batch, every fp32 detection at or above the threshold has an
# fp16 twin of the same category within these bounds (measured on CPU with the test detector: see bench/).
FP16_MAX_CONF_DIFF = 0.02
FP16_MIN_IOU = 0.9


class DetectConfig(StageConfig):
    """Settings of the detect stage."""

    images: Path = Field(description="output folder of the download stage")
    ground_truth: Path = Field(description="output folder of cct-to-md (or a MegaDetector-format results file)")
    out: Path = Field(description="output folder")
    weights: str = Field(
        "",
        description="MegaDetector ONNX export (MDv5a/v5b, YOLOv5-based MDv1000): a path or s3:// URI; "
        "'' skips detection",
    )
    select: Literal["unboxed", "all"] = Field(
        "unboxed",
        description="'unboxed': labelled images without a ground-truth box locating the animal; 'all': every "
        "labelled image",
    )
    threshold: float = Field(0.2, gt=0, le=1, description="animal detections at or above this become crops")
    min_conf: float = Field(
        0.005, gt=0, le=1, description="detections at or above this are written to the results file"
    )
    image_size: int = Field(1280, ge=64, le=4096, description="long side of the network input (MDv5: 1280)")
    batch_size: int = Field(8, ge=1, le=256, description="images per inference batch")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="where to run the network")
    precision: Literal["auto", "fp32", "fp16"] = Field(
        "auto", description="'auto': fp16 on a GPU if the first batch matches fp32 within tolerance, else fp32"
    )
    workers: int = Field(0, ge=0, le=64, description="image decoding processes; 0: the cores less one (at most 16)")
    threads: int = Field(0, ge=0, description="ONNX Runtime CPU threads; 0: one per core")
    checkpoint: str = Field("", description="folder or s3:// prefix for partial results; '' is <out>/checkpoint")
    run_id: str = Field("", description="appended to checkpoint: each pipeline run resumes only its own work")
    checkpoint_every: int = Field(256, ge=1, description="write a checkpoint shard after this many images")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="refuse images with more pixels than this")
    reduced_decode: bool = Field(
        True,
        description="decode JPEGs of at least twice the input size at reduced scale (2-3x faster; "
        "--no-reduced-decode decodes in full, as MegaDetector)",
    )


class DetectResult(BaseModel):
    """What the detect stage produced."""

    images: int
    processed: int
    resumed: int
    failed: int
    animal_images: int
    animal_detections: int
    person_detections: int
    vehicle_detections: int
    skipped: bool


def select_images(images: pd.DataFrame, ground_truth: dict[str, Any], select: str) -> pd.DataFrame:
    """The labelled images the detector should see: all of them, or those without a located ground-truth box."""
    labelled = images[(images["n_objects"] > 0) | images["needs_detection"]]
    if select == "all":
        return labelled
    located = {
        im["file"]
        for im in ground_truth["images"]
        if any(not mdformat.is_full_frame(d["bbox"]) for d in im.get("detections") or [])
    }
    return labelled[~labelled["file"].isin(located)]


SETTINGS_FILE = "run.json"  # in the checkpoint: the settings its shards were made with


class Checkpoint:
    """Finished images in shards, in a :class:`~animl_retrain.core.resumable.ResumableStore`.

    ``run.json`` holds the settings that decide the results (model digest, input size, thresholds); a restart
    under other settings is refused, naming them, rather than mixing the shards in or silently discarding them.
    """

    def __init__(self, where: str):
        self.store = ResumableStore(where, "detect checkpoint")
        self.where = self.store.uri
        self.next = 0

    def load(self, settings: dict[str, Any]) -> dict[str, dict]:
        """The finished image entries by file (none for a new checkpoint); other settings are refused."""
        names = self.store.names()
        if SETTINGS_FILE not in names:
            if names:
                log.warning("detect: %s has shards but no settings record; starting afresh", self.where)
            self.store.clear()
            self.store.write_json(SETTINGS_FILE, settings)
            self.next = 0
            return {}
        self.store.check_settings(self.store.read_json(SETTINGS_FILE), settings)
        shards = [n for n in names if n.startswith("shard-") and n.endswith(".json")]
        done: dict[str, dict] = {}
        for name in shards:
            done.update({e["file"]: e for e in self.store.read_json(name)})
        self.next = 1 + max((int(n[6:-5]) for n in shards), default=-1)
        return done

    def save(self, entries: list[dict]) -> None:
        """Write one shard of finished image entries."""
        if entries:
            self.store.write_json(f"shard-{self.next:06d}.json", entries)
            self.next += 1

    def clear(self) -> None:
        """Delete every shard and the settings record."""
        self.store.clear()


def run(cfg: DetectConfig) -> DetectResult:
    """Detect animals in the selected images; write ``detections.json`` and the report."""
    report = Report("detect")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images = tables.read_table(Path(cfg.images) / layout.IMAGES_TABLE, tables.IMAGES)
    gt = Path(cfg.ground_truth)
    ground_truth = mdformat.read_results(gt / layout.GROUND_TRUTH_FILE if gt.is_dir() else gt)
    chosen = select_images(images, ground_truth, cfg.select)
    files = [safe_relpath(f, "file") for f in chosen["file"]]
    report.counts["selected"] = len(files)
    report.details["select"] = cfg.select

    if not cfg.weights:
        log.info("detect: skipped (no weights); %d images would have been selected", len(files))
        return _write_skipped(out, report)
    if cfg.weights.endswith((".pt", ".pth")):
        raise PipelineError(
            f"detect: {cfg.weights} is a PyTorch checkpoint; convert it to ONNX first (README, 'MegaDetector "
            "weights'): this project never unpickles YOLOv5 checkpoints"
        )

    with tempfile.TemporaryDirectory(prefix="animl-detect-") as tmp:
        weights = Path(cfg.weights)
        if storage.is_s3(cfg.weights):
            weights = storage.fetch(cfg.weights, Path(tmp) / Path(cfg.weights).name)
        if not weights.is_file():
            raise PipelineError(f"detect: weights not found: {cfg.weights}")
        settings = checkpoint_settings(weights, cfg)
        where = cfg.checkpoint.rstrip("/") or str(out / layout.DETECT_CHECKPOINT_DIR)
        checkpoint = Checkpoint(f"{where}/{safe_filename(cfg.run_id)}" if cfg.run_id else where)
        done = checkpoint.load(settings)
        todo = [f for f in files if f not in done]
        resumed = len(files) - len(todo)
        if resumed:
            log.info("detect: resuming: %d of %d images already done", resumed, len(files))
        engine_info = _detect_files(cfg, weights, todo, checkpoint, report) if todo else {}
        done = checkpoint.load(settings)

    results = mdformat.new_results(
        f"{Path(cfg.weights).name} (ONNX Runtime)",
        detector_metadata={
            "megadetector_version": Path(cfg.weights).stem,
            "typical_detection_threshold": cfg.threshold,
        },
        detection_settings={**settings, "select": cfg.select, **engine_info},
    )
    results["images"] = [done[f] for f in files if f in done]
    mdformat.write_results(out / layout.DETECTIONS_FILE, results)
    checkpoint.clear()
    result = _result(results, cfg.threshold, processed=len(files) - resumed, resumed=resumed, skipped=False)
    _finish_report(report, result, cfg, engine_info)
    return result


class SkippedConfig(StageConfig):
    """Settings of detect's stand-in when no detector weights are given (a CPU step: no images, no GPU)."""

    out: Path = Field(description="output folder")


def skipped(cfg: SkippedConfig) -> DetectResult:
    """Write what detect writes without weights, without reading the images: an empty results file."""
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    log.info("detect: not scheduled (no weights); the crop stage uses ground-truth boxes only")
    return _write_skipped(Path(cfg.out), Report("detect"))


def _write_skipped(out: Path, report: Report) -> DetectResult:
    """The results file and report of a run without detector weights."""
    results = mdformat.new_results("none: no detector weights given")
    mdformat.write_results(out / layout.DETECTIONS_FILE, results)
    report.details["skipped"] = "no detector weights given: the crop stage uses ground-truth boxes only"
    report.finish(out)
    return _result(results, threshold=1.0, processed=0, resumed=0, skipped=True)  # no images: nothing to count


def _finish_report(report: Report, result: DetectResult, cfg: DetectConfig, engine_info: dict[str, Any]) -> None:
    """Counts per category (person and vehicle are counted, never used), the engine's figures; log a summary."""
    report.counts.update(result.model_dump(exclude={"images", "skipped"}))
    report.details.update(threshold=cfg.threshold, **engine_info)
    report.finish(cfg.out)
    log.info(
        "detect: %d images (%d resumed), %d with an animal at >= %.2f, %d person and %d vehicle detections "
        "(not used), %d failed",
        result.images,
        result.resumed,
        result.animal_images,
        cfg.threshold,
        result.person_detections,
        result.vehicle_detections,
        result.failed,
    )


def checkpoint_settings(weights: Path, cfg: DetectConfig) -> dict[str, Any]:
    """The settings that decide a run's results: a checkpoint is reused only under the same ones."""
    from animl_retrain.modeling import detector

    return {
        "model_sha256": detector.model_digest(weights),
        "image_size": cfg.image_size,
        "min_conf": cfg.min_conf,
        "iou": detector.IOU_THRESHOLD,
        "reduced_decode": cfg.reduced_decode,
    }


def _detect_files(
    cfg: DetectConfig, weights: Path, todo: list[str], checkpoint: Checkpoint, report: Report
) -> dict[str, Any]:
    """Run the detector over ``todo``, checkpointing as it goes; return what the engine did."""
    from animl_retrain.modeling import detector

    root = Path(cfg.images) / layout.IMAGES_DIR
    workers = cfg.workers or max(1, min(16, (os.cpu_count() or 2) - 1))
    # Model facts decide the letterbox: peek at the input shape before starting the decoding workers, and start
    # them before the (slow) session is built, so they fork from a process without ONNX Runtime threads.
    fixed, fixed_batch = detector.read_input_shape(weights)
    batch_size = fixed_batch or cfg.batch_size
    decoded = detector.decoded_images(
        [root / f for f in todo],
        cfg.image_size,
        fixed,
        0 if len(todo) < 2 * batch_size else workers,
        cfg.max_pixels,
        cfg.reduced_decode,
    )
    engine = detector.Detector(weights, cfg.device, cfg.precision, cfg.threads)
    check = None
    if cfg.precision == "auto" and engine.info.precision == "fp16":
        check = detector.Detector(weights, cfg.device, "fp32", cfg.threads)
    info: dict[str, Any] = {"provider": engine.info.provider, "precision": engine.info.precision}

    pending: list[dict] = []
    start, n_images = time.perf_counter(), 0
    progress = tqdm(total=len(todo), desc="detect", disable=None)
    for batch in detector.shape_batches(decoded, batch_size):
        if batch[0].error is not None:
            report.problem("unreadable image", todo[batch[0].index], batch[0].error)
            entries = [{"file": todo[batch[0].index], "failure": mdformat.FAILURE_IMAGE_OPEN, "detections": None}]
        else:
            found = _run_batch(engine, batch, cfg.min_conf, fixed_batch)
            if check is not None:
                engine, info = _check_half_precision(engine, check, batch, found, cfg, fixed_batch, info)
                found = _run_batch(engine, batch, cfg.min_conf, fixed_batch) if engine is check else found
                check = None
            entries = [{"file": todo[d.index], "detections": dets} for d, dets in zip(batch, found, strict=True)]
            n_images += len(batch)
        pending += entries
        progress.update(len(entries))
        if len(pending) >= cfg.checkpoint_every:
            checkpoint.save(pending)
            pending = []
    checkpoint.save(pending)
    progress.close()
    seconds = time.perf_counter() - start
    info.update(
        images_per_second=round(n_images / seconds, 3) if seconds > 0 else None,
        batch_size=batch_size,
        decode_workers=workers,
    )
    return info


def _run_batch(engine, batch, min_conf: float, fixed_batch: int | None) -> list[list[dict]]:
    """One batch through the engine; a model with a fixed batch size gets the last batch padded."""
    from animl_retrain.modeling import detector

    if fixed_batch and len(batch) < fixed_batch:
        padded = batch + [batch[-1]] * (fixed_batch - len(batch))
        return detector.detect_batch(engine, padded, min_conf)[: len(batch)]
    return detector.detect_batch(engine, batch, min_conf)


def _check_half_precision(engine, reference, batch, found, cfg: DetectConfig, fixed_batch, info):
    """Compare fp16 with fp32 on the first batch; keep fp16 only within tolerance, else switch to fp32."""
    from animl_retrain.modeling import detector

    expected = _run_batch(reference, batch, cfg.min_conf, fixed_batch)
    diff = detector.compare_detections(expected, found, cfg.threshold)
    ok = diff["unmatched"] == 0 and diff["max_conf_diff"] <= FP16_MAX_CONF_DIFF and diff["min_iou"] >= FP16_MIN_IOU
    info = {**info, "fp16_check": {**diff, "images": len(batch), "kept_fp16": ok}}
    if ok:
        log.info("detect: fp16 matches fp32 on the first batch (%s): running in fp16", diff)
        return engine, info
    log.warning("detect: fp16 differs from fp32 beyond tolerance on the first batch (%s): running in fp32", diff)
    return reference, {**info, "precision": "fp32"}


def _result(results: dict, threshold: float, processed: int, resumed: int, skipped: bool) -> DetectResult:
    """Counts over the results file: images, failures, and detections per category at or above ``threshold``."""
    per_category: Counter[str] = Counter()
    animal_images = failed = 0
    for im in results["images"]:
        if im.get("failure"):
            failed += 1
            continue
        kept = [d for d in im["detections"] if d["conf"] >= threshold]
        per_category.update(mdformat.DETECTION_CATEGORIES.get(d["category"], "other") for d in kept)
        animal_images += any(d["category"] == mdformat.ANIMAL for d in kept)
    return DetectResult(
        images=len(results["images"]),
        processed=processed,
        resumed=resumed,
        failed=failed,
        animal_images=animal_images,
        animal_detections=per_category["animal"],
        person_detections=per_category["person"],
        vehicle_detections=per_category["vehicle"],
        skipped=skipped,
    )
