"""Animl's ``MLModel`` record for a deployed classifier, and the confidence thresholds it starts with.

Animl's API keeps one record per model (``_id`` = the model's name in Animl), used as the source of options for
automation rules and to stamp labels with the model version::

    {"_id": "mirav2", "version": "v2.0", "description": "...", "defaultConfThreshold": 0.8,
     "categories": [{"_id": "bird", "name": "bird", "color": "#6E56CF"}, ...], "expectsCrops": true}

The handler's response keys must equal the category ``_id`` values (Animl looks each key up among them), so the
categories are the model's labels, ``_id`` = ``name`` = label, in the model's output order.

Thresholds come from the evaluation's operating points when there are any (see :func:`read_operating_points`,
which reads them tolerantly because their producer is still evolving); otherwise from
:data:`DEFAULT_THRESHOLD`, MIRAv2's default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from animl_retrain.core.logging import log

DEFAULT_THRESHOLD = 0.8
THRESHOLDS_FILE = "thresholds.json"  # what the evaluate stage writes (per invasive class)
OPERATING_POINTS_FILE = "operating_points.json"
# Radix colours at step 9, as Animl's own MLModel records use them.
PALETTE = (
    "#6E56CF",
    "#3E63DD",
    "#30A46C",
    "#E93D82",
    "#E54D2E",
    "#00A2C7",
    "#F76B15",
    "#FFC53D",
    "#8E4EC6",
    "#12A594",
    "#D6409F",
    "#0090FF",
    "#AD7F58",
    "#978365",
    "#46A758",
    "#29A383",
)
_DEFAULT_KEYS = ("defaultConfThreshold", "default_conf_threshold", "default_threshold", "default", "threshold")
_CLASS_KEYS = ("per_class", "classes", "thresholds", "invasive", "per_invasive_class", "operating_points")
_VALUE_KEYS = ("threshold", "conf_threshold", "confThreshold", "value")


def _threshold(value: Any) -> float | None:
    """A threshold from a number or a ``{"threshold": x}``-like dict; None unless it is a number in (0, 1]."""
    if isinstance(value, dict):
        value = next((value[k] for k in _VALUE_KEYS if k in value), None)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and 0 < value <= 1:
        return float(value)
    return None


def _per_class(data: Any, labels: list[str]) -> dict[str, float]:
    """Per-class thresholds from ``{label: x}``, ``{label: {"threshold": x}}`` or ``[{"label", "threshold"}]``."""
    if isinstance(data, list):
        data = {str(d.get("label", d.get("class", ""))): d for d in data if isinstance(d, dict)}
    if not isinstance(data, dict):
        return {}
    out = {}
    for label, value in data.items():
        t = _threshold(value)
        if isinstance(value, dict) and value.get("met") is False and not value.get("floor_binding"):
            log.warning("operating point of %r does not meet its target precision; using the default", label)
        elif label in labels and t is not None:
            out[label] = t
    return out


def _interpret(data: Any, labels: list[str]) -> tuple[float | None, dict[str, float]]:
    if not isinstance(data, dict):
        return None, {}
    default = next((t for k in _DEFAULT_KEYS if k in data and (t := _threshold(data[k])) is not None), None)
    per_class: dict[str, float] = {}
    for key in _CLASS_KEYS:
        if key in data:
            per_class.update(_per_class(data[key], labels))
    if not per_class:  # a bare {label: threshold} mapping
        per_class = _per_class({k: v for k, v in data.items() if k in labels}, labels)
    return default, per_class


def read_operating_points(
    evaluation: Path | None, tags: dict[str, str], labels: list[str]
) -> tuple[float, dict[str, float], str]:
    """The default threshold, per-class thresholds and where they came from.

    Looked for, in order: ``thresholds.json`` (the evaluate stage's per-invasive-class thresholds) and
    ``operating_points.json`` in the evaluation folder; an ``operating_points`` key in its ``metrics.json``; the
    ``operating_points`` or ``invasive_thresholds`` tag (JSON) or the ``default_conf_threshold`` tag.
    Accepted shapes: a default under ``defaultConfThreshold``/``default_threshold``/``default``/``threshold``;
    per-class thresholds under ``per_class``/``classes``/``thresholds``/``invasive`` as ``{label: x}``,
    ``{label: {"threshold": x}}`` or a list of ``{"label": ..., "threshold": ...}``. Values outside (0, 1] and
    labels the model does not have, and points marked ``"met": false`` (unless a recall floor chose them:
    ``"floor_binding": true``), are ignored (and logged); with no default
    found, the default is :data:`DEFAULT_THRESHOLD` (per-class thresholds go to the automation rule's
    ``categoryConfig``, not to the model-wide default).
    """
    candidates: list[tuple[str, Any]] = []
    if evaluation is not None:
        for name in (THRESHOLDS_FILE, OPERATING_POINTS_FILE):
            path = Path(evaluation) / name
            if path.is_file():
                try:
                    candidates.append((str(path), json.loads(path.read_text())))
                except json.JSONDecodeError as e:
                    log.warning("ignoring %s: not JSON (%s)", path, e)
        metrics = Path(evaluation) / "metrics.json"
        if metrics.is_file():
            try:
                data = json.loads(metrics.read_text())
                if isinstance(data, dict) and "operating_points" in data:
                    candidates.append((f"{metrics}:operating_points", data["operating_points"]))
            except json.JSONDecodeError as e:
                log.warning("ignoring %s: not JSON (%s)", metrics, e)
    for tag in ("operating_points", "invasive_thresholds"):
        if tag in tags:
            try:
                candidates.append((f"tag {tag}", json.loads(tags[tag])))
            except json.JSONDecodeError as e:
                log.warning("ignoring the %s tag: not JSON (%s)", tag, e)
    raw = tags.get("default_conf_threshold")
    if raw is not None:
        try:
            candidates.append(("model version tag default_conf_threshold", {"default": float(raw)}))
        except ValueError:
            log.warning("ignoring the default_conf_threshold tag %r: not a number", raw)
    for source, data in candidates:
        default, per_class = _interpret(data, labels)
        if default is not None or per_class:
            return (default if default is not None else DEFAULT_THRESHOLD), per_class, source
        log.warning("operating points in %s hold no usable threshold; ignored", source)
    return DEFAULT_THRESHOLD, {}, f"default {DEFAULT_THRESHOLD} (no operating points found)"


def record(model_id: str, version: str, description: str, labels: list[str], threshold: float) -> dict[str, Any]:
    """The ``MLModel`` record Animl stores for this model version."""
    return {
        "_id": model_id,
        "version": version,
        "description": description,
        "defaultConfThreshold": threshold,
        "categories": [
            {"_id": label, "name": label, "color": PALETTE[i % len(PALETTE)]} for i, label in enumerate(labels)
        ],
        "expectsCrops": True,
    }


def category_config(labels: list[str], default: float, per_class: dict[str, float]) -> dict[str, dict]:
    """A project automation rule's ``categoryConfig`` with the per-class thresholds filled in."""
    return {label: {"confThreshold": per_class.get(label, default), "disabled": False} for label in labels}
