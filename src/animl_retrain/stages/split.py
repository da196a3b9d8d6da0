"""Stage 5, split: train/val/test with every location wholly in one split.

Random location assignments are scored for per-class balance against the requested fractions and the best one
is kept (the search of Microsoft's and TNC's scripts, vectorised with numpy: every trial at once). Trial ``t``
draws one uniform number per location from ``numpy.random.default_rng(seed)``; a location goes to test below
``test_frac``, to val below ``test_frac + val_frac``, else to train. The score is the sum over classes of the
distance of each split's share of the class from its target, plus a large penalty for every class missing
from a split. Classes seen at fewer than ``min_locs`` locations are dropped with a message.

**Frozen test set.** With ``frozen_test_uri``, the first run writes its test locations there; later runs put
exactly those locations in test again (new locations only go to train or val), so a retrained challenger and the
champion are scored on the same test images. ``new_test_set`` draws a new one and overwrites the file.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, model_validator

from animl_retrain.config import StageConfig
from animl_retrain.core import storage
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import write_json
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import layout, tables

SPLITS = ("train", "val", "test")
MISSING_PENALTY = 1000.0
BATCH = 2048
FROZEN_FORMAT = "animl-retrain-test-locations/1"


class SplitConfig(StageConfig):
    """Settings of the split stage."""

    crops: Path = Field(description="output folder of the crop stage")
    out: Path = Field(description="output folder")
    val_frac: float = Field(0.15, gt=0, lt=1, description="share of each class to put in validation")
    test_frac: float = Field(0.15, gt=0, lt=1, description="share of each class to put in test")
    min_locs: int = Field(3, ge=1, description="drop classes seen at fewer locations than this")
    trials: int = Field(10_000, ge=1, le=10_000_000, description="random location assignments to score")
    seed: int = Field(0, description="random seed; the same seed gives the same split")
    frozen_test_uri: str = Field(
        "",
        description="s3:// URI or path of the frozen test set: written by the first run, reused by later runs "
        "('' = a new test set every run)",
    )
    new_test_set: bool = Field(False, description="ignore the frozen test set, draw a new one and overwrite it")

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_frac + self.test_frac >= 1:
            raise ValueError("val_frac + test_frac must leave something for training")
        return self


class SplitResult(BaseModel):
    """What the split stage produced."""

    labels: list[str]
    counts: dict[str, dict[str, int]]
    locations: dict[str, int]
    score: float
    test_fingerprint: str
    frozen_test: str = ""  # "", "written" or "reused"


def class_location_counts(crops: pd.DataFrame) -> tuple[np.ndarray, list[str], list[str]]:
    """Counts matrix ``(locations, classes)`` with its sorted location and class names."""
    table = pd.crosstab(crops["location"], crops["label"]).sort_index().sort_index(axis=1)
    return table.to_numpy(dtype=np.float64), list(table.index), list(table.columns)


def score_assignments(assign: np.ndarray, counts: np.ndarray, val_frac: float, test_frac: float) -> np.ndarray:
    """Score a batch of assignments ``(trials, locations)`` with values 0=train, 1=val, 2=test; lower is better."""
    onehot = np.stack([assign == s for s in range(3)], axis=-1).astype(np.float64)  # (T, L, 3)
    per_split = np.einsum("tls,lc->tsc", onehot, counts)  # (T, 3, C)
    share = per_split / counts.sum(axis=0)
    target = np.array([1 - val_frac - test_frac, val_frac, test_frac])[None, :, None]
    distance = np.abs(share[:, 1:, :] - target[:, 1:, :]).sum(axis=(1, 2))
    missing = (per_split == 0).sum(axis=(1, 2))
    return distance + MISSING_PENALTY * missing


def draw_assignments(rng: np.random.Generator, n: int, locations: int, val_frac: float, test_frac: float) -> np.ndarray:
    """``n`` random assignments of ``locations`` locations: 0=train, 1=val, 2=test."""
    u = rng.random((n, locations))
    return np.where(u < test_frac, 2, np.where(u < test_frac + val_frac, 1, 0))


def search(counts: np.ndarray, cfg: SplitConfig) -> tuple[np.ndarray, float]:
    """The best of ``cfg.trials`` random assignments (the first one on ties) and its score."""
    rng = np.random.default_rng(cfg.seed)
    best, best_score = None, np.inf
    for start in range(0, cfg.trials, BATCH):
        n = min(BATCH, cfg.trials - start)
        assign = draw_assignments(rng, n, counts.shape[0], cfg.val_frac, cfg.test_frac)
        scores = score_assignments(assign, counts, cfg.val_frac, cfg.test_frac)
        i = int(np.argmin(scores))
        if scores[i] < best_score:
            best, best_score = assign[i], float(scores[i])
    return best, best_score


def search_with_fixed_test(counts: np.ndarray, fixed_test: np.ndarray, cfg: SplitConfig) -> tuple[np.ndarray, float]:
    """Like :func:`search`, with the ``fixed_test`` locations held in test and the others drawn into train or val."""
    rng = np.random.default_rng(cfg.seed)
    free = ~fixed_test
    p_val = min(1.0, cfg.val_frac / (1 - cfg.test_frac))
    best, best_score = None, np.inf
    for start in range(0, cfg.trials, BATCH):
        n = min(BATCH, cfg.trials - start)
        assign = np.full((n, counts.shape[0]), 2)
        assign[:, free] = draw_assignments(rng, n, int(free.sum()), p_val, 0.0)
        scores = score_assignments(assign, counts, cfg.val_frac, cfg.test_frac)
        i = int(np.argmin(scores))
        if scores[i] < best_score:
            best, best_score = assign[i], float(scores[i])
    return best, best_score


def read_frozen_test(uri: str) -> list[str] | None:
    """The frozen test locations at ``uri``, or None when there are none yet."""
    if not storage.exists(uri):
        return None
    try:
        data = json.loads(storage.read_bytes(uri, max_bytes=64 << 20))
        if not isinstance(data, dict) or data.get("format") != FROZEN_FORMAT or not isinstance(data["locations"], list):
            raise ValueError(f"expected format {FROZEN_FORMAT} with a 'locations' list")
    except (ValueError, KeyError) as e:
        raise PipelineError(f"split: frozen test set {uri} is unreadable ({e}); fix it or pass --new-test-set") from e
    return [str(loc) for loc in data["locations"]]


def write_frozen_test(uri: str, locations: list[str], fingerprint: str, cfg: SplitConfig) -> None:
    """Record the test locations for later runs."""
    doc = {
        "format": FROZEN_FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "test_fingerprint": fingerprint,
        "seed": cfg.seed,
        "locations": sorted(locations),
    }
    storage.put_bytes(uri, (json.dumps(doc, indent=2) + "\n").encode())


def _choose(counts: np.ndarray, locations: list[str], cfg: SplitConfig, report: Report) -> tuple[np.ndarray, float]:
    """Search for the split, holding a frozen test set when there is one."""
    frozen = None
    if cfg.frozen_test_uri and not cfg.new_test_set:
        frozen = read_frozen_test(cfg.frozen_test_uri)
    if frozen is None:
        return search(counts, cfg)
    fixed = np.isin(np.array(locations, dtype=object), np.array(frozen, dtype=object))
    gone = sorted(set(frozen) - set(locations))
    if not fixed.any():
        raise PipelineError(
            f"split: none of the {len(frozen)} frozen test locations in {cfg.frozen_test_uri} is in this export; "
            "pass --new-test-set to draw a new test set"
        )
    if gone:
        report.problem("frozen test locations absent", f"{len(gone)} location(s)", ", ".join(gone[:10]))
    log.info("split: reusing %d frozen test locations from %s", int(fixed.sum()), cfg.frozen_test_uri)
    report.details["frozen_test_locations"] = int(fixed.sum())
    return search_with_fixed_test(counts, fixed, cfg)


def run(cfg: SplitConfig) -> SplitResult:
    """Choose the split; write ``split.csv``, ``label_index.json`` and the report."""
    report = Report("split")
    crops = tables.read_table(Path(cfg.crops) / layout.CROPS_TABLE, tables.CROPS)
    locs_per_class = crops.groupby("label")["location"].nunique()
    rare = locs_per_class[locs_per_class < cfg.min_locs]
    for label, n in rare.items():
        report.problem("class dropped", label, f"seen at {n} location(s), fewer than min_locs={cfg.min_locs}")
    crops = crops[~crops["label"].isin(rare.index)]
    if crops["label"].nunique() < 2:
        raise PipelineError(
            f"split: fewer than two classes are seen at >= {cfg.min_locs} locations; "
            f"lower min_locs or add data (classes: {locs_per_class.to_dict()})"
        )

    counts, locations, labels = class_location_counts(crops)
    if len(locations) < 3:
        raise PipelineError(f"split: {len(locations)} location(s) cannot fill train, val and test")
    assign, score = _choose(counts, locations, cfg, report)
    frozen = "reused" if "frozen_test_locations" in report.details else ""
    split_of = {loc: SPLITS[a] for loc, a in zip(locations, assign, strict=True)}
    crops = crops.assign(split=crops["location"].map(split_of))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tables.write_table(crops, out / layout.SPLIT_TABLE, tables.SPLIT)
    write_json(out / layout.LABEL_INDEX_FILE, {str(i): label for i, label in enumerate(labels)})
    per_split = {
        s: crops[crops["split"] == s]["label"].value_counts().reindex(labels, fill_value=0).astype(int).to_dict()
        for s in SPLITS
    }
    loc_counts = {s: sum(1 for v in split_of.values() if v == s) for s in SPLITS}
    fingerprint = tables.test_fingerprint(crops)
    if cfg.frozen_test_uri and not frozen:
        write_frozen_test(cfg.frozen_test_uri, [loc for loc, sp in split_of.items() if sp == "test"], fingerprint, cfg)
        frozen = "written"
    missing = [(s, label) for s in SPLITS for label in labels if per_split[s][label] == 0]
    for s, label in missing:
        report.problem("class missing from a split", f"{label} in {s}", "too few locations to place it everywhere")
    report.counts = {s: int((crops["split"] == s).sum()) for s in SPLITS} | {"classes": len(labels)}
    report.details.update(
        per_split=per_split,
        locations=loc_counts,
        score=score,
        test_fingerprint=fingerprint,
        dropped_classes=list(rare.index),
        seed=cfg.seed,
        trials=cfg.trials,
        frozen_test=frozen,
    )
    report.finish(out)
    log.info("split: %s crops over %s locations (score %.3f)", report.counts, loc_counts, score)
    return SplitResult(
        labels=labels,
        counts=per_split,
        locations=loc_counts,
        score=score,
        test_fingerprint=fingerprint,
        frozen_test=frozen,
    )
