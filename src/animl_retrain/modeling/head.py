"""The classification head on its own: frozen-backbone features, a linear head fitted on them, a temperature.

The two-phase recipe of the train stage (:mod:`animl_retrain.modeling.training`) starts here. With a pretrained
backbone, a linear head fitted on the frozen features (a *linear probe*) is already a strong classifier on a few
hundred crops per class; fine-tuning then starts from it instead of from a random head, whose large early
gradients would otherwise wreck the pretrained features (LP-FT: Kumar et al., 2022, "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution").

- :func:`features`: global-pooled backbone features of a decoded crop array, computed once per crop (and once
  for its mirror image), so that fitting the head takes seconds.
- :func:`choose_head`: multinomial logistic regression on standardised features, fitted by L-BFGS for each
  strength in :data:`L2_GRID`; the strength is chosen on the validation crops (macro-F1, then log-loss).
- :func:`fit_temperature` / :func:`fold_temperature`: temperature scaling (Guo et al., 2017), fitted on the
  validation crops and folded into the head's weights, so every consumer of the model (evaluation, the MLflow
  model, TorchScript/ONNX serving, predict) gets calibrated probabilities without knowing a temperature exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from animl_retrain.modeling import transforms
from animl_retrain.modeling.backbones import head_layer, swap_head
from animl_retrain.modeling.metrics import classification_report
from animl_retrain.vision.preprocessing import Preprocessing

# Strengths of the head's L2 penalty (on standardised features, mean cross-entropy): weak to strong.
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
LBFGS_ITERATIONS = 300


@dataclass
class HeadFit:
    """A fitted linear head (``logits = x @ weight.T + bias``) and how it was chosen."""

    weight: object  # torch.Tensor (classes, features)
    bias: object  # torch.Tensor (classes,)
    l2: float
    val: dict[str, float]
    grid: list[dict[str, float]] = field(default_factory=list)


def features(model, arch: str, array: np.ndarray, preprocessing: Preprocessing, device, flip: bool = False):
    """Backbone features ``(N, D)`` of a uint8 crop array ``(N, H, W, 3)`` (mirrored when ``flip``), in eval mode.

    The head is swapped for an identity while the backbone runs, so these are exactly the inputs it receives.
    """
    import torch
    from torch import nn

    head = swap_head(model, arch, nn.Identity())
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(array), 64):
                x = torch.from_numpy(np.array(array[start : start + 64])).permute(0, 3, 1, 2)
                x = transforms.normalise(preprocessing, x.to(device))
                out.append(model(x.flip(-1) if flip else x).float().cpu())
    finally:
        swap_head(model, arch, head)
    return torch.cat(out) if out else torch.zeros((0, head.in_features))


def fit_linear(x, y, n_classes: int, l2: float, class_weight=None):
    """Multinomial logistic regression by L-BFGS: ``(weight (C, D), bias (C,))`` minimising mean CE + l2·|W|²."""
    import torch
    import torch.nn.functional as F

    w = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=LBFGS_ITERATIONS, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y, weight=class_weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def choose_head(train_x, train_y, val_x, val_y, labels: list[str], class_weight=None) -> HeadFit:
    """The head with the best val macro-F1 (ties: lower val log-loss) over :data:`L2_GRID`, in raw feature units.

    Features are standardised with the training mean and spread for the fit (so one grid suits every backbone);
    the standardisation is then folded into the weights, so the head applies to the backbone's own features.
    """
    import torch

    y = torch.as_tensor(train_y, dtype=torch.long)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    z_train, z_val = (train_x - mean) / std, (val_x - mean) / std
    best, grid = None, []
    for l2 in L2_GRID:
        w, b = fit_linear(z_train, y, len(labels), l2, class_weight)
        probs = torch.softmax(z_val @ w.T + b, dim=1).numpy()
        scores = _scores(probs, np.asarray(val_y), labels)
        grid.append({"l2": l2, **scores})
        key = (scores["val_macro_f1"], -scores["val_loss"])
        if best is None or key > best[0]:
            best = (key, l2, w, b, scores)
    _, l2, w, b = best[:4]
    weight = w / std
    bias = b - weight @ mean
    return HeadFit(weight=weight, bias=bias, l2=l2, val=best[4], grid=grid)


def _scores(probs: np.ndarray, targets: np.ndarray, labels: list[str]) -> dict[str, float]:
    nll = float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())
    report = classification_report(targets, probs, labels)
    return {"val_loss": nll, "val_top1": report["top1"], "val_macro_f1": report["macro_f1"]}


def set_head(model, arch: str, weight, bias) -> None:
    """Copy a fitted head into the model's final Linear layer."""
    import torch

    head = head_layer(model, arch)
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature ``T`` minimising the log-loss of ``softmax(logits / T)`` on held-out crops (T in [0.05, 20]).

    A one-dimensional convex problem in ``log T``, solved by golden-section search; 1.0 when there is nothing to fit.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        return 1.0
    z = logits.astype(np.float64)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        return float((np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(targets)), targets]).mean())

    lo, hi = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


def fold_temperature(model, arch: str, temperature: float) -> None:
    """Divide the head's weights and bias by ``temperature``: the model then outputs ``logits / temperature``."""
    import torch

    head = head_layer(model, arch)
    with torch.no_grad():
        head.weight.div_(temperature)
        head.bias.div_(temperature)
