"""The evaluation as pictures: confusion matrix, per-class bars, reliability diagram, worst mistakes, one HTML page.

The page is self-contained (images inlined as data URIs), so it shows as it is in the Kubeflow UI (an HTML
output artifact) and in MLflow's artifact viewer. The figures are also written as PNG files.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

PNG_FILES = {"confusion": "confusion_matrix.png", "per_class": "per_class.png", "reliability": "reliability.png"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def confusion_png(result: dict) -> bytes:
    """The confusion matrix, rows normalised to recall, with the counts written in the cells."""
    plt = _pyplot()
    labels, cm = result["labels"], np.asarray(result["confusion_matrix"], dtype=float)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(labels) <= 30:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j]:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title("Confusion matrix (test set)")
    return _png(fig)


def per_class_png(result: dict) -> bytes:
    """Precision, recall and F1 of every class, side by side."""
    plt = _pyplot()
    labels = result["labels"]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) + 2), 4))
    for offset, key in ((-0.27, "precision"), (0.0, "recall"), (0.27, "f1")):
        values = [result["per_class"][label][key] for label in labels]
        ax.bar(x + offset, np.nan_to_num(values), width=0.27, label=key)
    ticks = [f"{label}\n(n={result['per_class'][label]['support']})" for label in labels]
    ax.set_xticks(x, ticks, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.axhline(result["macro_f1"], color="grey", ls="--", lw=1, label=f"macro-F1 {result['macro_f1']:.3f}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Per-class precision, recall and F1 (test set)")
    return _png(fig)


def reliability_png(calib: dict) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, with the bins' counts below."""
    plt = _pyplot()
    bins = calib["bins"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 5.5), height_ratios=[3, 1], sharex=True)
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    ax.bar(centres, [b["accuracy"] if b["count"] else 0 for b in bins], width=width * 0.95, label="accuracy")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Reliability (ECE {calib['ece']:.3f})")
    ax2.bar(centres, [b["count"] for b in bins], width=width * 0.95, color="tab:grey")
    ax2.set_xlabel("top-1 confidence")
    ax2.set_ylabel("crops")
    ax2.set_xlim(0, 1)
    return _png(fig)


def worst_mistakes(
    crops: list[Path], y_true: np.ndarray, probs: np.ndarray, labels: list[str], n: int
) -> list[dict[str, object]]:
    """The ``n`` most confident wrong predictions: crop path, true and predicted label, confidence."""
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(pred != y_true)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:n]
    return [
        {
            "crop": str(crops[i]),
            "true": labels[y_true[i]],
            "predicted": labels[pred[i]],
            "confidence": float(conf[i]),
            "true_probability": float(probs[i, y_true[i]]),
        }
        for i in wrong
    ]


def _data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def _thumbnail(path: Path, side: int = 160) -> str:
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return _data_uri(buf.getvalue(), "jpeg")


def _fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.warn{color:#a40000;font-weight:600}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px;font-size:12px;border:1px solid #ddd;padding:4px}
.card img{width:160px;height:160px;object-fit:contain;background:#000}.figs img{max-width:100%;margin:6px 0}
"""


def render(
    title: str,
    result: dict,
    calib: dict,
    ops: dict,
    mistakes: list[dict],
    figures: dict[str, bytes],
    facts: dict[str, str],
) -> str:
    """The whole report as one HTML page."""
    k = next(key for key in result if key.startswith("top") and key != "top1")
    rows = [
        "<tr><th>test crops</th><th>top-1</th><th>" + k + "</th><th>macro-F1</th><th>ECE</th></tr>",
        f"<tr><td>{result['n']}</td><td>{_fmt(result['top1'])}</td><td>{_fmt(result[k])}</td>"
        f"<td>{_fmt(result['macro_f1'])}</td><td>{_fmt(calib['ece'])}</td></tr>",
    ]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<p>" + " · ".join(f"{html.escape(a)}: <code>{html.escape(b)}</code>" for a, b in facts.items()) + "</p>",
        "<table>" + "".join(rows) + "</table>",
        _operating_points_html(ops),
        "<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>",
    ]
    for label, m in result["per_class"].items():
        parts.append(
            f"<tr><td>{html.escape(label)}</td><td>{_fmt(m['precision'])}</td><td>{_fmt(m['recall'])}</td>"
            f"<td>{_fmt(m['f1'])}</td><td>{m['support']}</td></tr>"
        )
    parts.append("</table><div class='figs'>")
    parts += [f"<img alt='{name}' src='{_data_uri(png)}'>" for name, png in figures.items()]
    parts.append("</div><h2>Most confident mistakes</h2>")
    if not mistakes:
        parts.append("<p>No test crop was misclassified.</p>")
    parts.append("<div class='gallery'>")
    for m in mistakes:
        parts.append(
            f"<div class='card'><img alt='crop' src='{_thumbnail(Path(str(m['crop'])))}'><br>"
            f"true <b>{html.escape(str(m['true']))}</b><br>predicted <b>{html.escape(str(m['predicted']))}</b> "
            f"({float(m['confidence']):.2f})<br>p(true) {float(m['true_probability']):.2f}</div>"
        )
    parts.append("</div></body></html>")
    return "\n".join(parts)


def _operating_points_html(ops: dict) -> str:
    if not ops["invasive"]:
        return "<h2>Operating points</h2><p>The label spec marks no class as invasive.</p>"
    target, floor = ops["target_precision"], ops.get("recall_floor", 0.0)
    out = [
        f"<h2>Operating points (target precision {target:.2f}{f', recall floor {floor:.2f}' if floor else ''})</h2>",
        f"<p>Thresholds are chosen on {html.escape(str(ops.get('chosen_on', 'val')))} crops; precision and recall "
        "below are measured on the test crops.</p>",
        "<table><tr><th>invasive class</th><th>threshold</th><th>test precision</th><th>test recall</th>"
        "<th>missed</th><th>support</th><th>natives flagged</th><th>target met</th></tr>",
    ]
    for label, p in ops["per_class"].items():
        met = "yes" if p["met"] else "<span class='warn'>no</span>"
        recall = _fmt(p["recall"])
        if p["support"] and p["recall"] is not None and p["recall"] < 0.5:
            recall = f"<span class='warn'>{recall}</span>"
        out.append(
            f"<tr><td>{html.escape(label)}</td><td>{_fmt(p['threshold'])}</td><td>{_fmt(p['precision'])}</td>"
            f"<td>{recall}</td><td>{p.get('missed', '')}</td><td>{p['support']}</td><td>{p['native_flagged']}</td>"
            f"<td>{met}</td></tr>"
        )
    out.append("</table>")
    out.append(
        f"<p>Native animals flagged as invasive: <b>{_fmt(ops['native_flagged_rate'], 4)}</b> of "
        f"{ops['native_crops']} native test crops at these thresholds "
        f"(top-1 without thresholds: {_fmt(ops['native_flagged_rate_top1'], 4)}).</p>"
    )
    return "\n".join(out)
