"""Stage 5, split: train/val/test with every location (or burst) wholly in one split, balanced per class.

**Groups.** Crops are split in groups, never one by one: by location, as Microsoft's and TNC's scripts do, or,
when the export has no usable location (every location missing or ``unknown``, or only one), by sequence: the
bursts of one camera, each image at most ``sequence_gap`` seconds after the one before it (see
:func:`sequence_groups`). ``group_by`` forces either; the report says which grouping was used and why.

**Score.** An assignment of groups to splits is scored by :func:`score_assignments`: the sum over classes of the
distance of each class's val and test shares from their target fractions, plus a large penalty for every
(class, split) pair left empty. Classes seen in fewer than ``min_locs`` groups are dropped with a message.

**Search.** ``method: optimise`` (the default) constructs an assignment and improves it (:func:`optimise`): the
rarest classes are placed first, one group in every split they lack; the other groups follow biggest first, each
to the split that keeps the classes closest to their targets; then a local search applies improving moves of one
group and swaps of two groups until none is left, from several seeded constructions. ``method: random`` is the
old search of Microsoft's and TNC's scripts, kept for comparison: the best of ``trials`` random assignments (trial
``t`` draws one uniform number per group from ``numpy.random.default_rng(seed)``; a group goes to test below
``test_frac``, to val below ``test_frac + val_frac``, else to train). Random draws cannot cover classes that live
in a handful of groups: with 20 classes at 5 groups each, one draw in ~3e10 places every class in every split.

**Frozen test set.** With ``frozen_test_uri``, the first run writes its test groups there; later runs put exactly
those groups in test again (new groups only go to train or val), so a retrained challenger and the champion are
scored on the same test images. ``new_test_set`` draws a new one and overwrites the file.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, model_validator

from animl_retrain.config import StageConfig
from animl_retrain.core import storage
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import write_json
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import cct, layout, tables

SPLITS = ("train", "val", "test")
MISSING_PENALTY = 1000.0
BATCH = 2048
FROZEN_FORMAT = "animl-retrain-test-locations/1"
UNKNOWN_LOCATION = "unknown"  # what the export stage writes for an image without a location
# Local search bounds: every swap of two groups that share a class is tried while there are at most this many
# pairs of groups; above it, SWAP_PARTNERS partners per group are drawn (seeded) in each round. MAX_ROUNDS
# bounds the rounds of one improvement run (each applies at least one move or swap).
EXHAUSTIVE_SWAP_PAIRS = 200_000
SWAP_PARTNERS = 24
MAX_ROUNDS = 2_000
CHUNK_CELLS = 4_000_000  # pair x class cells scored at once (memory bound of the swap search)
# The train share is not scored (it follows from val and test): weight of each split's distance term.
_SCORED = np.array([0.0, 1.0, 1.0])


class SplitConfig(StageConfig):
    """Settings of the split stage."""

    crops: Path = Field(description="output folder of the crop stage")
    out: Path = Field(description="output folder")
    val_frac: float = Field(0.15, gt=0, lt=1, description="share of each class to put in validation")
    test_frac: float = Field(0.15, gt=0, lt=1, description="share of each class to put in test")
    min_locs: int = Field(3, ge=1, description="drop classes seen at fewer locations (or sequences) than this")
    method: Literal["optimise", "random"] = Field(
        "optimise",
        description="'optimise': construct an assignment and improve it by local search; 'random': the best of "
        "--trials random assignments (Microsoft's and TNC's search, for comparison)",
    )
    trials: int = Field(10_000, ge=1, le=10_000_000, description="random location assignments to score (random)")
    restarts: int = Field(8, ge=1, le=100, description="seeded constructions to improve (optimise)")
    group_by: Literal["auto", "location", "sequence"] = Field(
        "auto",
        description="'location', 'sequence' (bursts of one camera), or 'auto': by location unless the export has "
        "no usable location (all missing or one only)",
    )
    sequence_gap: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="seconds: an image this close to the previous one of its camera joins its sequence "
        "(MegaDetector's and animl-py's 60 s)",
    )
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
    locations: dict[str, int]  # groups per split: locations, or sequences when grouping by sequence
    score: float
    distance: float = 0.0  # the score without the missing-class penalties
    missing: list[str] = []  # "<class> in <split>" for every empty (class, split) pair
    group_by: str = "location"
    test_fingerprint: str
    frozen_test: str = ""  # "", "written" or "reused"


# ---------------------------------------------------------------------------------------------------------------
# The score


def class_location_counts(crops: pd.DataFrame, by: str = "location") -> tuple[np.ndarray, list[str], list[str]]:
    """Counts matrix ``(groups, classes)`` with its sorted group and class names (groups: the ``by`` column)."""
    table = pd.crosstab(crops[by], crops["label"]).sort_index().sort_index(axis=1)
    return table.to_numpy(dtype=np.float64), list(table.index), list(table.columns)


def split_targets(val_frac: float, test_frac: float) -> np.ndarray:
    """Target share of every class in train, val and test."""
    return np.array([1 - val_frac - test_frac, val_frac, test_frac])


def score_assignments(assign: np.ndarray, counts: np.ndarray, val_frac: float, test_frac: float) -> np.ndarray:
    """Score a batch of assignments ``(trials, locations)`` with values 0=train, 1=val, 2=test; lower is better."""
    onehot = np.stack([assign == s for s in range(3)], axis=-1).astype(np.float64)  # (T, L, 3)
    per_split = np.einsum("tls,lc->tsc", onehot, counts)  # (T, 3, C)
    share = per_split / counts.sum(axis=0)
    target = np.array([1 - val_frac - test_frac, val_frac, test_frac])[None, :, None]
    distance = np.abs(share[:, 1:, :] - target[:, 1:, :]).sum(axis=(1, 2))
    missing = (per_split == 0).sum(axis=(1, 2))
    return distance + MISSING_PENALTY * missing


def per_split_counts(assign: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Crops of every class in every split, ``(3, classes)``."""
    out = np.zeros((3, counts.shape[1]))
    np.add.at(out, assign, counts)
    return out


def _cost(values: np.ndarray, target: np.ndarray, weight: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """The score's cells: one split's crops of each class against its target share, plus the missing penalty.

    ``target`` and ``weight`` are the split's target share and distance weight, broadcast against ``values``
    (a scalar for one split, a column for rows of different splits); the sum of all cells is the score.
    """
    return weight * np.abs(values / totals - target) + MISSING_PENALTY * (values == 0)


# ---------------------------------------------------------------------------------------------------------------
# The random search (method: random)


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


# ---------------------------------------------------------------------------------------------------------------
# The optimised search (method: optimise)


@dataclass
class _Problem:
    """What the search needs of one problem, computed once: counts, totals, targets and each group's classes.

    ``classes[g, :]`` lists group ``g``'s classes, padded with class 0 where ``holds`` is False (``k`` columns,
    the most classes any group holds), so scoring a change reads only the cells it touches: a padded cell adds
    nothing to a group, and an unchanged cell costs nothing.
    """

    counts: np.ndarray  # (groups, classes)
    target: np.ndarray  # (3,)
    allowed: np.ndarray  # (groups, 3)
    totals: np.ndarray = field(init=False)
    classes: np.ndarray = field(init=False)  # (groups, k)
    holds: np.ndarray = field(init=False)  # (groups, k)

    def __post_init__(self):
        present = self.counts > 0
        self.totals = self.counts.sum(axis=0)
        k = max(1, int(present.sum(axis=1).max()))
        order = np.argsort(~present, axis=1, kind="stable")[:, :k]
        self.holds = np.take_along_axis(present, order, axis=1)
        self.classes = np.where(self.holds, order, 0)

    def values(self, groups: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """``counts[groups[i], cells[i, j]]``."""
        return self.counts[groups[:, None], cells]

    def touched(self, *groups: int) -> np.ndarray:
        """The classes of the given groups."""
        return np.concatenate([self.classes[g][self.holds[g]] for g in groups])


def construct(counts: np.ndarray, target: np.ndarray, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A first assignment: rare classes placed in every split first, the other groups filled biggest first.

    Groups allowed in one split only (a frozen test set) are placed there. Then, rarest class first (ties in a
    seeded order), every class seen in at least three groups gets one group in each split it still lacks: the
    unplaced group whose count of the class is closest to that split's target share. The remaining groups go,
    biggest first, to the split that keeps their classes closest to proportional to what is placed so far.
    """
    present = counts > 0
    totals = counts.sum(axis=0)
    n_groups = present.sum(axis=0)
    assign = np.where(allowed.sum(axis=1) == 1, allowed.argmax(axis=1), -1)
    for c in np.argsort(n_groups + rng.random(counts.shape[1]) * 0.5, kind="stable"):
        if n_groups[c] < 3:
            continue
        for s in (2, 1, 0):
            if (present[:, c] & (assign == s)).any():
                continue
            candidates = np.flatnonzero(present[:, c] & (assign == -1) & allowed[:, s])
            if candidates.size:
                gap = np.abs(counts[candidates, c] - target[s] * totals[c]) + rng.random(candidates.size) * 1e-6
                assign[candidates[np.argmin(gap)]] = s
    return _fill(counts, assign, target, allowed, rng)


def _fill(counts: np.ndarray, assign: np.ndarray, target: np.ndarray, allowed: np.ndarray, rng) -> np.ndarray:
    """Place every unplaced group, biggest first, where its classes stay closest to their target shares."""
    totals = counts.sum(axis=0)
    per_split = per_split_counts(np.maximum(assign, 0), counts * (assign >= 0)[:, None])
    rest = np.flatnonzero(assign == -1)
    rest = rest[np.argsort(-counts[rest].sum(axis=1) + rng.random(rest.size) * 1e-3, kind="stable")]
    choices = np.eye(3)[:, :, None]  # (choice, split, 1)
    for g in rest:
        cls = np.flatnonzero(counts[g])
        placed = per_split[:, cls] + choices * counts[g, cls]  # (choice, split, k)
        share_placed = placed.sum(axis=1, keepdims=True)  # crops of each class placed, whichever the choice
        distance = (np.abs(placed - target[None, :, None] * share_placed) / totals[cls]).sum(axis=(1, 2))
        distance[~allowed[g]] = np.inf
        s = int(np.argmin(distance))
        assign[g] = s
        per_split[s] += counts[g]
    return assign


def _move_deltas(pb: _Problem, assign: np.ndarray, per_split: np.ndarray) -> np.ndarray:
    """Score change of moving each group to each split, ``(groups, 3)``; inf where not allowed or no move."""
    groups = np.arange(len(assign))
    cells, totals = pb.classes, pb.totals[pb.classes]
    moved = pb.values(groups, cells) * pb.holds
    own = per_split[assign[:, None], cells]
    t, w = pb.target[assign][:, None], _SCORED[assign][:, None]
    leave = (_cost(own - moved, t, w, totals) - _cost(own, t, w, totals)).sum(axis=1)
    delta = np.empty(pb.allowed.shape)
    for s in range(3):
        base = per_split[s][cells]
        t, w = pb.target[s], _SCORED[s]
        delta[:, s] = leave + (_cost(base + moved, t, w, totals) - _cost(base, t, w, totals)).sum(axis=1)
    delta[groups, assign] = np.inf
    delta[~pb.allowed] = np.inf
    return delta


def _swap_deltas(pb: _Problem, assign: np.ndarray, per_split: np.ndarray, a: np.ndarray, b: np.ndarray):
    """Score change of exchanging the splits of groups ``a[i]`` and ``b[i]`` (in different splits).

    The cells are ``a``'s classes, then ``b``'s classes that ``a`` does not hold, so each class counts once.
    """
    out = np.empty(a.size)
    step = max(1, CHUNK_CELLS // (2 * pb.classes.shape[1]))
    for lo in range(0, a.size, step):
        ia, ib = a[lo : lo + step], b[lo : lo + step]
        ca, cb = pb.classes[ia], pb.classes[ib]
        from_a = (pb.values(ib, ca) - pb.values(ia, ca)) * pb.holds[ia]
        from_b = pb.values(ib, cb) * (pb.holds[ib] & (pb.values(ia, cb) == 0))
        cells, diff = np.concatenate([ca, cb], axis=1), np.concatenate([from_a, from_b], axis=1)
        p, q, totals = assign[ia][:, None], assign[ib][:, None], pb.totals[cells]
        cp, cq = per_split[p, cells], per_split[q, cells]
        tp, wp, tq, wq = pb.target[p], _SCORED[p], pb.target[q], _SCORED[q]
        change = _cost(cp + diff, tp, wp, totals) - _cost(cp, tp, wp, totals)
        change += _cost(cq - diff, tq, wq, totals) - _cost(cq, tq, wq, totals)
        out[lo : lo + step] = change.sum(axis=1)
    return out


def _independent(order: np.ndarray, touched, n_classes: int) -> list[int]:
    """The candidates of ``order`` (best first) whose classes (``touched(i)``) no better chosen one touches.

    The score is a sum over classes, so changes that touch disjoint classes add up exactly: all of them can be
    applied in one round.
    """
    used = np.zeros(n_classes, bool)
    chosen = []
    for i in order.tolist():
        cls = touched(i)
        if not used[cls].any():
            used[cls] = True
            chosen.append(i)
    return chosen


def _apply_moves(pb: _Problem, assign: np.ndarray, per_split: np.ndarray) -> bool:
    """Apply the improving single-group moves (best first, on disjoint classes); False when there is none."""
    delta = _move_deltas(pb, assign, per_split)
    best = delta.argmin(axis=1)
    gain = delta[np.arange(len(assign)), best]
    improving = np.flatnonzero(gain < -1e-9)
    if not improving.size:
        return False
    order = improving[np.argsort(gain[improving], kind="stable")]
    for g in _independent(order, pb.touched, len(pb.totals)):
        per_split[assign[g]] -= pb.counts[g]
        per_split[best[g]] += pb.counts[g]
        assign[g] = best[g]
    return True


def _share_pairs(present: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Every pair of groups that share a class, or None when there are too many pairs to try them all.

    Exchanging two groups that share no class changes the score by exactly the sum of the two moves, so only
    pairs sharing a class can improve an assignment that no single move improves.
    """
    n = len(present)
    if n * (n - 1) // 2 > EXHAUSTIVE_SWAP_PAIRS:
        return None
    a, b = np.triu_indices(n, 1)
    share = (present[a] & present[b]).any(axis=1)
    return a[share], b[share]


def _sampled_pairs(pb: _Problem, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``SWAP_PARTNERS`` seeded partners per group, each holding a class of it (one of its classes at random)."""
    present = pb.counts > 0
    n, n_classes = present.shape
    pick = np.argmax(np.where(present, rng.random(present.shape), -1.0), axis=1)
    holder_class, holders = np.nonzero(present.T)  # the groups holding each class, class by class
    start = np.searchsorted(holder_class, np.arange(n_classes))
    size = np.bincount(holder_class, minlength=n_classes)
    offset = (rng.random((n, SWAP_PARTNERS)) * size[pick][:, None]).astype(np.int64)
    return np.repeat(np.arange(n), SWAP_PARTNERS), holders[start[pick][:, None] + offset].ravel()


def _apply_swaps(pb: _Problem, assign: np.ndarray, per_split: np.ndarray, pairs, rng) -> bool:
    """Apply the improving swaps of two groups (best first, on disjoint classes); False when there is none."""
    a, b = pairs if pairs is not None else _sampled_pairs(pb, rng)
    keep = (assign[a] != assign[b]) & pb.allowed[a, assign[b]] & pb.allowed[b, assign[a]]
    a, b = a[keep], b[keep]
    if not a.size:
        return False
    gain = _swap_deltas(pb, assign, per_split, a, b)
    improving = np.flatnonzero(gain < -1e-9)
    if not improving.size:
        return False
    order = improving[np.argsort(gain[improving], kind="stable")]
    # Two chosen swaps never share a group: its classes would be touched twice.
    for i in _independent(order, lambda i: pb.touched(a[i], b[i]), len(pb.totals)):
        p, q = assign[a[i]], assign[b[i]]
        per_split[p] += pb.counts[b[i]] - pb.counts[a[i]]
        per_split[q] += pb.counts[a[i]] - pb.counts[b[i]]
        assign[a[i]], assign[b[i]] = q, p
    return True


def improve(counts: np.ndarray, assign: np.ndarray, target: np.ndarray, allowed: np.ndarray, rng) -> np.ndarray:
    """Local search: apply improving moves, then swaps, until neither improves (at most ``MAX_ROUNDS`` rounds).

    Every round applies the best improving changes that touch disjoint classes; swaps are tried only when no
    move improves. With many groups, each swap round tries ``SWAP_PARTNERS`` seeded partners per group.
    """
    pb = _Problem(counts, target, allowed)
    assign = assign.copy()
    per_split = per_split_counts(assign, counts)
    pairs = _share_pairs(counts > 0)
    for _ in range(MAX_ROUNDS):
        if _apply_moves(pb, assign, per_split):
            continue
        if not _apply_swaps(pb, assign, per_split, pairs, rng):
            break
    return assign


def optimise(
    counts: np.ndarray,
    val_frac: float,
    test_frac: float,
    allowed: np.ndarray | None = None,
    seed: int = 0,
    restarts: int = 8,
) -> tuple[np.ndarray, float]:
    """The best of ``restarts`` seeded constructions, each improved by local search, and its score.

    Args:
        counts: crops per group and class, ``(groups, classes)``.
        val_frac: target share of every class in val.
        test_frac: target share of every class in test.
        allowed: ``(groups, 3)``: the splits each group may go to (a frozen test set); default every split.
        seed: the same seed gives the same assignment.
        restarts: constructions to try; the first is kept on ties.
    """
    if allowed is None:
        allowed = np.ones((counts.shape[0], 3), bool)
    target = split_targets(val_frac, test_frac)
    rng = np.random.default_rng(seed)
    best, best_score = None, math.inf
    for _ in range(restarts):
        assign = improve(counts, construct(counts, target, allowed, rng), target, allowed, rng)
        score = float(score_assignments(assign[None], counts, val_frac, test_frac)[0])
        if score < best_score - 1e-9:
            best, best_score = assign, score
    return best, best_score


def missing_pairs(assign: np.ndarray, counts: np.ndarray, labels: list[str], allowed: np.ndarray) -> list[dict]:
    """Every empty (class, split) pair with the reason it could not be filled."""
    per_split = per_split_counts(assign, counts)
    present = counts > 0
    out = []
    for c, s in zip(*np.nonzero(per_split.T == 0), strict=True):
        n = int(present[:, c].sum())
        if n < 3:
            reason = f"seen in {n} group(s): fewer than the three splits"
        elif not (present[:, c] & allowed[:, s]).any():
            reason = "the frozen test groups hold none" if s == 2 else f"none of its groups may go to {SPLITS[s]}"
        else:
            reason = "no assignment found that fills it without emptying another (class, split)"
        out.append({"class": labels[c], "split": SPLITS[s], "groups": n, "reason": reason})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Groups: locations or sequences


def choose_grouping(crops: pd.DataFrame, cfg: SplitConfig) -> tuple[str, str]:
    """``("location" | "sequence", why)``: what the crops are grouped by."""
    usable = sorted(set(crops["location"]) - {"", UNKNOWN_LOCATION})
    if cfg.group_by == "location":
        return "location", "group_by: location"
    if cfg.group_by == "sequence":
        return "sequence", "group_by: sequence"
    if not usable:
        return "sequence", "no image has a location (all missing or 'unknown')"
    if len(usable) == 1:
        return "sequence", f"every image with a location is at one location ({usable[0]!r})"
    return "location", f"{len(usable)} locations"


def sequence_groups(crops: pd.DataFrame, gap_seconds: float, report: Report) -> pd.Series:
    """The sequence of every crop: a burst of one camera's images, each within ``gap_seconds`` of the previous.

    Images are ordered by time per camera (MegaDetector's ``create_sequences`` orders them per location); one
    more than ``gap_seconds`` after the previous image starts a new sequence, named ``<camera>@<first time>``
    (UTC), so the name stays the same in a later export of the same images. An image without a camera is grouped
    by its location instead; one with a missing or unparsable ``datetime`` is a sequence of its own
    (``<camera>@image:<image id>``), reported.
    """
    images = crops.drop_duplicates("image_id")[["image_id", "camera", "location", "datetime"]].reset_index(drop=True)
    no_camera = images["camera"].eq("")
    if no_camera.any():
        report.problem("no camera", f"{int(no_camera.sum())} image(s)", "grouped by their location's images instead")
    images["key"] = images["camera"].where(~no_camera, "location:" + images["location"])
    images["t"] = [w.timestamp() if (w := cct.parse_datetime(text)) else math.nan for text in images["datetime"]]
    undated = images["t"].isna()
    for key, group in images[undated].groupby("key"):
        shown = ", ".join(group["image_id"].head(5))
        report.problem("no usable datetime", key, f"{len(group)} image(s), each a sequence of its own (e.g. {shown})")
    dated = images[~undated].sort_values(["key", "t", "image_id"], kind="stable")
    starts = dated["key"].ne(dated["key"].shift()) | (dated["t"].diff() > gap_seconds)
    first = pd.to_datetime(dated["t"].where(starts).ffill(), unit="s", utc=True)
    names = pd.concat(
        [
            dated["key"] + "@" + first.dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
            images.loc[undated, "key"] + "@image:" + images.loc[undated, "image_id"],
        ]
    )
    return crops["image_id"].map(dict(zip(images.loc[names.index, "image_id"], names, strict=True)))


def assign_groups(crops: pd.DataFrame, cfg: SplitConfig, report: Report) -> pd.DataFrame:
    """The crops with their ``group`` column; the report says how they were grouped and why."""
    by, why = choose_grouping(crops, cfg)
    groups = crops["location"] if by == "location" else sequence_groups(crops, cfg.sequence_gap, report)
    crops = crops.assign(group=groups)
    report.details["grouping"] = {
        "by": by,
        "why": why,
        "groups": int(crops["group"].nunique()),
        **({"sequence_gap_seconds": cfg.sequence_gap} if by == "sequence" else {}),
    }
    log.info("split: grouped by %s (%s): %d groups", by, why, crops["group"].nunique())
    return crops


# ---------------------------------------------------------------------------------------------------------------
# The frozen test set


def read_frozen_test(uri: str) -> dict | None:
    """The frozen test set at ``uri`` (``locations``: its groups, ``group_by``), or None when there is none yet."""
    if not storage.exists(uri):
        return None
    try:
        data = json.loads(storage.read_bytes(uri, max_bytes=64 << 20))
        if not isinstance(data, dict) or data.get("format") != FROZEN_FORMAT or not isinstance(data["locations"], list):
            raise ValueError(f"expected format {FROZEN_FORMAT} with a 'locations' list")
    except (ValueError, KeyError) as e:
        raise PipelineError(f"split: frozen test set {uri} is unreadable ({e}); fix it or pass --new-test-set") from e
    return {"locations": [str(loc) for loc in data["locations"]], "group_by": str(data.get("group_by", "location"))}


def write_frozen_test(uri: str, groups: list[str], fingerprint: str, group_by: str, cfg: SplitConfig) -> None:
    """Record the test groups for later runs."""
    doc = {
        "format": FROZEN_FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "test_fingerprint": fingerprint,
        "seed": cfg.seed,
        "group_by": group_by,
        "locations": sorted(groups),
    }
    storage.put_bytes(uri, (json.dumps(doc, indent=2) + "\n").encode())


def _allowed_splits(groups: list[str], group_by: str, cfg: SplitConfig, report: Report) -> np.ndarray | None:
    """``(groups, 3)`` splits each group may go to under the frozen test set; None without one."""
    frozen = None
    if cfg.frozen_test_uri and not cfg.new_test_set:
        frozen = read_frozen_test(cfg.frozen_test_uri)
    if frozen is None:
        return None
    if frozen["group_by"] != group_by:
        raise PipelineError(
            f"split: the frozen test set {cfg.frozen_test_uri} holds {frozen['group_by']}s, but this run groups by "
            f"{group_by}; pass --group-by {frozen['group_by']} to reuse it, or --new-test-set to draw a new one"
        )
    fixed = np.isin(np.array(groups, dtype=object), np.array(frozen["locations"], dtype=object))
    if not fixed.any():
        raise PipelineError(
            f"split: none of the {len(frozen['locations'])} frozen test {group_by}s in {cfg.frozen_test_uri} is in "
            "this export; pass --new-test-set to draw a new test set"
        )
    gone = sorted(set(frozen["locations"]) - set(groups))
    if gone:
        report.problem("frozen test locations absent", f"{len(gone)} {group_by}(s)", ", ".join(gone[:10]))
    log.info("split: reusing %d frozen test %ss from %s", int(fixed.sum()), group_by, cfg.frozen_test_uri)
    report.details["frozen_test_locations"] = int(fixed.sum())
    return np.stack([~fixed, ~fixed, fixed], axis=1)


def _choose(counts: np.ndarray, allowed: np.ndarray | None, cfg: SplitConfig) -> np.ndarray:
    """The assignment by the configured method, holding a frozen test set when there is one."""
    if cfg.method == "random":
        if allowed is None:
            return search(counts, cfg)[0]
        return search_with_fixed_test(counts, allowed[:, 2], cfg)[0]
    return optimise(counts, cfg.val_frac, cfg.test_frac, allowed, cfg.seed, cfg.restarts)[0]


# ---------------------------------------------------------------------------------------------------------------
# The stage


def _drop_rare(crops: pd.DataFrame, cfg: SplitConfig, unit: str, report: Report) -> tuple[pd.DataFrame, list[str]]:
    """The crops of classes seen in at least ``min_locs`` groups (``unit``s); the others are dropped, reported."""
    groups_per_class = crops.groupby("label")["group"].nunique()
    rare = groups_per_class[groups_per_class < cfg.min_locs]
    for label, n in rare.items():
        report.problem("class dropped", label, f"seen at {n} {unit}(s), fewer than min_locs={cfg.min_locs}")
    crops = crops[~crops["label"].isin(rare.index)]
    if crops["label"].nunique() < 2:
        raise PipelineError(
            f"split: fewer than two classes are seen at >= {cfg.min_locs} {unit}s; "
            f"lower min_locs or add data (classes: {groups_per_class.to_dict()})"
        )
    return crops, list(rare.index)


def per_class_shares(assign, counts, groups_present, labels: list[str], target: np.ndarray) -> dict:
    """Per class: crops, groups and share of the class's crops in every split, with the target share."""
    per_split = per_split_counts(assign, counts)
    group_counts = per_split_counts(assign, groups_present.astype(np.float64))
    totals = counts.sum(axis=0)
    return {
        label: {
            s: {
                "crops": int(per_split[k, c]),
                "groups": int(group_counts[k, c]),
                "share": round(float(per_split[k, c] / totals[c]), 4),
                "target": round(float(target[k]), 4),
            }
            for k, s in enumerate(SPLITS)
        }
        for c, label in enumerate(labels)
    }


def run(cfg: SplitConfig) -> SplitResult:
    """Choose the split; write ``split.csv``, ``label_index.json``, ``summary.md`` and the report."""
    report = Report("split")
    crops = tables.read_table(Path(cfg.crops) / layout.CROPS_TABLE, tables.CROPS)
    crops = assign_groups(crops, cfg, report)
    group_by = report.details["grouping"]["by"]
    crops, dropped = _drop_rare(crops, cfg, group_by, report)
    counts, groups, labels = class_location_counts(crops, "group")
    if len(groups) < 3:
        raise PipelineError(f"split: {len(groups)} {group_by}(s) cannot fill train, val and test")
    allowed = _allowed_splits(groups, group_by, cfg, report)
    frozen = "" if allowed is None else "reused"
    assign = _choose(counts, allowed, cfg)
    split_of = {g: SPLITS[a] for g, a in zip(groups, assign, strict=True)}
    crops = crops.assign(split=crops["group"].map(split_of))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tables.write_table(crops, out / layout.SPLIT_TABLE, tables.SPLIT)
    write_json(out / layout.LABEL_INDEX_FILE, {str(i): label for i, label in enumerate(labels)})
    fingerprint = tables.test_fingerprint(crops)
    if cfg.frozen_test_uri and not frozen:
        test_groups = [g for g, sp in split_of.items() if sp == "test"]
        write_frozen_test(cfg.frozen_test_uri, test_groups, fingerprint, group_by, cfg)
        frozen = "written"
    result = _finish(cfg, report, crops, assign, counts, labels, allowed, fingerprint, frozen, dropped)
    (out / layout.SUMMARY_FILE).write_text(summary_markdown(report.details, result))
    report.finish(out)
    log.info(
        "split: %s crops over %s %ss (score %.3f, %d missing)",
        report.counts,
        result.locations,
        group_by,
        result.score,
        len(result.missing),
    )
    return result


def _finish(cfg, report, crops, assign, counts, labels, allowed, fingerprint, frozen, dropped) -> SplitResult:
    """Fill the report (score, missing pairs with their reasons, per-class shares) and build the result."""
    if allowed is None:
        allowed = np.ones((len(assign), 3), bool)
    score = float(score_assignments(assign[None], counts, cfg.val_frac, cfg.test_frac)[0])
    missing = missing_pairs(assign, counts, labels, allowed)
    for m in missing:
        report.problem("class missing from a split", f"{m['class']} in {m['split']}", m["reason"])
    per_split = {
        s: crops[crops["split"] == s]["label"].value_counts().reindex(labels, fill_value=0).astype(int).to_dict()
        for s in SPLITS
    }
    group_counts = {s: int((assign == k).sum()) for k, s in enumerate(SPLITS)}
    target = split_targets(cfg.val_frac, cfg.test_frac)
    report.counts = {s: int((crops["split"] == s).sum()) for s in SPLITS} | {"classes": len(labels)}
    report.details.update(
        method=cfg.method,
        per_split=per_split,
        locations=group_counts,
        score=score,
        distance=score - MISSING_PENALTY * len(missing),
        missing=missing,
        targets=dict(zip(SPLITS, target.round(4).tolist(), strict=True)),
        per_class=per_class_shares(assign, counts, counts > 0, labels, target),
        test_fingerprint=fingerprint,
        dropped_classes=dropped,
        seed=cfg.seed,
        **({"trials": cfg.trials} if cfg.method == "random" else {"restarts": cfg.restarts}),
        frozen_test=frozen,
    )
    return SplitResult(
        labels=labels,
        counts=per_split,
        locations=group_counts,
        score=score,
        distance=report.details["distance"],
        missing=[f"{m['class']} in {m['split']}" for m in missing],
        group_by=report.details["grouping"]["by"],
        test_fingerprint=fingerprint,
        frozen_test=frozen,
    )


def summary_markdown(details: dict, result: SplitResult) -> str:
    """The split for the Kubeflow UI: grouping, score, missing pairs and every class's share of each split."""
    grouping = details["grouping"]
    unit = "locations" if grouping["by"] == "location" else "sequences"
    lines = [
        "# Split",
        "",
        f"Grouped by {grouping['by']} ({grouping['why']}): {grouping['groups']} {unit}; "
        + ", ".join(f"{n} in {s}" for s, n in result.locations.items())
        + ".",
        "",
        f"Method `{details['method']}`, seed {details['seed']}: score {result.score:.3f}, "
        f"{result.distance:.3f} without penalties (the sum over classes of the val and test shares' distance "
        f"from their targets); {len(result.missing)} (class, split) pair(s) missing.",
    ]
    for m in details["missing"]:
        lines.append(f"- **{m['class']}** has nothing in {m['split']}: {m['reason']}.")
    targets = details["targets"]
    lines += [
        "",
        "| class | " + " | ".join(f"{s} (target {targets[s]:.2f})" for s in SPLITS) + " |",
        "|---" * 4 + "|",
    ]
    for label, row in details["per_class"].items():
        cells = [f"{row[s]['share']:.2f}: {row[s]['crops']} crops, {row[s]['groups']} {unit}" for s in SPLITS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
