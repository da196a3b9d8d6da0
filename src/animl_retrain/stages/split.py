"""Stage 5, split: train/val/test with every location wholly in one split.

Random location assignments are scored for per-class balance against the requested fractions and the best one
is kept (the search of Microsoft's and TNC's scripts, vectorised with numpy: every trial at once). Trial ``t``
draws one uniform number per location from ``numpy.random.default_rng(seed)``; a location goes to test below
``test_frac``, to val below ``test_frac + val_frac``, else to train. The score is the sum over classes of the
distance of each split's share of the class from its target, plus a large penalty for every class missing
from a split. Classes seen at fewer than ``min_locs`` locations are dropped with a message.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, model_validator

from animl_retrain import tables
from animl_retrain.common import PipelineError, Report, log, write_json
from animl_retrain.config import StageConfig

SPLITS = ("train", "val", "test")
MISSING_PENALTY = 1000.0
BATCH = 2048


class SplitConfig(StageConfig):
    """Settings of the split stage."""

    crops: Path = Field(description="output folder of the crop stage")
    out: Path = Field(description="output folder")
    val_frac: float = Field(0.15, gt=0, lt=1, description="share of each class to put in validation")
    test_frac: float = Field(0.15, gt=0, lt=1, description="share of each class to put in test")
    min_locs: int = Field(3, ge=1, description="drop classes seen at fewer locations than this")
    trials: int = Field(10_000, ge=1, le=10_000_000, description="random location assignments to score")
    seed: int = Field(0, description="random seed; the same seed gives the same split")

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


def test_fingerprint(split: pd.DataFrame) -> str:
    """Identifies the exact test set: models are only compared on equal fingerprints."""
    test = split[split["split"] == "test"].sort_values("annotation_id")
    text = "\n".join(test["annotation_id"] + "\t" + test["label"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run(cfg: SplitConfig) -> SplitResult:
    """Choose the split; write ``split.csv``, ``label_index.json`` and the report."""
    report = Report("split")
    crops = tables.read_table(Path(cfg.crops) / "crops.csv", tables.CROPS)
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
    assign, score = search(counts, cfg)
    split_of = {loc: SPLITS[a] for loc, a in zip(locations, assign, strict=True)}
    crops = crops.assign(split=crops["location"].map(split_of))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tables.write_table(crops, out / "split.csv", tables.SPLIT)
    write_json(out / "label_index.json", {str(i): label for i, label in enumerate(labels)})
    per_split = {
        s: crops[crops["split"] == s]["label"].value_counts().reindex(labels, fill_value=0).astype(int).to_dict()
        for s in SPLITS
    }
    loc_counts = {s: sum(1 for v in split_of.values() if v == s) for s in SPLITS}
    fingerprint = test_fingerprint(crops)
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
    )
    report.finish(out)
    log.info("split: %s crops over %s locations (score %.3f)", report.counts, loc_counts, score)
    return SplitResult(labels=labels, counts=per_split, locations=loc_counts, score=score, test_fingerprint=fingerprint)
