"""Split: the optimised search against random search (classes missing from a split), and the vectorised random
search against the same search written plainly (a per-trial loop scored with pandas).

Quality rows use the Missouri subset when ``--research-data`` is given (its 20 species at 5 sequences each, a
sequence as the location: the case where random search cannot place every class) and a synthetic project shaped
like a real one (rare classes at a handful of locations). Each row reports classes missing from a split and the
score without the missing-class penalties (the distance of every class's val and test shares from the targets).
"""

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


def missouri_counts(research_data) -> np.ndarray | None:
    """Boxes per (sequence, species) of the Missouri subset, or None without research data."""
    if research_data is None:
        return None
    from bench.stages.accuracy import species_root

    species = sorted(p for p in species_root(research_data).iterdir() if p.is_dir())
    sequences = sorted({jpg.parent for folder in species for jpg in folder.glob("*/*.JPG")})
    counts = np.zeros((len(sequences), len(species)))
    index = {seq: i for i, seq in enumerate(sequences)}
    for c, folder in enumerate(species):
        for txt in folder.glob("*/*.txt"):
            counts[index[txt.parent], c] += max(1, sum(1 for ln in txt.read_text().splitlines() if ln.strip()))
    return counts


def quality(counts: np.ndarray, assign: np.ndarray, cfg: split.SplitConfig) -> tuple[int, float]:
    """(class-split pairs left empty among classes seen at 3+ groups, score without the missing penalties)."""
    per_split = split.per_split_counts(assign, counts)
    placeable = (counts > 0).sum(axis=0) >= 3
    missing = int((per_split[:, placeable] == 0).sum())
    score = float(split.score_assignments(assign[None], counts, cfg.val_frac, cfg.test_frac)[0])
    all_missing = int((per_split == 0).sum())
    return missing, score - split.MISSING_PENALTY * all_missing


def quality_rows(ctx, name: str, counts: np.ndarray, trials: int) -> list:
    """Ours (optimise) against random search on the same counts: missing (class, split) pairs, and the score."""
    from bench.harness import timed

    cfg = split.SplitConfig(crops=ctx.work, out=ctx.work, trials=trials, seed=11)
    ours = split.optimise(counts, cfg.val_frac, cfg.test_frac, seed=cfg.seed, restarts=cfg.restarts)[0]
    theirs = split.search(counts, cfg)[0]
    (m_ours, s_ours), (m_theirs, s_theirs) = quality(counts, ours, cfg), quality(counts, theirs, cfg)
    t_ours = timed(lambda: split.optimise(counts, cfg.val_frac, cfg.test_frac, seed=cfg.seed), repeats=1, warmup=0)
    t_theirs = timed(lambda: split.search(counts, cfg), repeats=1, warmup=0)
    data = f"{name}: {counts.shape[0]} groups, {counts.shape[1]} classes; random search: {trials} trials"
    return [
        ctx.row(
            stage=STAGE,
            metric=f"{name} missing class-splits",
            unit="",
            ours=m_ours,
            alternative="random search (Microsoft's and TNC's method)",
            alternative_value=m_theirs,
            higher_is_better=False,
            input=f"{data}; (class, split) pairs with no crop, among classes seen at 3+ groups",
        ),
        ctx.row(
            stage=STAGE,
            metric=f"{name} score without penalties",
            unit="",
            ours=s_ours,
            alternative="random search",
            alternative_value=s_theirs,
            higher_is_better=False,
            input=f"{data}; sum over classes of |val share - {cfg.val_frac}| + |test share - {cfg.test_frac}|; "
            f"search seconds: ours {t_ours:.2f}, random {t_theirs:.2f}",
        ),
    ]


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
    """Quality on Missouri and a synthetic project; the random search's speed: 10,000 trials, 200 locations."""
    locations, classes, trials = (60, 10, 1000) if ctx.quick else (200, 20, 10_000)
    counts = synthetic_counts(locations, classes)
    rows = quality_rows(ctx, "synthetic", counts, trials)
    missouri = missouri_counts(ctx.research_data)
    if missouri is not None:
        rows += quality_rows(ctx, "Missouri", missouri, trials)
    cfg = split.SplitConfig(crops=ctx.work, out=ctx.work, trials=trials, seed=11)
    ours_result = split.search(counts, cfg)
    theirs_result = plain_search(counts, cfg)
    if not np.array_equal(ours_result[0], theirs_result[0]):
        raise AssertionError("the vectorised search chose a different split than the plain loop")
    ours, theirs = ctx_timed(ctx, lambda: split.search(counts, cfg), lambda: plain_search(counts, cfg))
    rows.append(
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
    )
    return rows


def ctx_timed(ctx, ours, theirs):
    """The plain loop takes minutes: time it fewer times."""
    from bench.harness import timed

    return timed(ours, repeats=ctx.repeats), timed(theirs, repeats=max(1, ctx.repeats // 3), warmup=0)
