"""Stage 6, train: fine-tune a classifier on the train split, select the epoch on val, survive preemption.

The loop is :mod:`animl_retrain.modeling.training` (torchvision's reference shape), the resume checkpoint
:mod:`animl_retrain.modeling.checkpoint`, the MLflow run :mod:`animl_retrain.integrations.mlflow.tracking`.
Parameters, per-epoch curves, system metrics, the label index and the preprocessing go to MLflow; the best
epoch's weights go to ``model.pt``, a checkpoint that carries its architecture, labels and preprocessing.

With ``checkpoint_uri`` set, a resume checkpoint is written after every epoch (and every
``checkpoint_every_steps`` steps); a run killed at any point and started again with the same settings
continues from the last checkpoint, in the same MLflow run, and ends with the same weights and metrics as a run
that was never interrupted (batches and augmentations depend only on seed, epoch and position; see
:mod:`animl_retrain.modeling.data` and :mod:`animl_retrain.modeling.checkpoint`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from animl_retrain.config import MODEL_NAME, StageConfig
from animl_retrain.core.io import read_json, write_json
from animl_retrain.core.report import Report
from animl_retrain.formats import layout
from animl_retrain.integrations.mlflow import tracking
from animl_retrain.modeling import checkpoint, training
from animl_retrain.modeling.backbones import ARCHITECTURES


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
    recipe: Literal["auto", "two-phase", "end-to-end"] = Field(
        "auto",
        description="two-phase: fit the head on frozen features, then fine-tune everything from it (kept only if "
        "it beats the head on val); end-to-end: train everything at once; auto: two-phase with pretrained weights",
    )
    backbone_lr_mult: float = Field(
        0.1, gt=0, le=1, description="two-phase: the backbone's learning rate is lr times this (the head's is lr)"
    )
    freeze_bn_stats: bool = Field(
        True, description="two-phase: batch-norm layers keep their pretrained statistics while fine-tuning"
    )
    calibrate: bool = Field(True, description="fit a temperature on val and fold it into the model's head")
    epochs: int = Field(10, ge=1, le=1000, description="maximum number of epochs (of fine-tuning, in two-phase)")
    batch_size: int = Field(32, ge=1, le=4096, description="images per step")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW, or SGD with momentum")
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (0 = plain SGD)")
    weight_decay: float = Field(0.05, ge=0, description="weight decay (decoupled, for AdamW)")
    lr_schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="learning-rate schedule")
    warmup_epochs: float = Field(0.0, ge=0, le=100, description="linear LR warm-up, in epochs")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    balance: Literal["sampler", "loss", "none"] = Field(
        "loss", description="class imbalance: a balanced sampler, inverse-frequency loss weights, or nothing"
    )
    augmentation: Literal["camera-trap", "none"] = Field("camera-trap", description="training augmentation")
    monitor: Literal["val_macro_f1", "val_top1", "val_loss"] = Field(
        "val_macro_f1", description="early-stopping metric"
    )
    patience: int = Field(
        5, ge=1, description="stop after this many epochs without improvement on the best fine-tuned epoch"
    )
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
    experiment: str = Field(MODEL_NAME, description="MLflow experiment name")
    run_name: str = Field("", description="MLflow run name (default: MLflow's)")
    kfp_run_id: str = Field("", description="Kubeflow run id, recorded as an MLflow tag")


class TrainResult(BaseModel):
    """What the train stage produced."""

    mlflow_run_id: str
    best_epoch: int
    best: dict[str, float]
    epochs_run: int
    resumed_from: str = ""


def run(cfg: TrainConfig) -> TrainResult:
    """Train (or resume training), log to MLflow and write the best checkpoint.

    The tracking server is checked before anything starts; if it stops answering later, MLflow's client retries
    (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``) and then the stage fails with a
    :class:`PipelineError` without writing a model, so nothing downstream registers a run with missing metrics.
    """
    report = Report("train")
    tracking.check_server()
    device = training.setup(cfg.seed, cfg.device)
    index = read_json(Path(cfg.split) / layout.LABEL_INDEX_FILE, "label index")
    labels = [index[str(i)] for i in range(len(index))]
    preprocessing = training.build_preprocessing(cfg)
    location = checkpoint.run_location(cfg.checkpoint_uri, cfg.kfp_run_id)
    store = checkpoint.ResumeStore(location) if location else None
    settings = checkpoint.settings_key(cfg.model_dump(mode="json"))

    with tempfile.TemporaryDirectory(prefix="animl-train-") as tmp:
        train_ds, val_ds, data = training.build_datasets(cfg, labels, preprocessing, Path(tmp))
        state = store.load() if store else None
        if state is not None:
            checkpoint.check_compatible(state, settings, data, location)
        trainer = training.build_trainer(cfg, train_ds, val_ds, labels, preprocessing, device, state)
        with tracking.training_run(cfg, store, state, trainer.progress, location) as mlflow_run:
            sizes = {"train": len(train_ds), "val": len(val_ds)}
            mlflow_run.start(cfg, sizes, index, preprocessing, trainer.progress, trainer.resumed_from)

            def save() -> None:
                if store is not None:
                    store.save(checkpoint.snapshot(trainer.parts, trainer.progress, settings, data, mlflow_run.run_id))

            if training.two_phase(cfg) and state is None:
                mlflow_run.log_epoch(trainer.fit_head(train_ds, val_ds), 0)
                save()
            trainer.fit(save, mlflow_run.log_epoch, report)
            model = trainer.best_model()
            if trainer.progress.head and trainer.progress.best_epoch == 0:
                report.problem(
                    "fine-tuning kept out",
                    f"{len(trainer.progress.history)} epoch(s)",
                    f"no epoch beat the head on frozen features on val {cfg.monitor}; the head-only model is kept",
                )
            calibrated = trainer.calibrate() if cfg.calibrate else {}
            mlflow_run.finish(trainer.progress, calibrated)

    _write_outputs(cfg, model, labels, index, preprocessing, trainer.progress, mlflow_run.run_id)
    return _finish(cfg, report, trainer, sizes, mlflow_run.run_id, location, device)


def _finish(cfg: TrainConfig, report: Report, trainer, sizes: dict[str, int], run_id: str, location: str, device):
    """The report and the result."""
    progress = trainer.progress
    report.counts = {
        "train_crops": sizes["train"],
        "val_crops": sizes["val"],
        "epochs_run": len(progress.history),
        "best_epoch": progress.best_epoch,
    }
    report.details.update(
        best=progress.best_metrics,
        mlflow_run_id=run_id,
        arch=cfg.arch,
        device=str(device),
        stop_reason=progress.stop_reason,
        resumed_from=trainer.resumed_from,
        checkpoint_uri=location,
        history=progress.history,
        recipe="two-phase" if progress.head else "end-to-end",
        head=progress.head,
        temperature=progress.temperature,
    )
    report.finish(cfg.out)
    return TrainResult(
        mlflow_run_id=run_id,
        best_epoch=progress.best_epoch,
        best=progress.best_metrics,
        epochs_run=len(progress.history),
        resumed_from=trainer.resumed_from,
    )


def _write_outputs(cfg, model, labels, index, preprocessing, progress: training.Progress, run_id: str) -> None:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_checkpoint(
        out / layout.MODEL_FILE,
        model,
        cfg.arch,
        labels,
        preprocessing,
        epoch=progress.best_epoch,
        config=cfg.model_dump(mode="json"),
        metrics=progress.best_metrics,
        temperature=progress.temperature,
    )
    write_json(out / layout.LABEL_INDEX_FILE, index)
    write_json(out / layout.PREPROCESSING_FILE, preprocessing.to_json())
    write_json(out / layout.MLFLOW_RUN_FILE, {"run_id": run_id, "experiment": cfg.experiment})
