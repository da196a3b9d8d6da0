"""predict: classify the detections of a MegaDetector results file with a model folder, and write it back.

Every detection of a classified category (``animal`` by default) at or above ``detection_threshold`` gets
``classifications``: ``[[class id, probability], ...]`` for every class, most likely first, with the class ids
defined in ``classification_categories``; ``info`` names the classifier. Crops are cut by the shared rule in
:mod:`animl_retrain.vision.preprocessing` (each image decoded once, at the JPEG scale its smallest box allows, as the
crop stage does). Images that are missing or cannot be decoded keep their detections unclassified and are
listed in ``report.json``; classifications from an earlier classifier are replaced, never mixed in.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from animl_retrain.config import StageConfig
from animl_retrain.core.checks import safe_relpath
from animl_retrain.core.errors import PipelineError, UnsafePathError
from animl_retrain.core.io import read_json
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import mdformat, model_folder
from animl_retrain.serving.http import load_classifier
from animl_retrain.vision.images import DEFAULT_MAX_PIXELS, BadImageError
from animl_retrain.vision.preprocessing import crop_squares

RESULTS_FILE = "classified_results.json"


class PredictConfig(StageConfig):
    """Settings of predict."""

    model: Path = Field(description="model folder (from pull-model, or the deploy stage's package)")
    images: Path = Field(description="folder the results file's image paths are relative to")
    detections: Path = Field(description="MegaDetector results file (format 1.x) to classify")
    out: Path = Field(description="output folder")
    backend: Literal["pytorch", "torchscript", "onnx"] = Field("pytorch", description="how to run the model")
    detection_threshold: float = Field(0.1, ge=0, le=1, description="classify detections at or above this conf")
    categories: list[str] = Field(["1"], description="detection category ids to classify (1 = animal)")
    batch_size: int = Field(32, ge=1, le=1024, description="crops per forward pass")


class PredictResult(BaseModel):
    """What predict did."""

    images: int
    classified: int
    skipped_images: int
    results_file: str


def _crops_of(path: Path, dets: list[dict], preprocessing) -> list:
    return crop_squares(path, [d["bbox"] for d in dets], preprocessing.image_size, DEFAULT_MAX_PIXELS)


def run(cfg: PredictConfig) -> PredictResult:
    """Classify, then write ``classified_results.json`` and ``report.json`` into ``cfg.out``."""
    report = Report("predict")
    results = mdformat.read_results(cfg.detections)
    try:
        classifier = load_classifier(cfg.model, cfg.backend)
    except (FileNotFoundError, ValueError) as e:
        raise PipelineError(f"predict: {e}") from e
    labels = classifier.labels
    wanted = {str(c) for c in cfg.categories}
    pending: list[tuple[dict, object]] = []  # (detection, crop)
    stale = classified = skipped = unusable = 0

    def flush() -> None:
        nonlocal classified
        probs = classifier.probabilities([crop for _, crop in pending], cfg.batch_size)
        for (det, _), row in zip(pending, probs, strict=True):
            order = sorted(range(len(labels)), key=lambda i: -row[i])
            det["classifications"] = [[str(i), round(float(row[i]), 6)] for i in order]
        classified += len(pending)
        pending.clear()

    for im in results["images"]:
        detections = im.get("detections") or []
        for det in detections:
            if det.pop("classifications", None) is not None:
                stale += 1
        dets = [
            d
            for d in detections
            if str(d.get("category")) in wanted
            and isinstance(d.get("conf"), int | float)
            and d["conf"] >= cfg.detection_threshold
        ]
        if not dets or im.get("failure"):
            continue
        usable = []
        for det in dets:
            why = mdformat.box_problem(det["bbox"])
            if why:
                report.problem("box not classified", im["file"], why)
                unusable += 1
            else:
                usable.append(det)
        dets = usable
        if not dets:
            continue
        try:
            path = Path(cfg.images) / safe_relpath(im["file"], "results file entry")
            crops = _crops_of(path, dets, classifier.preprocessing)
        except (UnsafePathError, FileNotFoundError, BadImageError) as e:
            report.problem("image not classified", im["file"], str(e))
            skipped += 1
            continue
        pending += list(zip(dets, crops, strict=True))
        if len(pending) >= cfg.batch_size:
            flush()
    if pending:
        flush()

    if not isinstance(results.get("info"), dict):
        results["info"] = {}
    results["classification_categories"] = {str(i): label for i, label in enumerate(labels)}
    results["info"]["classifier"] = str(Path(cfg.model).name)
    results["info"]["classification_completion_time"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    model_info = Path(cfg.model) / model_folder.INFO_FILE
    metadata = {"backend": cfg.backend, "detection_threshold": cfg.detection_threshold}
    if model_info.is_file():
        info = read_json(model_info, model_folder.INFO_FILE)
        metadata.update(name=info.get("name"), version=info.get("version"))
        results["info"]["classifier"] = f"{info.get('name')} v{info.get('version')}"
    results["info"]["classifier_metadata"] = metadata
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mdformat.write_results(out / RESULTS_FILE, results)
    report.counts = {"images": len(results["images"]), "classified": classified, "skipped_images": skipped}
    if stale:
        report.counts["replaced_classifications"] = stale
    if unusable:
        report.counts["unusable_boxes"] = unusable
    report.finish(out)
    if skipped and not classified:
        raise PipelineError(f"predict: none of the images could be classified; see {out / 'report.json'}")
    log.info("predict: classified %d detections in %d images", classified, len(results["images"]))
    return PredictResult(
        images=len(results["images"]),
        classified=classified,
        skipped_images=skipped,
        results_file=str(out / RESULTS_FILE),
    )
