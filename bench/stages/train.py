"""Training throughput: images/s through the train stage's own loop (loader, augmentation, step), on this machine.

Ours (EfficientNet-Lite0, camera-trap augmentation, AdamW) against TNC's recipe (ResNet-18, no augmentation,
SGD), the two configurations of the accuracy benchmark, at its input size, on synthetic crops, interleaved.
On a GPU machine the same figures come from CUDA with AMP and channels-last; without one the GPU row says so.
"""

from __future__ import annotations

import numpy as np

from bench.stages.accuracy import OURS, SIZE, TNC

STAGE = "train"


def make_step(recipe: dict, n: int, batch: int):
    """A callable that trains one pass over ``n`` synthetic crops with the train stage's building blocks."""
    import torch

    from animl_retrain.modeling import training, transforms
    from animl_retrain.modeling.backbones import build_model
    from animl_retrain.modeling.data import CropDataset, make_loader
    from animl_retrain.stages import train

    cfg = train.TrainConfig(crops=".", split=".", out=".", workers=0, batch_size=batch, **recipe)
    pre = training.build_preprocessing(cfg)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    targets = rng.integers(0, 10, n)
    ds = CropDataset(array, targets, transforms.train_transform(pre, cfg.augmentation))
    criterion, sampler = training.build_criterion_and_sampler(cfg, targets, 10)
    model = build_model(cfg.arch, 10)
    optimizer = training.build_optimizer(model, cfg)
    device = torch.device("cpu")
    amp_dtype, scaler = training.build_amp(cfg, device)
    parts = training.Parts(
        model, criterion, optimizer, training.build_scheduler(optimizer, cfg, n // batch), scaler, amp_dtype
    )
    loader = make_loader(ds, batch, 0, sampler=sampler, drop_last=True)

    def step():
        training.train_one_epoch(parts, loader, pre, device, training.Progress(), lambda: None)

    return step


def run(ctx):
    """Images/s of both recipes on CPU; a GPU row that records the GPU or its absence."""
    from bench.harness import timed_pair

    n, batch = (32, 16) if ctx.quick else (64, 32)
    ours_recipe = {k: v for k, v in OURS.items() if k != "weights"}
    ours, theirs = timed_pair(make_step(ours_recipe, n, batch), make_step(TNC, n, batch), repeats=ctx.repeats)
    rows = [
        ctx.row(
            stage=STAGE,
            metric="training images/s (CPU)",
            unit="img/s",
            ours=n / ours,
            alternative=f"TNC recipe: ResNet-18 {SIZE}px, no augmentation, SGD",
            alternative_value=n / theirs,
            input=f"ours: EfficientNet-Lite0 {SIZE}px with camera-trap augmentation; {n} synthetic crops, "
            f"batch {batch}, {ctx.machine['cores']} cores",
        )
    ]
    if ctx.machine["gpu"] == "no GPU":
        rows.append(
            ctx.row(
                stage=STAGE,
                metric="training images/s (GPU)",
                unit="img/s",
                ours=None,
                alternative="—",
                alternative_value=None,
                input="no GPU on this machine",
            )
        )
    return rows
