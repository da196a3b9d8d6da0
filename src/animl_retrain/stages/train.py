"""Stage 6, train: fine-tune a classifier on the train split, select the epoch on val, survive preemption.

Shaped like torchvision's reference script: ``build_*`` helpers, ``train_one_epoch``, ``evaluate`` and ``run``.
Parameters, per-epoch curves, system metrics, the label index and the preprocessing go to MLflow; the best
epoch's weights go to ``model.pt``, a checkpoint that carries its architecture, labels and preprocessing.

With ``checkpoint_uri`` set, a resume checkpoint is written after every epoch (and every
``checkpoint_every_steps`` steps); a run killed at any point and started again with the same settings
continues from the last checkpoint, in the same MLflow run, and ends with the same weights and metrics as a run
that was never interrupted (batches and augmentations depend only on seed, epoch and position; see
:mod:`animl_retrain.modeling.data` and :mod:`animl_retrain.modeling.checkpoint`).
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from animl_retrain.config import StageConfig
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json, write_json
from animl_retrain.core.logging import log, redact_url
from animl_retrain.core.report import Report
from animl_retrain.formats import layout, tables
from animl_retrain.integrations.mlflow import tracking
from animl_retrain.modeling import checkpoint as resume
from animl_retrain.modeling.backbones import ARCHITECTURES, build_model, pretrained_normalisation, save_checkpoint
from animl_retrain.modeling.data import CropDataset, EpochSampler, decode_crops, make_loader
from animl_retrain.modeling.inference import pick_device, predict
from animl_retrain.modeling.metrics import classification_report
from animl_retrain.vision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

MONITOR_METRICS = ("val_macro_f1", "val_top1", "val_loss")


class TrainConfig(StageConfig):
    """Settings of the train stage."""

    crops: Path = Field(description="output folder of the crop stage")
    split: Path = Field(description="output folder of the split stage")
    out: Path = Field(description="output folder for the checkpoint")
    arch: str = Field("efficientnet_b0", description=f"backbone: one of {', '.join(ARCHITECTURES)}")
    weights: str = Field("", description="initial weights: '' (random), 'imagenet' (download), or a path/s3:// URI")
    image_size: int = Field(224, ge=16, le=1024, description="model input size in pixels")
    normalisation: Literal["backbone", "imagenet", "none"] = Field(
        "backbone",
        description="input normalisation: the backbone's pretraining statistics, ImageNet's, or none (pixels/255)",
    )
    epochs: int = Field(10, ge=1, le=1000, description="maximum number of epochs")
    batch_size: int = Field(32, ge=1, le=4096, description="images per step")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with momentum")
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (0 = plain SGD)")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    lr_schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="learning-rate schedule")
    warmup_epochs: float = Field(0.0, ge=0, le=100, description="linear LR warm-up, in epochs")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    balance: Literal["sampler", "loss", "none"] = Field(
        "loss", description="class imbalance: a balanced sampler, inverse-frequency loss weights, or nothing"
    )
    augmentation: Literal["camera-trap", "none"] = Field("camera-trap", description="training augmentation")
    monitor: Literal["val_macro_f1", "val_top1", "val_loss"] = Field(
        "val_macro_f1", description="early-stopping metric"
    )
    patience: int = Field(5, ge=1, description="stop after this many epochs without improvement")
    min_delta: float = Field(0.0, ge=0, description="smallest change of the monitored metric that counts")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="mixed precision on GPU: auto (bf16 where supported, else fp16 with loss scaling)"
    )
    seed: int = Field(0, description="random seed")
    workers: int = Field(2, ge=0, le=64, description="data-loader worker processes")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'")
    checkpoint_uri: str = Field(
        "",
        description="folder or s3:// prefix for resume checkpoints ('' = none); inside a pipeline run "
        "'<kfp_run_id>/train' is appended, so a retried task resumes and a new run starts afresh",
    )
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every N steps (0 = once per epoch)")
    log_system_metrics: bool = Field(True, description="log CPU/GPU/memory use to MLflow (needs psutil)")
    experiment: str = Field("animl-classifier", description="MLflow experiment name")
    run_name: str = Field("", description="MLflow run name (default: MLflow's)")
    kfp_run_id: str = Field("", description="Kubeflow run id, recorded as an MLflow tag")


class TrainResult(BaseModel):
    """What the train stage produced."""

    mlflow_run_id: str
    best_epoch: int
    best: dict[str, float]
    epochs_run: int
    resumed_from: str = ""


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
    stale: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    finished: bool = False
    stop_reason: str = ""


@dataclass
class Parts:
    """The model and everything that steps it."""

    model: Any
    criterion: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    amp_dtype: Any  # None: full precision


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the step was not applied."""


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_preprocessing(cfg: TrainConfig) -> Preprocessing:
    """Input size and normalisation for this backbone and setting; stored with the model."""
    if cfg.normalisation == "none":
        return Preprocessing(image_size=cfg.image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if cfg.normalisation == "imagenet":
        return Preprocessing(image_size=cfg.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    mean, std = pretrained_normalisation(cfg.arch)
    return Preprocessing(image_size=cfg.image_size, mean=tuple(mean), std=tuple(std))


def build_datasets(cfg: TrainConfig, labels: list[str], preprocessing: Preprocessing, work: Path):
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
            preprocessing.train_transform(cfg.augmentation) if name == "train" else preprocessing.eval_transform()
        )
        out[name] = CropDataset(array, rows["label"].map(index).to_numpy(), transform)
        keys[name] = list(zip(rows["crop"], rows["label"], strict=True))
    return out["train"], out["val"], resume.data_key(labels, keys["train"], keys["val"])


def class_weights(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, scaled so that a balanced set has weight 1 (0 for classes absent from training)."""
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)


def build_criterion_and_sampler(cfg: TrainConfig, targets: np.ndarray, n_classes: int):
    """Loss and epoch sampler for the chosen class-imbalance treatment."""
    import torch

    inverse = class_weights(targets, n_classes)
    weight = torch.tensor(inverse, dtype=torch.float32) if cfg.balance == "loss" else None
    sampler = EpochSampler(len(targets), cfg.seed, inverse[targets] if cfg.balance == "sampler" else None)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing), sampler


def build_optimizer(model, cfg: TrainConfig):
    """AdamW, or SGD with momentum; no weight decay on biases and normalisation layers."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


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


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step LR schedule (see :func:`lr_factor`)."""
    import torch

    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.lr_schedule))


def build_amp(cfg: TrainConfig, device):
    """Mixed-precision dtype (None for full precision) and the gradient scaler (active only for fp16)."""
    import torch

    if device.type != "cuda" or cfg.amp == "off":
        return None, torch.amp.GradScaler("cpu", enabled=False)
    bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float16
    return dtype, torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


def train_one_epoch(parts: Parts, loader, preprocessing, device, progress: Progress, on_step) -> None:
    """Train over ``loader`` (the rest of the epoch), updating ``progress``; ``on_step()`` runs after each step.

    A NaN or infinite loss stops the epoch *before* its gradient is applied, so the weights stay usable.
    """
    import torch

    parts.model.train()
    channels_last = device.type == "cuda"
    for x, y in loader:
        x = preprocessing.normalise(x.to(device, non_blocking=True))
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


def end_epoch(progress: Progress, val: dict[str, float], cfg: TrainConfig, model, lr: float) -> dict[str, float]:
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
        progress.best, progress.best_epoch, progress.stale = val[cfg.monitor], progress.epoch, 0
        progress.best_metrics = dict(val)
        progress.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
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


def snapshot(parts: Parts, progress: Progress, settings: dict, data: str, run_id: str) -> dict[str, Any]:
    """Everything a resumed run needs (see :mod:`animl_retrain.modeling.checkpoint`)."""
    import torch

    return {
        "settings": settings,
        "data": data,
        "mlflow_run_id": run_id,
        "epoch": progress.epoch,
        "step": progress.step,
        "finished": progress.finished,
        "progress": {k: v for k, v in progress.__dict__.items() if k != "best_state"},
        "best_state": progress.best_state,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore(state: dict[str, Any], parts: Parts) -> Progress:
    """Load a resume checkpoint into ``parts``; returns its progress."""
    import torch

    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    progress = Progress(**state["progress"])
    progress.best_state = state["best_state"]
    return progress


def _start_mlflow(cfg: TrainConfig, store: resume.ResumeStore | None, state: dict | None):
    """Start (or re-open, after preemption) the run; returns it and whether it was re-opened."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_experiment(cfg.experiment)
    run_id = (state or {}).get("mlflow_run_id") or (store.run_id() if store else None)
    system = cfg.log_system_metrics and _have_psutil()
    try:
        active = mlflow.start_run(
            run_id=run_id, run_name=None if run_id else cfg.run_name or None, log_system_metrics=system
        )
    except MlflowException as e:
        raise PipelineError(
            f"train: cannot re-open MLflow run {run_id} recorded at {cfg.checkpoint_uri} ({e}); "
            "is MLFLOW_TRACKING_URI the server it was created on?"
        ) from e
    if store is not None and run_id is None:
        store.write_run_id(active.info.run_id)
    return active, run_id is not None


def _have_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        log.warning("train: psutil is not installed; MLflow system metrics are off")
        return False
    return True


def _log_run_start(cfg: TrainConfig, sizes: dict[str, int], index: dict, preprocessing: Preprocessing) -> None:
    import mlflow

    mlflow.set_tags({"kfp_run_id": cfg.kfp_run_id, "stage": "train", "arch": cfg.arch})
    mlflow.log_params(
        {k: str(v) for k, v in cfg.model_dump(exclude={"crops", "split", "out"}).items()}
        | {f"{k}_crops": n for k, n in sizes.items()}
        | {"classes": len(index)}
    )
    mlflow.log_dict(index, "label_index.json")
    mlflow.log_dict(preprocessing.to_json(), "preprocessing.json")


def _log_missing_epochs(run_id: str, history: list[dict[str, float]]) -> None:
    """After a restart, log the epochs the checkpoint has and MLflow lacks (killed between the two)."""
    import mlflow

    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train_loss")}
    for epoch, metrics in enumerate(history, start=1):
        if epoch not in logged:
            mlflow.log_metrics(metrics, step=epoch)


def _tracking_lost(error: Exception, progress: Progress, location: str) -> PipelineError:
    """The error for a tracking server that stopped answering mid-run (after MLflow's own HTTP retries)."""
    detail = redact_url(str(error).strip().splitlines()[0][:300])
    then = (
        f"the checkpoint at {redact_url(location)} is kept: a retry resumes from it in the same MLflow run"
        if location
        else "nothing can be resumed: set checkpoint_uri so that a retry continues where this one stopped"
    )
    return PipelineError(
        f"train: the MLflow tracking server {redact_url(tracking.tracking_uri())} failed during epoch "
        f"{progress.epoch} ({detail}); no model was written and nothing was registered; {then}"
    )


def run(cfg: TrainConfig) -> TrainResult:
    """Train (or resume training), log to MLflow and write the best checkpoint.

    The tracking server is checked before anything starts; if it stops answering later, MLflow's client retries
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``) and then the stage fails with a
    :class:`PipelineError` without writing a model, so nothing downstream registers a run with missing metrics.
    """
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException

    report = Report("train")
    tracking.check_server()
    seed_everything(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device(cfg.device)
    index = read_json(Path(cfg.split) / layout.LABEL_INDEX_FILE, "label index")
    labels = [index[str(i)] for i in range(len(index))]
    preprocessing = build_preprocessing(cfg)
    location = resume.run_location(cfg.checkpoint_uri, cfg.kfp_run_id)
    store = resume.ResumeStore(location) if location else None
    settings = resume.settings_key(cfg.model_dump(mode="json"))

    with tempfile.TemporaryDirectory(prefix="animl-train-") as tmp:
        train_ds, val_ds, data = build_datasets(cfg, labels, preprocessing, Path(tmp))
        state = store.load() if store else None
        if state is not None:
            resume.check_compatible(state, settings, data, location)
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
        parts = Parts(model, criterion.to(device), optimizer, scheduler, scaler, amp_dtype)
        progress = restore(state, parts) if state is not None else Progress()
        resumed_from = f"epoch {progress.epoch} step {progress.step}" if state is not None else ""

        try:
            active, reopened = _start_mlflow(cfg, store, state)
            with active:
                run_id = active.info.run_id
                if not reopened or not mlflow.get_run(run_id).data.params:
                    _log_run_start(cfg, {"train": len(train_ds), "val": len(val_ds)}, index, preprocessing)
                if reopened:
                    log.info("train: resuming MLflow run %s from %s", run_id, resumed_from or "its start")
                    mlflow.set_tag("resumed_from", resumed_from or "start")
                    _log_missing_epochs(run_id, progress.history)

                def save() -> None:
                    if store is not None:
                        store.save(snapshot(parts, progress, settings, data, run_id))

                loaders = (sampler, train_loader, val_loader)
                _train_loop(cfg, parts, progress, loaders, preprocessing, device, labels, save, report)
                if progress.best_state is None:
                    raise PipelineError(f"train: {cfg.monitor} was never a number; the run learned nothing usable")
                model.load_state_dict(progress.best_state)
                best = progress.best_metrics
                mlflow.log_metrics({"best_epoch": progress.best_epoch, **{f"best_{k}": v for k, v in best.items()}})
                mlflow.set_tag("stop_reason", progress.stop_reason)
        except MlflowException as e:
            raise _tracking_lost(e, progress, location) from None

    epochs_run = len(progress.history)
    _write_outputs(cfg, model, labels, index, preprocessing, progress, run_id)
    report.counts = {
        "train_crops": len(train_ds),
        "val_crops": len(val_ds),
        "epochs_run": epochs_run,
        "best_epoch": progress.best_epoch,
    }
    report.details.update(
        best=best,
        mlflow_run_id=run_id,
        arch=cfg.arch,
        device=str(device),
        stop_reason=progress.stop_reason,
        resumed_from=resumed_from,
        checkpoint_uri=location,
        history=progress.history,
    )
    report.finish(cfg.out)
    return TrainResult(
        mlflow_run_id=run_id,
        best_epoch=progress.best_epoch,
        best=best,
        epochs_run=epochs_run,
        resumed_from=resumed_from,
    )


def _train_loop(cfg, parts, progress, loaders, preprocessing, device, labels, save, report):
    """Epochs until the budget or the patience runs out; checkpoints and logs each one."""
    import mlflow

    sampler, train_loader, val_loader = loaders
    while not progress.finished:
        sampler.set_epoch(progress.epoch, progress.step * cfg.batch_size)
        start, before = time.perf_counter(), progress.seconds

        def on_step(start=start, before=before) -> None:
            if cfg.checkpoint_every_steps and progress.step % cfg.checkpoint_every_steps == 0:
                progress.seconds = before + time.perf_counter() - start
                save()

        try:
            train_one_epoch(parts, train_loader, preprocessing, device, progress, on_step)
        except NonFiniteLoss as e:
            report.problem("training stopped", f"epoch {progress.epoch}", f"{e}; keeping the best epoch so far")
            progress.finished, progress.stop_reason = True, f"non-finite loss: {e}"
            save()
            break
        progress.seconds = before + time.perf_counter() - start
        val = evaluate(parts.model, val_loader, preprocessing, device, labels)
        epoch = progress.epoch
        metrics = end_epoch(progress, val, cfg, parts.model, parts.scheduler.get_last_lr()[0])
        save()
        mlflow.log_metrics(metrics, step=epoch)
    log.info("train: stopped: %s; best epoch %d", progress.stop_reason, progress.best_epoch)


def _write_outputs(cfg, model, labels, index, preprocessing, progress: Progress, run_id: str) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        out / layout.MODEL_FILE,
        model,
        cfg.arch,
        labels,
        preprocessing,
        epoch=progress.best_epoch,
        config=cfg.model_dump(mode="json"),
        metrics=progress.best_metrics,
    )
    write_json(out / layout.LABEL_INDEX_FILE, index)
    write_json(out / layout.PREPROCESSING_FILE, preprocessing.to_json())
    write_json(out / layout.MLFLOW_RUN_FILE, {"run_id": run_id, "experiment": cfg.experiment})
