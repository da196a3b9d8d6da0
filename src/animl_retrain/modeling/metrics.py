"""Classification metrics from predicted probabilities, computed with numpy alone."""

from __future__ import annotations

import math

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, C)`` logits, stable for large values."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """``(n, n)`` counts: rows are true classes, columns predicted classes."""
    return np.bincount(np.asarray(y_true) * n + np.asarray(y_pred), minlength=n * n).reshape(n, n)


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` most probable."""
    if len(y_true) == 0:
        return math.nan
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(y_true)[:, None]).any(axis=1).mean())


def classification_report(y_true: np.ndarray, probs: np.ndarray, labels: list[str], k: int = 3) -> dict:
    """Top-1, top-k, per-class precision/recall/F1/support, macro and weighted F1, and the confusion matrix.

    Macro averages run over classes present in ``y_true`` (a class absent from the test set has no recall).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    n = len(labels)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(precision + np.nan_to_num(recall) > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(support > 0, f1, np.nan)
    present = support > 0
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return {
        "n": len(y_true),
        "top1": top_k_accuracy(y_true, probs, 1),
        f"top{k}": top_k_accuracy(y_true, probs, k),
        "macro_f1": float(np.nanmean(f1[present])) if present.any() else math.nan,
        "macro_recall": float(np.nanmean(recall[present])) if present.any() else math.nan,
        "macro_precision": float(precision[present].mean()) if present.any() else math.nan,
        "weighted_f1": float(np.nansum(f1 * support) / support.sum()) if support.sum() else math.nan,
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": cm.tolist(),
    }


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error of the top-1 confidence, and the reliability diagram's bins.

    Confidences fall in ``bins`` equal-width bins; ECE is the count-weighted mean of each bin's
    ``|accuracy - mean confidence|``. A model that says 0.9 should be right 9 times in 10.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    if len(y_true) == 0:
        return {"ece": math.nan, "bins": []}
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else math.nan
        mean_conf = float(conf[mask].mean()) if n else math.nan
        if n:
            ece += n / len(y_true) * abs(acc - mean_conf)
        out.append({"lower": b / bins, "upper": (b + 1) / bins, "count": n, "accuracy": acc, "confidence": mean_conf})
    return {"ece": float(ece), "bins": out}


def threshold_for_precision(
    y_true: np.ndarray, probs: np.ndarray, c: int, target: float, recall_floor: float = 0.0
) -> dict:
    """The lowest confidence threshold at which "predicted ``c`` with confidence >= t" reaches ``target`` precision.

    This is Animl's rule for a per-category threshold: a label is applied when it is the top prediction and its
    confidence reaches the category's threshold. The lowest qualifying threshold gives the most recall.

    ``recall_floor`` bounds how far a threshold may cut recall: when the target precision is reached only below
    the floor (or never), the threshold is the highest one that keeps recall at the floor or above, with the best
    precision among those, and ``met`` is false. When no threshold reaches the target, the one with the best
    precision is returned with ``met: false``; when the model never predicts ``c``, the threshold is 1.0.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    support = int((y_true == c).sum())
    chosen = probs.argmax(axis=1) == c
    conf = probs[chosen, c]
    hits = (y_true[chosen] == c).astype(np.float64)
    if len(conf) == 0:
        return {
            "threshold": 1.0,
            "precision": math.nan,
            "recall": 0.0,
            "support": support,
            "flagged": 0,
            "met": False,
            "floor_binding": False,
        }
    order = np.argsort(-conf, kind="stable")
    conf, hits = conf[order], hits[order]
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]  # a threshold keeps every item with the same confidence
    k = np.flatnonzero(last_of_tie)
    tp = np.cumsum(hits)[k]
    precision = tp / (k + 1)
    recall = tp / support if support else np.zeros(len(k))
    allowed = recall >= recall_floor - 1e-12
    if not allowed.any():  # even the lowest threshold misses the floor: keep every prediction of c
        allowed[-1] = True
    met = (precision >= target) & allowed
    if met.any():
        pick = k[np.flatnonzero(met)[-1]]
    else:
        best = precision[allowed].max()
        pick = k[np.flatnonzero(allowed & (precision == best))[0]]
    tp_pick = float(hits[: pick + 1].sum())
    return {
        "threshold": float(conf[pick]),
        "precision": float(tp_pick / (pick + 1)),
        "recall": tp_pick / support if support else math.nan,
        "support": support,
        "flagged": int(pick + 1),
        "met": bool(met.any()),
        "floor_binding": bool(recall_floor > 0 and (precision >= target).any() and not met.any()),
    }


def at_threshold(y_true: np.ndarray, probs: np.ndarray, c: int, threshold: float) -> dict:
    """Precision, recall and counts of "predicted ``c`` with confidence >= ``threshold``" on other crops."""
    y_true = np.asarray(y_true, dtype=np.int64)
    hit = (probs.argmax(axis=1) == c) & (probs[:, c] >= threshold) if len(probs) else np.zeros(0, bool)
    support, flagged = int((y_true == c).sum()), int(hit.sum())
    tp = int((hit & (y_true == c)).sum())
    return {
        "precision": tp / flagged if flagged else math.nan,
        "recall": tp / support if support else math.nan,
        "support": support,
        "flagged": flagged,
        "missed": support - tp,
    }


def operating_points(
    y_true: np.ndarray,
    probs: np.ndarray,
    labels: list[str],
    invasive: list[str],
    target: float,
    recall_floor: float = 0.0,
    held_out: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Per-invasive-class thresholds chosen on ``(y_true, probs)``, and what they do on ``held_out`` crops.

    Thresholds are chosen on validation crops (``y_true``, ``probs``) at ``target`` precision subject to
    ``recall_floor``; ``held_out`` (test targets and probabilities) is where their precision and recall, and the
    share of native animals flagged as any invasive class (and, for comparison, at plain top-1), are reported.
    Without ``held_out`` the figures are reported on the crops the thresholds were chosen on.
    """
    test_y, test_p = held_out if held_out is not None else (y_true, probs)
    test_y = np.asarray(test_y, dtype=np.int64)
    pred, top = (test_p.argmax(axis=1), test_p.max(axis=1)) if len(test_p) else (np.zeros(0, int), np.zeros(0))
    native = ~np.isin(test_y, [labels.index(x) for x in invasive])
    per_class, flagged, flagged_top1 = {}, np.zeros(len(test_y), bool), np.zeros(len(test_y), bool)
    for label in invasive:
        c = labels.index(label)
        chosen = threshold_for_precision(y_true, probs, c, target, recall_floor)
        hit = (pred == c) & (top >= chosen["threshold"])
        per_class[label] = {
            "threshold": chosen["threshold"],
            "met": chosen["met"],
            "floor_binding": chosen["floor_binding"],
            "chosen_on": {k: chosen[k] for k in ("precision", "recall", "support", "flagged")},
            **at_threshold(test_y, test_p, c, chosen["threshold"]),
            "native_flagged": int((hit & native).sum()),
        }
        flagged |= hit
        flagged_top1 |= pred == c
    n_native = int(native.sum())

    def rate(mask: np.ndarray) -> float:
        return float((mask & native).sum() / n_native) if n_native and invasive else math.nan

    return {
        "target_precision": target,
        "recall_floor": recall_floor,
        "chosen_on": "val" if held_out is not None else "the same crops",
        "invasive": list(invasive),
        "per_class": per_class,
        "native_crops": n_native,
        "native_flagged": int((flagged & native).sum()),
        "native_flagged_rate": rate(flagged),
        "native_flagged_rate_top1": rate(flagged_top1),
    }


def _macro_f1_top1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Macro-F1 (over classes with support) and top-1 of a stack of confusion matrices ``(B, C, C)``."""
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        present = support > 0
        macro = np.where(present.any(axis=1), (f1 * present).sum(axis=1) / present.sum(axis=1), np.nan)
        top1 = tp.sum(axis=1) / cm.sum(axis=(1, 2))
    return macro, top1


def bootstrap(
    groups: np.ndarray,
    y_true: np.ndarray,
    probs: np.ndarray,
    other: np.ndarray | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Confidence intervals of macro-F1 and top-1 by resampling whole groups (locations) with replacement.

    Crops of one location are not independent (same background, same animals, burst frames), so the unit of
    resampling is the location, as the split's unit is. With ``other`` (another model's probabilities on the same
    crops), the intervals of the paired difference ``ours - other`` come too: each resample scores both models on
    the same locations, so the noise of the test set largely cancels.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    n = probs.shape[1]
    codes, inverse = np.unique(np.asarray(groups), return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(codes), size=(resamples, len(codes)))
    weights = np.stack([np.bincount(d, minlength=len(codes)) for d in draws]).astype(np.float64)  # (B, L)

    def per_group(p: np.ndarray) -> np.ndarray:  # (L, C*C) confusion counts of each group
        cells = inverse * n * n + y_true * n + p.argmax(axis=1)
        return np.bincount(cells, minlength=len(codes) * n * n).reshape(len(codes), n * n).astype(np.float64)

    def scores(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _macro_f1_top1((weights @ per_group(p)).reshape(resamples, n, n))

    alpha = (1 - level) / 2

    def interval(values: np.ndarray) -> list[float]:
        values = values[np.isfinite(values)]
        if not len(values):
            return [math.nan, math.nan]
        return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]

    ours = scores(probs)
    out = {
        "level": level,
        "resamples": resamples,
        "unit": "location",
        "groups": len(codes),
        "macro_f1": interval(ours[0]),
        "top1": interval(ours[1]),
    }
    if other is not None:
        theirs = scores(other)
        out["difference"] = {"macro_f1": interval(ours[0] - theirs[0]), "top1": interval(ours[1] - theirs[1])}
    return out
