"""The CSV tables stages hand to each other, with their columns and types defined once."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import atomic_path

# Every image of the export that survived validation.
IMAGES = {
    "image_id": "str",
    "file": "str",  # safe relative path under the images folder
    "key": "str",  # object key in the images bucket
    "location": "str",
    "camera": "str",  # the camera serial, from Animl's file_name (formats.cct.camera_of); "" when not there
    "datetime": "str",  # as in the export: ISO 8601 with an offset; "" when missing
    "width": "Int64",
    "height": "Int64",
    "n_objects": "int",  # objects kept by the label spec
    "animl_labels": "str",  # every Animl label on the image, ';'-separated
    # Kept labels, but no kept box locates the animal (only full-frame image-level labels): the download stage
    # fetches it and the detect stage runs MegaDetector on it. Where the export lacks the image size, boxes at
    # the top-left corner count as possibly full-frame; detect and crop decide on the normalised boxes.
    "needs_detection": "bool",
    # The checksum the image's source keeps (md5-… or sha256-…), set by the download stage when it uses the
    # cache; an image listed with a checksum may be in the cache only, not on disk. "" when unknown.
    "checksum": "str",
}

# Every annotation kept by the label spec: one crop each.
OBJECTS = {
    "annotation_id": "str",
    "image_id": "str",
    "file": "str",
    "label": "str",
    "animl_label": "str",
    "x": "float",  # box in absolute pixels, as in the export
    "y": "float",
    "w": "float",
    "h": "float",
    "validated": "bool",
    "location": "str",
    "camera": "str",
    "datetime": "str",
}

# One row per crop written by the crop stage.
CROPS = {
    "crop": "str",  # path under the crops folder
    "annotation_id": "str",
    "image_id": "str",
    "file": "str",
    "label": "str",
    "location": "str",
    "camera": "str",
    "datetime": "str",
    "box_source": "str",  # ground_truth | detector
    "x": "float",  # box normalised to the image, [x, y, w, h]
    "y": "float",
    "w": "float",
    "h": "float",
    "conf": "float",
}

# The crop table plus the group the split kept whole (the location, or the camera's sequence) and its split.
SPLIT = {**CROPS, "group": "str", "split": "str"}

# Columns added after a table's first version: a table written without them (by an older run, or a cached
# stage output) reads, and writes, with this value there. The split reports what an empty camera or datetime
# means for sequence grouping.
ADDED_LATER = {"camera": "", "datetime": "", "group": "", "checksum": ""}


def write_table(df: pd.DataFrame, path: Path, schema: dict[str, str]) -> None:
    """Write ``df`` with exactly the schema's columns, atomically."""
    df = _with_added_columns(df, schema)
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise ValueError(f"table for {path.name} lacks columns {missing}")
    with atomic_path(Path(path)) as tmp:
        df[list(schema)].to_csv(tmp, index=False)


def read_table(path: Path, schema: dict[str, str]) -> pd.DataFrame:
    """Read a table written by :func:`write_table`, restoring the schema's types."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"table not found: {path} (was the previous stage's output passed in?)")
    text_cols = {c: "str" for c, t in schema.items() if t == "str"}
    df = _with_added_columns(pd.read_csv(path, dtype=text_cols, keep_default_na=False), schema)
    missing = [c for c in schema if c not in df.columns]
    if missing:
        raise PipelineError(f"{path}: missing columns {missing}")
    for col, kind in schema.items():
        if kind == "Int64":
            df[col] = pd.to_numeric(df[col].replace("", None), errors="coerce").astype("Int64")
        elif kind in ("int", "float"):
            df[col] = pd.to_numeric(df[col]).astype(kind)
        elif kind == "bool":
            df[col] = df[col].astype(str).str.lower().eq("true")
    return df[list(schema)]


def _with_added_columns(df: pd.DataFrame, schema: dict[str, str]) -> pd.DataFrame:
    """``df`` with every :data:`ADDED_LATER` column of the schema that it lacks, at its default."""
    absent = {c: v for c, v in ADDED_LATER.items() if c in schema and c not in df.columns}
    return df.assign(**absent) if absent else df


def test_fingerprint(split: pd.DataFrame) -> str:
    """Identifies the exact test set of a :data:`SPLIT` table: models are only compared on equal fingerprints."""
    test = split[split["split"] == "test"].sort_values("annotation_id")
    text = "\n".join(test["annotation_id"] + "\t" + test["label"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
