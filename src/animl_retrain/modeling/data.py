"""Feeding crops to a model: decode every crop once into a uint8 array, then serve tensors from memory.

The crop stage already resized each crop to the training size, so an epoch costs no JPEG decoding at all:
:func:`decode_crops` fills a memory-mapped ``(N, H, W, 3)`` uint8 array once (in parallel), and
:class:`CropDataset` hands out whole uint8 batches, augmented in one go by a batched transform
(:class:`~animl_retrain.modeling.transforms.BatchAugment`), or ``(3, H, W)`` tensors through a per-image one.
Normalisation (:func:`animl_retrain.modeling.transforms.normalise`) runs on whole batches, on the model's device.

Training order and augmentation are functions of ``(seed, epoch, position in the epoch)`` alone
(:class:`EpochSampler` hands each item its own augmentation seed), so a run resumed in the middle of an epoch
sees exactly the batches and augmentations the uninterrupted run would have, whatever the number of workers.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from animl_retrain.core.errors import PipelineError

CHUNK = 256


def _decode_chunk(job: tuple[str, int, list[str], int]) -> list[tuple[str, str]]:
    """Decode one chunk of crops into rows ``start..`` of the array file; return (path, error) failures."""
    array_file, start, paths, size = job
    array = np.load(array_file, mmap_mode="r+")
    failures = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                array[start + i] = np.asarray(img)
        except (OSError, ValueError) as e:
            failures.append((path, str(e)))
    array.flush()
    return failures


def decode_crops(paths: list[Path], size: int, array_file: Path, workers: int = 0) -> np.ndarray:
    """Decode ``paths`` into a ``(N, size, size, 3)`` uint8 memory-mapped array stored at ``array_file``."""
    array_file.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(array_file, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    del array
    jobs = [(str(array_file), s, [str(p) for p in paths[s : s + CHUNK]], size) for s in range(0, len(paths), CHUNK)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs)))
    failures: list[tuple[str, str]] = []
    if workers == 1:
        for job in jobs:
            failures += _decode_chunk(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for f in pool.map(_decode_chunk, jobs):
                failures += f
    if failures:
        shown = "; ".join(f"{p}: {e}" for p, e in failures[:5])
        raise PipelineError(f"{len(failures)} crop(s) cannot be decoded (the crop stage wrote them): {shown}")
    return np.load(array_file, mmap_mode="r")


class CropDataset:
    """Map-style dataset over a decoded crop array: ``(uint8 tensor (3, H, W), label index)``."""

    def __init__(self, array: np.ndarray, targets: np.ndarray, transform=None):
        self.array = array
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | tuple[int, int]):
        """Item ``key``, or ``(index, seed)``: the transform then draws its randomness from ``seed`` alone."""
        import torch

        i, seed = key if isinstance(key, tuple) else (key, None)
        x = torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)
        if self.transform is not None:
            if seed is None:
                x = self.transform(x)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    x = self.transform(x)
        return x, int(self.targets[i])

    def __getitems__(self, keys: list):
        """A whole batch ``(uint8 (N, 3, H, W), labels)``, the DataLoader's batched fetch.

        A batched transform (``transform.batched``, :class:`~animl_retrain.modeling.transforms.BatchAugment`)
        augments the batch in one go, each item by its own seed; any other runs per item, as ``[key]`` does.
        """
        import torch

        if not getattr(self.transform, "batched", False):
            return Batch(*default_collate([self[k] for k in keys]))
        pairs = [k if isinstance(k, tuple) else (k, None) for k in keys]
        index = np.array([i for i, _ in pairs])
        seeds = [s for _, s in pairs]
        x = torch.from_numpy(np.ascontiguousarray(self.array[index])).permute(0, 3, 1, 2)
        # In a worker, the batch is written straight into shared memory (as default_collate does there)
        out = self.transform.empty(len(index), shared=torch.utils.data.get_worker_info() is not None)
        x = self.transform(x, None if None in seeds else seeds, out=out)
        return Batch(x, torch.from_numpy(self.targets[index]))


class Batch(tuple):
    """``(images, labels)`` already stacked by :meth:`CropDataset.__getitems__`."""

    def __new__(cls, x, y):  # noqa: D102
        return super().__new__(cls, (x, y))


def default_collate(items):
    """Torch's collation of ``(image, label)`` items into ``(images, labels)``."""
    from torch.utils.data import default_collate as collate

    return collate(items)


def collate(batch):
    """The DataLoader's collate_fn: a :class:`Batch` is ready; anything else is collated as torch does."""
    return tuple(batch) if isinstance(batch, Batch) else default_collate(batch)


class EpochSampler:
    """Yields ``(index, augmentation seed)`` for one epoch; the order depends only on the seed and the epoch.

    With ``weights`` it draws ``len(weights)`` items with replacement in proportion to them (a class-balanced
    sampler); without, it is a permutation. :meth:`set_epoch` chooses the epoch and how many items to skip,
    which is how a resumed run continues exactly where the interrupted one stopped.
    """

    def __init__(self, n: int, seed: int, weights: np.ndarray | None = None):
        self.n = n
        self.seed = seed
        self.weights = weights
        self.epoch = 1
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Serve epoch ``epoch`` (1-based), skipping its first ``start`` items."""
        self.epoch, self.start = epoch, start

    def order(self):
        """The epoch's full ``(indices, seeds)``."""
        import torch

        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            indices = torch.randperm(self.n, generator=g)
        else:
            indices = torch.multinomial(torch.as_tensor(self.weights, dtype=torch.double), self.n, True, generator=g)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        return indices.tolist(), seeds.tolist()

    def __iter__(self):
        indices, seeds = self.order()
        return iter(list(zip(indices, seeds, strict=True))[self.start :])

    def __len__(self) -> int:
        return self.n - self.start


def make_loader(
    dataset: CropDataset,
    batch_size: int,
    workers: int,
    *,
    shuffle: bool = False,
    sampler=None,
    seed: int = 0,
    drop_last: bool = False,
):
    """A DataLoader with pinned memory, persistent workers and deep prefetching where they help.

    The data are already decoded in memory, so each worker only augments whole batches (``__getitems__``), written
    straight into shared memory; four batches in flight per worker keep a GPU fed while the main process steps the
    optimiser.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
        drop_last=drop_last,
        collate_fn=collate,
        worker_init_fn=_keep_freed_memory if workers > 0 else None,
    )


def _keep_freed_memory(worker_id: int = 0) -> None:
    """A worker's ``worker_init_fn``: let glibc's malloc keep freed memory for the next batch.

    A worker frees the same few megabytes of float intermediates every chunk; by default glibc hands them back to
    the kernel (``mmap``'d blocks, a trimmed heap) and takes fresh zeroed pages again, ~70 page faults per crop
    (measured: 0.3-0.4 ms of system time per crop, a fifth of the worker's CPU). A fixed mmap threshold of 32 MiB
    and a 1 GiB trim threshold keep them in the heap. Without glibc (no ``mallopt``) nothing changes.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_mmap_threshold, 32 << 20)
