"""Split: our vectorised search against the same search written plainly (a per-trial loop scored with pandas)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from animl_retrain.stages import split

STAGE = "split"


def synthetic_counts(locations: int, classes: int, seed: int = 0) -> np.ndarray:
    """A (locations, classes) count matrix shaped like a real project: few classes per location, skewed sizes."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((locations, classes))
    for loc in range(locations):
        present = rng.choice(classes, size=rng.integers(2, 8), replace=False)
        counts[loc, present] = rng.lognormal(2.5, 1.2, size=len(present)).round() + 1
    return counts


def plain_search(counts: np.ndarray, cfg: split.SplitConfig) -> tuple[np.ndarray, float]:
    """The search as CameraTraps-style scripts write it: one trial at a time, scored with pandas."""
    rng = np.random.default_rng(cfg.seed)
    frame = pd.DataFrame(counts)
    totals = frame.sum()
    best, best_score = None, np.inf
    for start in range(0, cfg.trials, split.BATCH):
        for u in rng.random((min(split.BATCH, cfg.trials - start), counts.shape[0])):
            assign = np.where(u < cfg.test_frac, 2, np.where(u < cfg.test_frac + cfg.val_frac, 1, 0))
            per_split = frame.groupby(assign).sum().reindex([0, 1, 2], fill_value=0)
            share = per_split / totals
            score = abs(share.loc[1] - cfg.val_frac).sum() + abs(share.loc[2] - cfg.test_frac).sum()
            score += split.MISSING_PENALTY * int((per_split == 0).to_numpy().sum())
            if score < best_score - 1e-12:
                best, best_score = assign, score
    return best, best_score


def run(ctx):
    """10,000 trials over 200 locations and 20 classes (fewer with --quick)."""
    locations, classes, trials = (60, 10, 1000) if ctx.quick else (200, 20, 10_000)
    counts = synthetic_counts(locations, classes)
    cfg = split.SplitConfig(crops=ctx.work, out=ctx.work, trials=trials, seed=11)
    ours_result = split.search(counts, cfg)
    theirs_result = plain_search(counts, cfg)
    if not np.array_equal(ours_result[0], theirs_result[0]):
        raise AssertionError("the vectorised search chose a different split than the plain loop")
    ours, theirs = ctx_timed(ctx, lambda: split.search(counts, cfg), lambda: plain_search(counts, cfg))
    return [
        ctx.row(
            stage=STAGE,
            metric="search time",
            unit="s",
            ours=ours,
            alternative="plain pandas loop",
            alternative_value=theirs,
            higher_is_better=False,
            input=f"{locations} locations, {classes} classes, {trials} trials; identical split chosen",
        )
    ]


def ctx_timed(ctx, ours, theirs):
    """The plain loop takes minutes: time it fewer times."""
    from bench.harness import timed

    return timed(ours, repeats=ctx.repeats), timed(theirs, repeats=max(1, ctx.repeats // 3), warmup=0)
