"""Classification metrics from predicted probabilities, computed with numpy alone."""

from __future__ import annotations

import math

import numpy as np


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


def threshold_for_precision(y_true: np.ndarray, probs: np.ndarray, c: int, target: float) -> dict:
    """The lowest confidence threshold at which "predicted ``c`` with confidence >= t" reaches ``target`` precision.

    This is Animl's rule for a per-category threshold: a label is applied when it is the top prediction and its
    confidence reaches the category's threshold. The lowest qualifying threshold gives the most recall. When no
    threshold reaches the target, the one with the best precision is returned with ``met: false``; when the
    model never predicts ``c``, the threshold is 1.0.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    support = int((y_true == c).sum())
    chosen = probs.argmax(axis=1) == c
    conf = probs[chosen, c]
    hits = (y_true[chosen] == c).astype(np.float64)
    if len(conf) == 0:
        return {"threshold": 1.0, "precision": math.nan, "recall": 0.0, "support": support, "flagged": 0, "met": False}
    order = np.argsort(-conf, kind="stable")
    conf, hits = conf[order], hits[order]
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]  # a threshold keeps every item with the same confidence
    k = np.flatnonzero(last_of_tie)
    precision = np.cumsum(hits)[k] / (k + 1)
    met = precision >= target
    pick = k[np.flatnonzero(met)[-1]] if met.any() else k[np.flatnonzero(precision == precision.max())[-1]]
    tp = float(hits[: pick + 1].sum())
    return {
        "threshold": float(conf[pick]),
        "precision": float(tp / (pick + 1)),
        "recall": tp / support if support else math.nan,
        "support": support,
        "flagged": int(pick + 1),
        "met": bool(met.any()),
    }


def operating_points(y_true: np.ndarray, probs: np.ndarray, labels: list[str], invasive: list[str], target: float):
    """Per-invasive-class thresholds at ``target`` precision, and how often native animals get flagged invasive.

    Returns the per-class figures and, over test crops whose true class is native, the share flagged as any
    invasive class at these thresholds (and, for comparison, at plain top-1 with no threshold).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    pred, top = probs.argmax(axis=1), probs.max(axis=1)
    native = ~np.isin(y_true, [labels.index(x) for x in invasive])
    per_class, flagged, flagged_top1 = {}, np.zeros(len(y_true), bool), np.zeros(len(y_true), bool)
    for label in invasive:
        c = labels.index(label)
        point = threshold_for_precision(y_true, probs, c, target)
        hit = (pred == c) & (top >= point["threshold"])
        point["native_flagged"] = int((hit & native).sum())
        per_class[label] = point
        flagged |= hit
        flagged_top1 |= pred == c
    n_native = int(native.sum())

    def rate(mask: np.ndarray) -> float:
        return float((mask & native).sum() / n_native) if n_native and invasive else math.nan

    return {
        "target_precision": target,
        "invasive": list(invasive),
        "per_class": per_class,
        "native_crops": n_native,
        "native_flagged": int((flagged & native).sum()),
        "native_flagged_rate": rate(flagged),
        "native_flagged_rate_top1": rate(flagged_top1),
    }
