"""Retrain cache: a scheduled rerun where 5 % of the images are new, warm cache against a cold run.

A SeaweedFS S3 server (started in a temporary state folder, stopped by its PID at the end) holds the images
and the cache, as the user's bucket would. One "retrain" is the download and crop stages over an export of
``n`` images (~2 boxes each). Cold: no cache, every image fetched, checked, decoded and cropped (what a one-off
run, or today's weekly run, pays). Warm: the same 95 % of images as a run before, plus 5 % never seen, with
``cache_uri`` set: only the new ones are fetched and cropped; the rest come from the cache (crops in packs,
one request per pack). Each warm repeat brings its own 5 % of new images, so every repeat does the same new
work. The crops of a warm run are checked byte for byte against a cold run's over the same export. A second
figure is the first run, which fills the empty cache (timed once), against the cold run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from animl_retrain.core.storage import s3_client
from animl_retrain.formats import mdformat, tables
from animl_retrain.stages import crop, download
from animl_retrain.tools import services
from bench.frames import describe, distinct_frames
from bench.harness import measure, measure_pair

STAGE = "retrain_cache"
BUCKET = "bench-retrain"
NEW_SHARE = 0.05
LABELS = ["fox", "skunk"]


def _unique(data: bytes, i: int) -> bytes:
    """The JPEG with a comment segment naming image ``i``: its own checksum, the same pixels and decoding cost."""
    comment = f"bench image {i}".encode()
    return data[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + data[2:]


class _Project:
    """Images ``0..`` in the bucket, with exports and box files for any subset of them."""

    def __init__(self, ctx, frames):
        self.ctx, self.frames, self.client = ctx, frames, s3_client(max_pool_connections=16)
        self.client.create_bucket(Bucket=BUCKET)

    def key(self, i: int) -> str:
        return f"original/bench:{i:06d}-original.jpg"

    def upload(self, ids) -> None:
        def put(i: int) -> None:
            data = _unique(self.frames[i % len(self.frames)].data, i)
            self.client.put_object(Bucket=BUCKET, Key=self.key(i), Body=data)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, ids))

    def export(self, name: str, ids: list[int]):
        """An export folder (``images.csv``) and a ground-truth boxes file for images ``ids``."""
        folder = self.ctx.work / "exports" / name
        folder.mkdir(parents=True, exist_ok=True)
        rows, images = [], []
        for i in ids:
            frame = self.frames[i % len(self.frames)]
            rows.append(
                {
                    "image_id": f"bench:{i:06d}",
                    "file": f"cam{i % 20:02d}/{i:06d}.jpg",
                    "key": self.key(i),
                    "location": f"site {i % 20}",
                    "datetime": "",
                    "width": frame.width,
                    "height": frame.height,
                    "n_objects": len(frame.boxes),
                    "animl_labels": "fox",
                    "needs_detection": False,
                }
            )
            detections = [
                {
                    "category": mdformat.ANIMAL,
                    "conf": 1.0,
                    "bbox": box,
                    "classifications": [[str(j % 2), 1.0]],
                    "annotation_id": f"bench:{i:06d}#{j}",
                }
                for j, box in enumerate(frame.boxes)
            ]
            images.append({"file": rows[-1]["file"], "detections": detections})
        tables.write_table(pd.DataFrame(rows), folder / "images.csv", tables.IMAGES)
        results = mdformat.new_results("ground truth", LABELS)
        results["images"] = images
        (folder / "boxes.json").write_text(json.dumps(results))
        return folder, sum(len(im["detections"]) for im in images)


def _retrain(export, out, cache_uri: str = "") -> tuple[download.DownloadResult, crop.CropResult]:
    """The download and crop stages of one retrain, into ``out`` (emptied by :func:`_clear` beforehand)."""
    got = download.run(
        download.DownloadConfig(export=export, images_uri=f"s3://{BUCKET}", out=out / "images", cache_uri=cache_uri)
    )
    made = crop.run(
        crop.CropConfig(
            images=out / "images", ground_truth=export / "boxes.json", out=out / "crops", cache_uri=cache_uri
        )
    )
    return got, made


def _clear(runs: list) -> None:
    """Untimed, before every run: delete the outputs of all but the last warm and cold run, and write the page
    cache's dirty pages to disk, so that no run pays for writing back what the one before it wrote (a cold run
    writes ~0.7 GB of images)."""
    last = {p.name.split("-")[0]: p for p in runs}
    for folder in runs:
        if folder not in last.values():
            shutil.rmtree(folder, ignore_errors=True)
    os.sync()


def _crops(out) -> dict:
    root = out / "crops" / "crops"
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*.jpg")}


def run(ctx):
    """1,200 images (60 with --quick), 5 % of them new on each warm rerun; 2 timed runs after a warm-up."""
    n = 60 if ctx.quick else 1200
    repeats = max(1, min(2, ctx.repeats))
    frames, origin = distinct_frames(ctx.research_data, 8 if ctx.quick else 32)
    n_new = max(1, int(n * NEW_SHARE))
    old = list(range(n - n_new))
    state = ctx.work / "state"
    shutil.rmtree(state, ignore_errors=True)
    saved_env = dict(os.environ)
    try:
        svc = services.start(state, mlflow=False)
        os.environ.update(services.client_env(svc))
        project = _Project(ctx, frames)
        # batch 0: the run before (the first run, filling the cache); 1..repeats+1: one per warm rerun (warm-up too)
        batches = [list(range(n + k * n_new, n + (k + 1) * n_new)) for k in range(repeats + 2)]
        ctx.note(f"uploading {len(old) + sum(map(len, batches))} images to SeaweedFS")
        project.upload(old + [i for b in batches for i in b])
        exports = [project.export(f"run-{k}", old + b)[0] for k, b in enumerate(batches)]
        boxes = sum(len(frames[i % len(frames)].boxes) for i in old + batches[0])
        warm_cache = f"s3://{BUCKET}/retrain-cache"
        # the run before, which fills the empty cache: a first run's cost, timed once
        first_t = measure(lambda: _retrain(exports[0], ctx.work / "before", warm_cache), repeats=1, warmup=0)
        shutil.rmtree(ctx.work / "before")
        turn = {"warm": 0, "cold": 0}
        runs = []  # output folders, in the order written

        def warm():
            turn["warm"] += 1
            k = turn["warm"]
            runs.append(ctx.work / f"warm-{k}")
            got, made = _retrain(exports[k], runs[-1], warm_cache)
            new_boxes = sum(len(frames[i % len(frames)].boxes) for i in batches[k])
            if (got.downloaded, made.crops - made.from_cache) != (n_new, new_boxes):
                raise AssertionError(f"warm rerun: fetched {got.downloaded}, cropped {made.crops - made.from_cache}")

        def cold():
            turn["cold"] += 1
            runs.append(ctx.work / f"cold-{turn['cold']}")
            _retrain(exports[turn["cold"]], runs[-1])

        ctx.note(f"{n} images, {boxes} boxes; warm reruns with {n_new} new images each")
        warm_t, cold_t = measure_pair(warm, cold, repeats=repeats, setup=lambda: _clear(runs))
        if _crops(runs[-2]) != _crops(runs[-1]):  # the last warm and cold runs: the same export
            raise AssertionError("warm rerun: crops differ from a cold run's over the same export")
        for folder in runs:
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        services.stop(state)
        os.environ.clear()
        os.environ.update(saved_env)

    what = f"{n} images ({describe(frames)}; {origin}), {boxes} boxes, SeaweedFS on loopback"
    return [
        ctx.row(
            stage=STAGE,
            metric="download + crop, seconds per retrain, warm cache with 5 % new images",
            unit="s",
            ours=warm_t.wall,
            alternative="the same retrain cold (no cache: every image fetched and cropped)",
            alternative_value=cold_t.wall,
            higher_is_better=False,
            input=f"{what}; {n_new} new images per rerun, crops byte-identical to a cold run's",
        ),
        ctx.row(
            stage=STAGE,
            metric="download + crop, seconds, first run filling an empty cache",
            unit="s",
            ours=first_t.wall,
            alternative="the same retrain cold, no cache (the median above)",
            alternative_value=cold_t.wall,
            higher_is_better=False,
            input=f"{what}; ratio < 1 is what filling the cache costs a first run",
        ),
    ]
