"""CPU per image delivered by the train_data loaders, main process and DataLoader workers together.

The harness's CPU time counts this process and the children it waited for; persistent DataLoader workers are
never waited for, so the train_data rows' CPU seconds leave the workers out. This probe reads the workers' user
and system time from ``/proc/<pid>/stat`` and adds the main process's, epoch by epoch, ours and theirs
interleaved, with the same loaders the stage builds (``bench.stages.train_data``). CPU per image does not grow
when other work steals the cores, so its ratio is the figure to read on a shared machine (see README, "The
machine"); wall-clock rates are printed too, with the load.

    .venv/bin/python -m bench.train_data_probe CROPS_DIR [--rounds 3] [--epochs 1] [--no-augment]

``CROPS_DIR`` is a folder in ImageFolder's layout (``<label>/<name>.jpg``), e.g. the one the stage writes:
``.venv/bin/python -m bench.run --stage train_data --quick --work /tmp/td`` leaves ``/tmp/td/train_data/crops/crops``.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from bench.stages.train_data import BATCH, SIZE, _theirs_transform

TICK = os.sysconf("SC_CLK_TCK")


def _proc_times(pid: int) -> tuple[float, float, int]:
    """User seconds, system seconds and minor page faults of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK, int(fields[7])


def _self_times() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _measure(loader, normalise, epochs: int) -> dict[str, float]:
    """One timed run of ``epochs`` epochs after the workers are up: per image, ms of CPU and page faults."""
    pids = [w.pid for w in loader._iterator._workers]  # persistent workers, started by the warm-up epoch
    workers0 = [_proc_times(p) for p in pids]
    main0, t0, n = _self_times(), time.perf_counter(), 0
    for _ in range(epochs):
        for x, _ in loader:
            n += len(normalise(x))
    wall = time.perf_counter() - t0
    main1, workers1 = _self_times(), [_proc_times(p) for p in pids]
    worker_user = sum(b[0] - a[0] for a, b in zip(workers0, workers1, strict=True))
    worker_sys = sum(b[1] - a[1] for a, b in zip(workers0, workers1, strict=True))
    worker_faults = sum(b[2] - a[2] for a, b in zip(workers0, workers1, strict=True))
    main_cpu = (main1[0] - main0[0]) + (main1[1] - main0[1])
    return {
        "images/s": n / wall,
        "cpu ms/img": 1e3 * (main_cpu + worker_user + worker_sys) / n,
        "main ms/img": 1e3 * main_cpu / n,
        "workers user ms/img": 1e3 * worker_user / n,
        "workers sys ms/img": 1e3 * worker_sys / n,
        "worker faults/img": worker_faults / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("crops", type=Path, help="crops in ImageFolder's layout")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each, interleaved")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per timed run")
    parser.add_argument("--no-augment", action="store_true", help="the evaluation path instead")
    args = parser.parse_args()

    import numpy as np
    import torch
    from torchvision.datasets import ImageFolder

    from animl_retrain.modeling import transforms
    from animl_retrain.modeling.data import CropDataset, decode_crops, make_loader
    from animl_retrain.vision.preprocessing import Preprocessing

    augment = not args.no_augment
    folder = ImageFolder(str(args.crops))
    paths, targets = [p for p, _ in folder.samples], np.array([t for _, t in folder.samples])
    workers = os.cpu_count() or 1
    preprocessing = Preprocessing(image_size=SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        array = decode_crops(paths, SIZE, Path(tmp) / "crops.npy")
        transform = transforms.train_transform(preprocessing, "camera-trap" if augment else "none")
        loaders = {
            "ours": (
                make_loader(CropDataset(array, targets, transform), BATCH, workers, shuffle=True),
                lambda x: transforms.normalise(preprocessing, x),
            ),
            "theirs": (
                torch.utils.data.DataLoader(
                    ImageFolder(str(args.crops), transform=_theirs_transform(augment)),
                    batch_size=BATCH,
                    shuffle=True,
                    num_workers=workers,
                    persistent_workers=True,
                ),
                lambda x: x,
            ),
        }
        for loader, normalise in loaders.values():  # warm-up: workers started, crops mapped
            for x, _ in loader:
                normalise(x)
        print(f"{len(paths)} crops, batch {BATCH}, {workers} workers, augmentation {augment}")
        print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
        for r in range(args.rounds):
            got = {name: _measure(loader, norm, args.epochs) for name, (loader, norm) in loaders.items()}
            for name, m in got.items():
                print(f"round {r + 1} {name:6s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
            ours, theirs = got["ours"], got["theirs"]
            print(
                f"round {r + 1} ratio: CPU per image {theirs['cpu ms/img'] / ours['cpu ms/img']:.2f}x, "
                f"wall {ours['images/s'] / theirs['images/s']:.2f}x"
            )
        print(f"load after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
