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
