"""The training loop, in torchvision's reference shape: ``build_*`` helpers, ``train_one_epoch``, ``evaluate``, ``fit``.

Everything here works on tensors and the train stage's settings (``cfg``: a
:class:`~animl_retrain.stages.train.TrainConfig`, read by attribute); the stage wires it to its files, the
resume checkpoint (:mod:`animl_retrain.modeling.checkpoint`) and MLflow
(:mod:`animl_retrain.integrations.mlflow.tracking`). Batches and augmentations depend only on seed, epoch and
position (:mod:`animl_retrain.modeling.data`), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import layout, tables
from animl_retrain.modeling import transforms
from animl_retrain.modeling.backbones import build_model, head_layer, pretrained_normalisation
from animl_retrain.modeling.checkpoint import data_key
from animl_retrain.modeling.data import CropDataset, EpochSampler, decode_crops, make_loader
from animl_retrain.modeling.inference import pick_device, predict
from animl_retrain.modeling.metrics import classification_report
from animl_retrain.vision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

MONITOR_METRICS = ("val_macro_f1", "val_top1", "val_loss")


@dataclass
class Progress:
    """Where training stands; saved whole in every resume checkpoint."""

    epoch: int = 1  # the epoch in progress (1-based)
    step: int = 0  # optimiser steps done in it
    loss_sum: float = 0.0  # running training loss of the epoch in progress
    seen: int = 0
    seconds: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_state: dict[str, Any] | None = None
    # Patience counts epochs since fine-tuning last beat its own best, not the head-only model's (epoch 0): its
    # first epochs often score below the head on val before they overtake it. ``best`` still includes the head.
    tuned_best: float | None = None
    stale: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False
    stop_reason: str = ""
    head: dict[str, Any] = field(default_factory=dict)  # the head phase of the two-phase recipe ({} if none)
    temperature: float = 1.0


@dataclass
class Parts:
    """The model and everything that steps it."""

    model: Any
    criterion: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    amp_dtype: Any  # None: full precision
    freeze_norm: bool = False  # batch-norm layers keep their pretrained statistics while the weights train


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the step was not applied."""


def setup(seed: int, device: str):
    """Seed every generator, use every core, and resolve the device ('auto': CUDA when present)."""
    import torch

    seed_everything(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    return pick_device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_preprocessing(cfg) -> Preprocessing:
    """Input size and normalisation for this backbone and setting; stored with the model."""
    if cfg.normalisation == "none":
        return Preprocessing(image_size=cfg.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if cfg.normalisation == "imagenet":
        return Preprocessing(image_size=cfg.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    mean, std = pretrained_normalisation(cfg.arch)
    return Preprocessing(image_size=cfg.image_size, mean=tuple(mean), std=tuple(std))


def build_datasets(cfg, labels: list[str], preprocessing: Preprocessing, work: Path):
    """Decoded train and val datasets with their transforms, and the fingerprint of what they hold."""
    split = tables.read_table(Path(cfg.split) / layout.SPLIT_TABLE, tables.SPLIT)
    index = {label: i for i, label in enumerate(labels)}
    out, keys = {}, {}
    for name in ("train", "val"):
        rows = split[split["split"] == name]
        if rows.empty:
            raise PipelineError(f"train: the {name} split is empty; check the split stage's report")
        paths = [Path(cfg.crops) / layout.CROPS_DIR / c for c in rows["crop"]]
        array = decode_crops(paths, preprocessing.image_size, work / f"{name}.npy", workers=cfg.workers)
        transform = (
            transforms.train_transform(preprocessing, cfg.augmentation)
            if name == "train"
            else transforms.eval_transform(preprocessing)
        )
        out[name] = CropDataset(array, rows["label"].map(index).to_numpy(), transform)
        keys[name] = list(zip(rows["crop"], rows["label"], strict=True))
    return out["train"], out["val"], data_key(labels, keys["train"], keys["val"])


def class_weights(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, scaled so that a balanced set has weight 1 (0 for classes absent from training)."""
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)


def build_criterion_and_sampler(cfg, targets: np.ndarray, n_classes: int):
    """Loss and epoch sampler for the chosen class-imbalance treatment."""
    import torch

    inverse = class_weights(targets, n_classes)
    weight = torch.tensor(inverse, dtype=torch.float32) if cfg.balance == "loss" else None
    sampler = EpochSampler(len(targets), cfg.seed, inverse[targets] if cfg.balance == "sampler" else None)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing), sampler


def two_phase(cfg) -> bool:
    """Whether ``cfg`` trains with the two-phase recipe: 'auto' means yes for pretrained weights, no from scratch."""
    return cfg.recipe == "two-phase" or (cfg.recipe == "auto" and bool(cfg.weights))


def build_optimizer(model, cfg):
    """AdamW, or SGD with momentum; no weight decay on biases and normalisation layers.

    In the two-phase recipe the backbone learns at ``lr * backbone_lr_mult`` and the head at ``lr``: the head
    starts fitted, the pretrained features should move slowly.
    """
    import torch

    head = {id(p) for p in head_layer(model, cfg.arch).parameters()}
    backbone_lr = cfg.lr * (cfg.backbone_lr_mult if two_phase(cfg) else 1.0)
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head, p.ndim > 1), []).append(p)
    param_groups = [
        {
            "params": params,
            "lr": cfg.lr if is_head else backbone_lr,
            "weight_decay": cfg.weight_decay if decays else 0.0,
        }
        for (is_head, decays), params in sorted(groups.items())
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(param_groups, lr=cfg.lr)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier at ``step``: linear warm-up, then cosine decay, x0.1 steps at 60% and 85%, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(step - warmup, total - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "step":
        return 0.1 ** ((t >= 0.6) + (t >= 0.85))
    return 1.0


def build_scheduler(optimizer, cfg, steps_per_epoch: int):
    """Per-step LR schedule (see :func:`lr_factor`)."""
    import torch

    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.lr_schedule))


def build_amp(cfg, device):
    """Mixed-precision dtype (None for full precision) and the gradient scaler (active only for fp16)."""
    import torch

    if device.type != "cuda" or cfg.amp == "off":
        return None, torch.amp.GradScaler("cpu", enabled=False)
    bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float16
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


@dataclass
class Trainer:
    """The parts, the progress and the data of one training run, ready to :meth:`fit`."""

    cfg: Any
    parts: Parts
    progress: Progress
    sampler: EpochSampler
    train_loader: Any
    val_loader: Any
    preprocessing: Preprocessing
    device: Any
    labels: list[str]
    resumed_from: str = ""

    def fit(self, save: Callable[[], None], on_epoch: Callable[[dict[str, float], int], None], report: Report):
        """Epochs until the budget or the patience runs out; ``save()`` checkpoints, ``on_epoch`` logs each one."""
        cfg, progress = self.cfg, self.progress
        while not progress.finished:
            self.sampler.set_epoch(progress.epoch, progress.step * cfg.batch_size)
            start, before = time.perf_counter(), progress.seconds

            def on_step(start=start, before=before) -> None:
                if cfg.checkpoint_every_steps and progress.step % cfg.checkpoint_every_steps == 0:
                    progress.seconds = before + time.perf_counter() - start
                    save()

            try:
                train_one_epoch(self.parts, self.train_loader, self.preprocessing, self.device, progress, on_step)
            except NonFiniteLoss as e:
                report.problem("training stopped", f"epoch {progress.epoch}", f"{e}; keeping the best epoch so far")
                progress.finished, progress.stop_reason = True, f"non-finite loss: {e}"
                save()
                break
            progress.seconds = before + time.perf_counter() - start
            val = evaluate(self.parts.model, self.val_loader, self.preprocessing, self.device, self.labels)
            epoch = progress.epoch
            metrics = end_epoch(progress, val, cfg, self.parts.model, self.parts.scheduler.get_last_lr()[0])
            save()
            on_epoch(metrics, epoch)
        log.info("train: stopped: %s; best epoch %d", progress.stop_reason, progress.best_epoch)

    def fit_head(self, train_ds: CropDataset, val_ds: CropDataset) -> dict[str, Any]:
        """Phase 1 of the two-phase recipe: fit the head on frozen features; it is the model to beat.

        Features of every training crop and its mirror image are computed once; the head's L2 strength is chosen
        on val (:func:`animl_retrain.modeling.head.choose_head`). The head-only model becomes epoch 0: fine-tuning
        must beat its val score, or the head-only model is what training returns.
        """
        import torch

        from animl_retrain.modeling import head

        cfg, model, start = self.cfg, self.parts.model, time.perf_counter()
        train_x = torch.cat(
            [head.features(model, cfg.arch, train_ds.array, self.preprocessing, self.device, flip) for flip in (0, 1)]
        )
        val_x = head.features(model, cfg.arch, val_ds.array, self.preprocessing, self.device)
        targets = np.concatenate([train_ds.targets, train_ds.targets])
        weight = self.parts.criterion.weight
        weight = None if weight is None else weight.cpu()
        fit = head.choose_head(train_x, targets, val_x, val_ds.targets, self.labels, weight)
        head.set_head(model, cfg.arch, fit.weight, fit.bias)
        seconds = time.perf_counter() - start
        progress = self.progress
        progress.head = {"l2": fit.l2, "seconds": seconds, **fit.val, "grid": fit.grid}
        progress.best, progress.best_epoch, progress.best_metrics = fit.val[cfg.monitor], 0, dict(fit.val)
        progress.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        log.info(
            "train: head on frozen features (l2 %g): val_top1 %.3f val_macro_f1 %.3f (%.1fs)",
            fit.l2,
            fit.val["val_top1"],
            fit.val["val_macro_f1"],
            seconds,
        )
        return {**fit.val, "epoch_seconds": seconds}

    def calibrate(self) -> dict[str, float]:
        """Fit a temperature on val and fold it into the head of the best model (call after :meth:`best_model`)."""
        from animl_retrain.modeling import head
        from animl_retrain.modeling.inference import predict_logits
        from animl_retrain.modeling.metrics import calibration, softmax

        logits, targets = predict_logits(self.parts.model, self.val_loader, self.preprocessing, self.device)
        temperature = head.fit_temperature(logits, targets)
        head.fold_temperature(self.parts.model, self.cfg.arch, temperature)
        self.progress.temperature = temperature
        before = calibration(targets, softmax(logits))["ece"]
        after = calibration(targets, softmax(logits / temperature))["ece"]
        log.info("train: temperature %.3f fitted on val (ECE %.3f -> %.3f)", temperature, before, after)
        return {"temperature": temperature, "val_ece_before_temperature": before, "val_ece": after}

    def best_model(self):
        """The model with the best epoch's weights; an error when the monitored metric never was a number."""
        if self.progress.best_state is None:
            raise PipelineError(f"train: {self.cfg.monitor} was never a number; the run learned nothing usable")
        self.parts.model.load_state_dict(self.progress.best_state)
        return self.parts.model


def build_trainer(cfg, train_ds: CropDataset, val_ds: CropDataset, labels, preprocessing, device, state) -> Trainer:
    """Model, loss, sampler, loaders, optimiser, schedule and AMP for ``cfg``; restored from ``state`` if given."""
    import torch

    from animl_retrain.modeling.checkpoint import restore

    criterion, sampler = build_criterion_and_sampler(cfg, train_ds.targets, len(labels))
    drop_last = len(train_ds) > cfg.batch_size
    train_loader = make_loader(
        train_ds, cfg.batch_size, cfg.workers, sampler=sampler, seed=cfg.seed, drop_last=drop_last
    )
    val_loader = make_loader(val_ds, cfg.batch_size * 2, cfg.workers)
    steps_per_epoch = len(train_ds) // cfg.batch_size if drop_last else 1
    model = build_model(cfg.arch, len(labels), cfg.weights if state is None else "").to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    amp_dtype, scaler = build_amp(cfg, device)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    freeze = two_phase(cfg) and cfg.freeze_bn_stats
    parts = Parts(model, criterion.to(device), optimizer, scheduler, scaler, amp_dtype, freeze)
    progress = restore(state, parts) if state is not None else Progress()
    resumed_from = f"epoch {progress.epoch} step {progress.step}" if state is not None else ""
    return Trainer(cfg, parts, progress, sampler, train_loader, val_loader, preprocessing, device, labels, resumed_from)


def train_one_epoch(parts: Parts, loader, preprocessing, device, progress: Progress, on_step) -> None:
    """Train over ``loader`` (the rest of the epoch), updating ``progress``; ``on_step()`` runs after each step.

    A NaN or infinite loss stops the epoch *before* its gradient is applied, so the weights stay usable.
    """
    import torch

    parts.model.train()
    if parts.freeze_norm:
        for m in parts.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    channels_last = device.type == "cuda"
    for x, y in loader:
        x = transforms.normalise(preprocessing, x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
            loss = parts.criterion(parts.model(x), y)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss {value} at epoch {progress.epoch} step {progress.step + 1}")
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.scheduler.step()
        progress.step += 1
        progress.loss_sum += value * len(y)
        progress.seen += len(y)
        on_step()


def evaluate(model, loader, preprocessing, device, labels: list[str]) -> dict[str, float]:
    """Validation loss, top-1 and macro-F1."""
    probs, targets = predict(model, loader, preprocessing, device)
    nll = float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())
    report = classification_report(targets, probs, labels)
    return {"val_loss": nll, "val_top1": report["top1"], "val_macro_f1": report["macro_f1"]}


def improved(metric: str, value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` by more than ``min_delta`` (NaN never does)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best - min_delta if metric == "val_loss" else value > best + min_delta


def end_epoch(progress: Progress, val: dict[str, float], cfg, model, lr: float) -> dict[str, float]:
    """Record the finished epoch, keep a detached copy of the best weights, decide whether to stop."""
    metrics = {
        "train_loss": progress.loss_sum / max(progress.seen, 1),
        **val,
        "lr": lr,
        "epoch_seconds": progress.seconds,
        "train_images_per_second": progress.seen / max(progress.seconds, 1e-9),
    }
    progress.history.append(metrics)
    if improved(cfg.monitor, val[cfg.monitor], progress.best, cfg.min_delta):
        progress.best, progress.best_epoch = val[cfg.monitor], progress.epoch
        progress.best_metrics = dict(val)
        progress.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if improved(cfg.monitor, val[cfg.monitor], progress.tuned_best, cfg.min_delta):
        progress.tuned_best, progress.stale = val[cfg.monitor], 0
    else:
        progress.stale += 1
        if progress.stale >= cfg.patience:
            progress.finished = True
            progress.stop_reason = f"no {cfg.monitor} improvement in {progress.stale} epochs"
    log.info(
        "train: epoch %d/%d loss %.4f val_top1 %.3f val_macro_f1 %.3f (%.1fs)",
        progress.epoch,
        cfg.epochs,
        metrics["train_loss"],
        val["val_top1"],
        val["val_macro_f1"],
        progress.seconds,
    )
    progress.epoch += 1
    progress.step, progress.loss_sum, progress.seen, progress.seconds = 0, 0.0, 0, 0.0
    if progress.epoch > cfg.epochs and not progress.finished:
        progress.finished, progress.stop_reason = True, f"reached {cfg.epochs} epochs"
    return metrics
