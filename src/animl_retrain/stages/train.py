"""Stage 6, train: fine-tune a torchvision classifier on the train split, select the epoch on val.

Shaped like torchvision's reference script: ``build_*`` helpers, ``train_one_epoch``, ``evaluate`` and ``run``.
Parameters, per-epoch curves, the label index and the preprocessing go to MLflow; the best epoch's weights go
to ``model.pt``, a checkpoint that carries its architecture, labels and preprocessing.
"""

from __future__ import annotations

import copy
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from animl_retrain import tables, tracking
from animl_retrain.common import PipelineError, Report, log, read_json, write_json
from animl_retrain.config import StageConfig
from animl_retrain.data import CropDataset, decode_crops, make_loader
from animl_retrain.metrics import classification_report
from animl_retrain.models import ARCHITECTURES, build_model, save_checkpoint
from animl_retrain.preprocessing import Preprocessing
from animl_retrain.stages.crop import CROPS_DIR

CHECKPOINT = "model.pt"


class TrainConfig(StageConfig):
    """Settings of the train stage."""

    crops: Path = Field(description="output folder of the crop stage")
    split: Path = Field(description="output folder of the split stage")
    out: Path = Field(description="output folder for the checkpoint")
    arch: str = Field("efficientnet_b0", description=f"backbone: one of {', '.join(ARCHITECTURES)}")
    weights: str = Field("", description="initial weights: '' (random), 'imagenet' (download), or a path/s3:// URI")
    image_size: int = Field(224, ge=16, le=1024, description="model input size in pixels")
    epochs: int = Field(10, ge=1, le=1000, description="maximum number of epochs")
    batch_size: int = Field(32, ge=1, le=4096, description="images per step")
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate (AdamW)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    lr_schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="learning-rate schedule")
    balance: Literal["sampler", "loss", "none"] = Field(
        "loss", description="class imbalance: a balanced sampler, inverse-frequency loss weights, or nothing"
    )
    augmentation: Literal["camera-trap", "none"] = Field("camera-trap", description="training augmentation")
    monitor: Literal["val_macro_f1", "val_top1", "val_loss"] = Field(
        "val_macro_f1", description="early-stopping metric"
    )
    patience: int = Field(5, ge=1, description="stop after this many epochs without improvement")
    seed: int = Field(0, description="random seed")
    workers: int = Field(2, ge=0, le=64, description="data-loader worker processes")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'")
    experiment: str = Field("animl-classifier", description="MLflow experiment name")
    run_name: str = Field("", description="MLflow run name (default: MLflow's)")
    kfp_run_id: str = Field("", description="Kubeflow run id, recorded as an MLflow tag")


class TrainResult(BaseModel):
    """What the train stage produced."""

    mlflow_run_id: str
    best_epoch: int
    best: dict[str, float]
    epochs_run: int


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str):
    """Resolve 'auto' to CUDA when present."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_datasets(cfg: TrainConfig, labels: list[str], preprocessing: Preprocessing, work: Path):
    """Decoded train and val datasets with their transforms."""
    split = tables.read_table(Path(cfg.split) / "split.csv", tables.SPLIT)
    index = {label: i for i, label in enumerate(labels)}
    out = {}
    for name in ("train", "val"):
        rows = split[split["split"] == name]
        if rows.empty:
            raise PipelineError(f"train: the {name} split is empty; check the split stage's report")
        paths = [Path(cfg.crops) / CROPS_DIR / c for c in rows["crop"]]
        array = decode_crops(paths, preprocessing.image_size, work / f"{name}.npy", workers=cfg.workers)
        transform = (
            preprocessing.train_transform(cfg.augmentation) if name == "train" else preprocessing.eval_transform()
        )
        out[name] = CropDataset(array, rows["label"].map(index).to_numpy(), transform)
    return out["train"], out["val"]


def build_criterion_and_sampler(cfg: TrainConfig, targets: np.ndarray, n_classes: int):
    """Loss and sampler for the chosen class-imbalance treatment."""
    import torch

    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    inverse = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    weight = torch.tensor(inverse, dtype=torch.float32) if cfg.balance == "loss" else None
    sampler = None
    if cfg.balance == "sampler":
        sampler = torch.utils.data.WeightedRandomSampler(
            torch.tensor(inverse[targets], dtype=torch.double),
            num_samples=len(targets),
            replacement=True,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    return torch.nn.CrossEntropyLoss(weight=weight), sampler


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step LR schedule: cosine decay, step decay (x0.1 at 60% and 85% of training) or constant."""
    import torch

    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(0.6 * total), int(0.85 * total)], gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, preprocessing, device) -> tuple[float, int]:
    """One pass over the training data; returns mean loss and the number of images seen."""
    import torch

    model.train()
    total_loss, seen = 0.0, 0
    amp = device.type == "cuda"
    for x, y in loader:
        x = preprocessing.normalise(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        if amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(y)
        seen += len(y)
    return total_loss / max(seen, 1), seen


def predict(model, loader, preprocessing, device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and targets for every item of ``loader``."""
    import torch

    model.eval()
    probs, targets = [], []
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        for x, y in loader:
            logits = model(preprocessing.normalise(x.to(device, non_blocking=True)))
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            targets.append(y.numpy())
    return np.concatenate(probs), np.concatenate(targets)


def evaluate(model, loader, preprocessing, device, labels: list[str]) -> dict[str, float]:
    """Validation loss, top-1 and macro-F1."""
    probs, targets = predict(model, loader, preprocessing, device)
    nll = float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())
    report = classification_report(targets, probs, labels)
    return {"val_loss": nll, "val_top1": report["top1"], "val_macro_f1": report["macro_f1"]}


def _improved(metric: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if metric == "val_loss" else value > best


def run(cfg: TrainConfig) -> TrainResult:
    """Train, log to MLflow and write the best checkpoint."""
    import mlflow
    import torch

    report = Report("train")
    tracking.check_server()
    seed_everything(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device(cfg.device)
    index = read_json(Path(cfg.split) / "label_index.json", "label index")
    labels = [index[str(i)] for i in range(len(index))]
    preprocessing = Preprocessing(image_size=cfg.image_size)

    with tempfile.TemporaryDirectory(prefix="animl-train-") as tmp:
        train_ds, val_ds = build_datasets(cfg, labels, preprocessing, Path(tmp))
        criterion, sampler = build_criterion_and_sampler(cfg, train_ds.targets, len(labels))
        train_loader = make_loader(
            train_ds,
            cfg.batch_size,
            cfg.workers,
            shuffle=True,
            sampler=sampler,
            seed=cfg.seed,
            drop_last=len(train_ds) > cfg.batch_size,
        )
        val_loader = make_loader(val_ds, cfg.batch_size * 2, cfg.workers)
        model = build_model(cfg.arch, len(labels), cfg.weights).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        criterion = criterion.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg, len(train_loader))

        mlflow.set_experiment(cfg.experiment)
        with mlflow.start_run(run_name=cfg.run_name or None) as active:
            run_id = active.info.run_id
            mlflow.set_tags({"kfp_run_id": cfg.kfp_run_id, "stage": "train", "arch": cfg.arch})
            mlflow.log_params(
                {k: str(v) for k, v in cfg.model_dump(exclude={"crops", "split", "out"}).items()}
                | {"train_crops": len(train_ds), "val_crops": len(val_ds), "classes": len(labels)}
            )
            mlflow.log_dict(index, "label_index.json")
            mlflow.log_dict(preprocessing.to_json(), "preprocessing.json")
            best, best_epoch, best_state, stale, epoch = None, 0, None, 0, 0
            for epoch in range(1, cfg.epochs + 1):
                start = time.perf_counter()
                loss, seen = train_one_epoch(
                    model, train_loader, criterion, optimizer, scheduler, preprocessing, device
                )
                val = evaluate(model, val_loader, preprocessing, device, labels)
                seconds = time.perf_counter() - start
                metrics = {
                    "train_loss": loss,
                    **val,
                    "lr": scheduler.get_last_lr()[0],
                    "epoch_seconds": seconds,
                    "train_images_per_second": seen / seconds,
                }
                mlflow.log_metrics(metrics, step=epoch)
                log.info(
                    "train: epoch %d/%d loss %.4f val_top1 %.3f val_macro_f1 %.3f (%.1fs)",
                    epoch,
                    cfg.epochs,
                    loss,
                    val["val_top1"],
                    val["val_macro_f1"],
                    seconds,
                )
                if _improved(cfg.monitor, val[cfg.monitor], best):
                    best, best_epoch, stale = val[cfg.monitor], epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                    best_metrics = val
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        log.info("train: no %s improvement in %d epochs; stopping", cfg.monitor, stale)
                        break
            if best_state is None:
                raise PipelineError(f"train: {cfg.monitor} was never a number; the run learned nothing usable")
            model.load_state_dict(best_state)
            mlflow.log_metrics({"best_epoch": best_epoch, **{f"best_{k}": v for k, v in best_metrics.items()}})

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        out / CHECKPOINT,
        model,
        cfg.arch,
        labels,
        preprocessing,
        epoch=best_epoch,
        config=cfg.model_dump(mode="json"),
        metrics=best_metrics,
    )
    write_json(out / "label_index.json", index)
    write_json(out / "preprocessing.json", preprocessing.to_json())
    write_json(out / tracking.RUN_FILE, {"run_id": run_id, "experiment": cfg.experiment})
    report.counts = {
        "train_crops": len(train_ds),
        "val_crops": len(val_ds),
        "epochs_run": epoch,
        "best_epoch": best_epoch,
    }
    report.details.update(best=best_metrics, mlflow_run_id=run_id, arch=cfg.arch, device=str(device))
    report.finish(out)
    return TrainResult(mlflow_run_id=run_id, best_epoch=best_epoch, best=best_metrics, epochs_run=epoch)
