"""Stage 1, export: read an Animl CCT export, validate it and apply the label spec.

The export comes from S3, a local file, or (``source`` ``animl-api``) straight from Animl: the stage logs in as
the project's dedicated user, runs Animl's own "Export to COCO" task and keeps a dated copy of the file under
``archive`` (see :mod:`animl_retrain.integrations.animl.client`). In incremental mode it compares the validated
annotations with those behind the registry's current champion and decides ``skip`` when nothing new was validated.

Writes to ``out``: ``export.json`` (the exact input, for provenance), ``images.csv``, ``objects.csv`` (one row
per annotation kept), ``label_spec.json``, ``summary.md`` and ``report.json`` (counts per class and location,
every annotation dropped with the reason, where the export came from and the train/skip decision).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, Field, model_validator

from animl_retrain.config import StageConfig
from animl_retrain.core import storage
from animl_retrain.core.checks import safe_relpath
from animl_retrain.core.errors import PipelineError, UnsafePathError
from animl_retrain.core.io import write_json
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import cct, layout, mdformat, tables
from animl_retrain.formats.labelspec import EMPTY, OTHER, load_label_spec, normalise_name
from animl_retrain.integrations.animl import client as animl_api
from animl_retrain.integrations.mlflow import registry

TRAIN, SKIP = "train", "skip"


class ExportConfig(StageConfig):
    """Settings of the export stage."""

    source: str = Field(
        description="Animl COCO (CCT) export: s3://bucket/key.json, a local path, or 'animl-api' to pull a fresh "
        "export from Animl (the animl_* settings; credentials from the environment, see the README)"
    )
    label_spec: str = Field(description="label spec: inline JSON, a local path or an s3:// URI")
    out: Path = Field(description="output folder")
    unmapped: Literal["drop", "other"] = Field("drop", description="what to do with labels the spec does not list")
    only_validated: bool = Field(
        True, description="keep only annotations a person validated (with animl-api: export only reviewed images)"
    )
    max_export_mb: int = Field(1024, gt=0, description="refuse exports larger than this")
    animl_api_url: str = Field(
        "", description="Animl's GraphQL endpoint, https://<api>.execute-api.<region>.amazonaws.com/<stage>/external"
    )
    animl_project: str = Field("", description="Animl project id to export (the id in Animl's URL)")
    animl_region: str = Field("us-west-2", description="AWS region of Animl's Cognito user pool")
    animl_user_pool_id: str = Field("", description="Animl's Cognito user pool id (needed for SRP login)")
    animl_client_id: str = Field("", description="Animl's Cognito app client id")
    animl_auth_flow: animl_api.AuthFlow = Field(
        "auto", description="password login: 'srp', 'password' (USER_PASSWORD_AUTH) or 'auto' (SRP, then password)"
    )
    animl_filters: str = Field(
        "{}",
        description="Animl FiltersInput as JSON: cameras, deployments, labels (label ids), tags, createdStart, "
        "createdEnd, addedStart, addedEnd, reviewed, custom",
    )
    animl_timezone: str = Field("UTC", description="time zone of the dates in the export")
    animl_aggregate_objects: bool = Field(False, description="Animl's aggregateObjects export option")
    animl_deadline_minutes: float = Field(30.0, gt=0, description="give up on an Animl export task after this long")
    animl_poll_seconds: float = Field(2.0, gt=0, description="first wait between polls of the export task")
    archive: str = Field(
        "", description="s3://bucket/prefix (or a folder) for a dated copy of every export pulled from Animl"
    )
    incremental: bool = Field(
        False, description="decide 'skip' when no validated annotation changed since the champion's export"
    )
    model_name: str = Field("", description="registered model whose champion incremental mode compares with")

    @model_validator(mode="after")
    def _check_source(self):
        if self.source == animl_api.SOURCE:
            missing = [
                f"--{name.replace('_', '-')}"
                for name in ("animl_api_url", "animl_project", "animl_client_id", "archive")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"source 'animl-api' needs {', '.join(missing)}")
            animl_api.check_api_url(self.animl_api_url)
            animl_api.parse_filters(self.animl_filters)
        if self.incremental and not self.model_name:
            raise ValueError("incremental mode needs --model-name (whose champion to compare with)")
        return self


class ExportResult(BaseModel):
    """What the export stage produced."""

    fingerprint: str
    images: int
    objects: int
    classes: dict[str, int]
    locations: int
    validated_fingerprint: str
    validated_annotations: int
    decision: Literal["train", "skip"] = TRAIN
    decision_reason: str = ""
    animl_task_id: str = ""
    animl_count: int | None = None
    animl_reviewed: int | None = None
    animl_not_reviewed: int | None = None
    archive_uri: str = ""


def fingerprint(raw: bytes) -> str:
    """A short content hash that identifies an export across runs."""
    return hashlib.sha256(raw).hexdigest()[:16]


def validated_fingerprint(export: cct.Export) -> tuple[str, int]:
    """A hash of the validated annotations (image, annotation, label name, box) and their number.

    Independent of what changes between two exports of the same labels (category ids, export date, order), so
    equal fingerprints mean nobody validated, corrected or removed a label in between.
    """
    lines = sorted(
        "\t".join(
            (
                str(ann["image_id"]),
                str(ann.get("id", "")),
                normalise_name(export.categories[ann["category_id"]]),
                ",".join(f"{float(v):g}" for v in ann["bbox"]),
            )
        )
        for ann in export.annotations
        if ann.get("validated") is not False
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16], len(lines)


def run(cfg: ExportConfig) -> ExportResult:
    """Read, validate and filter the export; write the tables and the report."""
    report = Report("export")
    spec = load_label_spec(cfg.label_spec)
    raw, pulled, archive_uri = _read_source(cfg)
    export = cct.parse(cct.decode(raw, f"export {cfg.source}"), f"export {cfg.source}")
    images = _image_rows(export, report)
    objects = _object_rows(export, images, spec.lookup(), cfg, report)
    if not objects:
        raise PipelineError(
            f"export {cfg.source}: no annotation is left after the label spec and filters "
            f"(dropped: {dict(report.details['dropped'])}); check the spec's label names against the "
            f"export's categories {sorted(set(export.categories.values()))}"
        )
    images_df, objects_df = _tables(images, objects)
    labels = [*spec.labels, OTHER] if cfg.unmapped == "other" else spec.labels
    out = Path(cfg.out)
    _write_outputs(out, raw, images_df, objects_df, spec, labels)
    validated_fp, n_validated = validated_fingerprint(export)
    decision, reason = decide(cfg, validated_fp, n_validated)
    per_class = dict(sorted(Counter(objects_df["label"]).items()))
    per_location = dict(sorted(Counter(objects_df["location"]).items()))
    _finish_report(report, out, export, images_df, objects_df, labels, per_class, per_location)
    report.details.update(
        fingerprint=fingerprint(raw),
        source=cfg.source,
        validated_fingerprint=validated_fp,
        validated_annotations=n_validated,
        decision=decision,
        decision_reason=reason,
        **({"animl": pulled.metadata(), "archive_uri": archive_uri} if pulled else {}),
    )
    report.finish(out)
    log.info("export: %d objects in %d classes at %d locations", len(objects_df), len(per_class), len(per_location))
    result = ExportResult(
        fingerprint=fingerprint(raw),
        images=len(images_df),
        objects=len(objects_df),
        classes=per_class,
        locations=len(per_location),
        validated_fingerprint=validated_fp,
        validated_annotations=n_validated,
        decision=decision,
        decision_reason=reason,
        archive_uri=archive_uri,
        **_animl_task(pulled),
    )
    (out / layout.SUMMARY_FILE).write_text(_summary(cfg, result))
    log.info("export: %s (%s)", decision, reason)
    return result


def _tables(images: dict[str, dict], objects: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The image and object tables, with each image's kept objects and whether it needs the detector."""
    objects_df = pd.DataFrame(objects)
    kept_per_image = Counter(objects_df["image_id"])
    images_df = pd.DataFrame(images.values())
    images_df["n_objects"] = images_df["image_id"].map(kept_per_image).fillna(0).astype(int)
    images_df["needs_detection"] = images_df["image_id"].isin(_images_without_located_box(objects, images))
    return images_df, objects_df


def _write_outputs(out: Path, raw: bytes, images_df, objects_df, spec, labels: list[str]) -> None:
    """The exact input, the two tables and the label spec in canonical form."""
    out.mkdir(parents=True, exist_ok=True)
    (out / layout.EXPORT_FILE).write_bytes(raw)
    tables.write_table(images_df, out / layout.IMAGES_TABLE, tables.IMAGES)
    tables.write_table(objects_df, out / layout.OBJECTS_TABLE, tables.OBJECTS)
    write_json(
        out / layout.LABEL_SPEC_FILE,
        {**spec.to_json(), **({OTHER: {"dataset_labels": {}}} if OTHER in labels else {})},
    )


def _finish_report(report: Report, out, export, images_df, objects_df, labels, per_class, per_location) -> None:
    """Counts, and per class, per location, empty classes and unused categories."""
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
        per_class=per_class,
        per_location=per_location,
        empty_classes=[label for label in labels if label not in per_class],
        unused_categories=sorted(name for cid, name in export.categories.items() if cid not in used),
    )


def _animl_task(pulled: animl_api.PulledExport | None) -> dict:
    """The Animl export task's id and counts, for an export pulled from Animl."""
    if pulled is None:
        return {}
    return {
        "animl_task_id": pulled.task_id,
        "animl_count": pulled.count,
        "animl_reviewed": pulled.reviewed,
        "animl_not_reviewed": pulled.not_reviewed,
    }


def _read_source(cfg: ExportConfig) -> tuple[bytes, animl_api.PulledExport | None, str]:
    """The export's bytes; from Animl also what Animl said and where the dated copy went."""
    max_bytes = cfg.max_export_mb << 20
    if cfg.source != animl_api.SOURCE:
        return storage.read_bytes(cfg.source, max_bytes=max_bytes), None, ""
    settings = animl_api.AnimlSettings(
        api_url=cfg.animl_api_url,
        project=cfg.animl_project,
        client_id=cfg.animl_client_id,
        region=cfg.animl_region,
        user_pool_id=cfg.animl_user_pool_id,
        auth_flow=cfg.animl_auth_flow,
        timezone=cfg.animl_timezone,
        filters=animl_api.parse_filters(cfg.animl_filters),
        only_include_reviewed=cfg.only_validated,
        aggregate_objects=cfg.animl_aggregate_objects,
        poll_seconds=cfg.animl_poll_seconds,
        max_poll_seconds=max(cfg.animl_poll_seconds, 30.0),
        deadline_seconds=cfg.animl_deadline_minutes * 60,
        max_bytes=max_bytes,
    )
    pulled = animl_api.AnimlClient(settings).pull_export()
    archive_uri = archive_export(cfg, pulled)
    return pulled.raw, pulled, archive_uri


def archive_export(cfg: ExportConfig, pulled: animl_api.PulledExport) -> str:
    """Keep the pulled file under a dated key, with a ``.meta.json`` beside it; return the file's URI.

    Key: ``<archive>/<project>/<YYYY-MM-DD>/<HHMMSS>Z_<task id>_coco.json``, so any run's exact training data can
    be found again from the URI in its report (and in the registered model's ``export_archive`` tag).
    """
    now = dt.datetime.now(dt.UTC)
    stem = f"{cfg.animl_project}/{now:%Y-%m-%d}/{now:%H%M%S}Z_{pulled.task_id}_coco"
    base = cfg.archive.rstrip("/")
    uri = f"{base}/{stem}.json"
    meta = {
        "source": animl_api.SOURCE,
        "api_url": animl_api.public_url(cfg.animl_api_url),
        "project": cfg.animl_project,
        "filters": json.loads(cfg.animl_filters or "{}"),
        "only_include_reviewed": cfg.only_validated,
        "timezone": cfg.animl_timezone,
        "exported_at": now.isoformat(timespec="seconds"),
        "fingerprint": fingerprint(pulled.raw),
        "bytes": len(pulled.raw),
        **pulled.metadata(),
    }
    storage.put_bytes(uri, pulled.raw)
    storage.put_bytes(f"{base}/{stem}.meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    log.info("export: archived the Animl export as %s", uri)
    return uri


def decide(cfg: ExportConfig, validated_fp: str, n_validated: int) -> tuple[str, str]:
    """Train or skip: skip only in incremental mode when the champion was trained on the same validated set."""
    if not cfg.incremental:
        return TRAIN, "incremental mode is off"
    champion = registry.champion(cfg.model_name)
    if champion is None:
        return TRAIN, f"{cfg.model_name!r} has no champion yet"
    version, tags = champion.version, champion.tags
    theirs = tags.get("validated_fingerprint", "")
    if not theirs:
        return TRAIN, f"champion v{version} has no validated_fingerprint tag to compare with"
    if theirs == validated_fp:
        return SKIP, (
            f"no new validated annotations since the export behind champion v{version} "
            f"({n_validated} validated annotations, fingerprint {validated_fp})"
        )
    return TRAIN, (
        f"validated annotations changed since champion v{version}: "
        f"{tags.get('validated_annotations', '?')} then, {n_validated} now"
    )


def _summary(cfg: ExportConfig, result: ExportResult) -> str:
    """A short Markdown account for the Kubeflow UI: where the export came from and what happens next."""
    lines = [f"# Export: {'training skipped' if result.decision == SKIP else 'training'}", ""]
    lines.append(f"**Decision:** {result.decision} ({result.decision_reason}).")
    lines.append("")
    if result.animl_task_id:
        lines += [
            f"Pulled from Animl project `{cfg.animl_project}`, export task `{result.animl_task_id}`: "
            f"{result.animl_count} images ({result.animl_reviewed} reviewed, {result.animl_not_reviewed} not "
            "reviewed in the filter).",
            f"Archived copy: `{result.archive_uri}`.",
            "",
        ]
    else:
        lines += [f"Source: `{cfg.source}`.", ""]
    lines.append(
        f"{result.validated_annotations} validated annotations (fingerprint `{result.validated_fingerprint}`); "
        f"{result.objects} objects kept in {len(result.classes)} classes at {result.locations} locations."
    )
    return "\n".join(lines) + "\n"


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
        key = img.get("serving_bucket_key") or img.get("original_relative_path")
        try:
            safe_relpath(key, "serving_bucket_key")  # never read outside the images bucket's prefix or folder
        except UnsafePathError as e:
            report.problem("unsafe serving_bucket_key", f"image {iid!r}", str(e))
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
            "key": key,
            "location": location,
            "camera": cct.camera_of(file),
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
                "camera": images[iid]["camera"],
                "datetime": images[iid]["datetime"],
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
