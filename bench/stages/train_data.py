"""Training data path: decode-once uint8 memmap + CropDataset against torchvision ImageFolder + DataLoader.

Both read the same crops (written by our crop stage as ``crops/<label>/<name>.jpg``, which is ImageFolder's
layout) and deliver the same thing to the model: shuffled float batches, ImageNet-normalised, after the same
camera-trap augmentation (ours: ``modeling.transforms.train_transform`` on uint8 tensors, normalised per batch;
theirs: the classic per-image PIL transforms, ``ToTensor`` and ``Normalize``). Same batch size, the same
number of worker processes (one per core), persistent workers for both; one timed call is one epoch. Ours pays
a one-time decode into the memmap, measured apart and also charged to a single epoch in the last row.
"""

from __future__ import annotations

import os
import shutil

from animl_retrain.formats import layout
from animl_retrain.stages import crop
from animl_retrain.vision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from bench.harness import measure, measure_pair
from bench.stages.crop import _image_set

STAGE = "train_data"
SIZE = 224
BATCH = 64


def _theirs_transform(augment: bool):
    from torchvision import transforms as T

    size = (SIZE, SIZE)
    steps = [T.Resize(size)]
    if augment:
        steps = [
            T.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.9, 1.1)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.RandomRotation(10)], p=0.3),
            T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2),
            T.RandomGrayscale(p=0.1),
        ]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _epoch(loader, normalise=None) -> int:
    seen = 0
    for x, _ in loader:
        if normalise is not None:
            x = normalise(x)
        seen += len(x)
    return seen


def run(ctx):
    """~2,100 crops of 224 px from 1,000 images (~230 from 100 with --quick)."""
    import numpy as np
    import torch
    from torchvision.datasets import ImageFolder

    from animl_retrain.modeling import transforms
    from animl_retrain.modeling.data import CropDataset, decode_crops, make_loader

    root, md_file, _, _, origin = _image_set(ctx, 100 if ctx.quick else 1000)
    crops_out = ctx.work / "crops"
    shutil.rmtree(crops_out, ignore_errors=True)
    crop.run(crop.CropConfig(images=root, ground_truth=md_file, out=crops_out, crop_size=SIZE))
    folder = ImageFolder(str(crops_out / layout.CROPS_DIR))
    paths = [p for p, _ in folder.samples]
    targets = np.array([t for _, t in folder.samples])
    n = len(paths)
    workers = os.cpu_count() or 1
    preprocessing = Preprocessing(image_size=SIZE)
    array_file = ctx.work / "crops.npy"

    decode = measure(lambda: decode_crops(paths, SIZE, array_file), repeats=ctx.repeats)
    array = decode_crops(paths, SIZE, array_file)

    rows = []
    for augment in (True, False):
        transform = transforms.train_transform(preprocessing, "camera-trap" if augment else "none")
        ours_loader = make_loader(CropDataset(array, targets, transform), BATCH, workers, shuffle=True)
        theirs_loader = torch.utils.data.DataLoader(
            ImageFolder(str(crops_out / layout.CROPS_DIR), transform=_theirs_transform(augment)),
            batch_size=BATCH,
            shuffle=True,
            num_workers=workers,
            persistent_workers=True,
        )
        ours_t, theirs_t = measure_pair(
            lambda loader=ours_loader: _epoch(loader, lambda x: transforms.normalise(preprocessing, x)),
            lambda loader=theirs_loader: _epoch(loader),
            repeats=ctx.repeats,
        )
        what = "camera-trap augmentation" if augment else "no augmentation (evaluation)"
        rows.append(
            ctx.row(
                stage=STAGE,
                metric=f"images/s delivered, {what}",
                unit="images/s",
                ours=n / ours_t.wall,
                alternative=f"torchvision ImageFolder + DataLoader ({workers} workers)",
                alternative_value=n / theirs_t.wall,
                input=f"{n} crops of {SIZE} px ({origin}), batch {BATCH}, {workers} workers, CPU, one epoch",
            )
        )
        if augment:
            rows.append(
                ctx.row(
                    stage=STAGE,
                    metric="images/s, one epoch including the one-time decode",
                    unit="images/s",
                    ours=n / (ours_t.wall + decode.wall),
                    alternative=f"torchvision ImageFolder + DataLoader ({workers} workers)",
                    alternative_value=n / theirs_t.wall,
                    input=(
                        f"same; decode into the memmap took {decode.wall:.2f} s "
                        f"({n / decode.wall:.0f} crops/s), paid once for all epochs"
                    ),
                )
            )
        del ours_loader, theirs_loader
    rows.append(_cpu_per_crop(ctx, array, targets, ImageFolder(str(crops_out / layout.CROPS_DIR)), preprocessing))
    return rows


def _cpu_per_crop(ctx, array, targets, folder, preprocessing):
    """CPU per augmented, normalised crop in this one process (no workers): unaffected by other load."""
    import torch

    from animl_retrain.modeling import transforms
    from animl_retrain.modeling.data import CropDataset

    n = min(len(targets), 512)
    dataset = CropDataset(array, targets, transforms.train_transform(preprocessing, "camera-trap"))
    theirs_transform = _theirs_transform(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:

        def ours():
            for start in range(0, n, BATCH):
                x, _ = dataset.__getitems__([(i, i + 1) for i in range(start, min(n, start + BATCH))])
                transforms.normalise(preprocessing, x)

        def theirs():
            for i in range(n):
                folder[i]  # decode, PIL augmentation, ToTensor, Normalize

        folder.transform = theirs_transform
        ours_t, theirs_t = measure_pair(ours, theirs, repeats=ctx.repeats)
    finally:
        torch.set_num_threads(threads)
    return ctx.row(
        stage=STAGE,
        metric="CPU time per crop, camera-trap augmentation, one process",
        unit="ms",
        ours=1e3 * ours_t.cpu / n,
        alternative="torchvision ImageFolder's per-image PIL transform",
        alternative_value=1e3 * theirs_t.cpu / n,
        higher_is_better=False,
        input=f"{n} crops of {SIZE} px, one thread, no DataLoader: the work each worker does per crop, unaffected "
        "by other load (ours: a batch of 64 indexed, augmented and normalised at once)",
    )
