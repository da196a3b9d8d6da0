"""Download: our stage against ``aws s3 sync`` of the same objects from SeaweedFS on loopback.

A SeaweedFS S3 server is started in a temporary state folder (stopped by its PID at the end, even on failure)
and filled with full-size JPEGs under Animl's ``original/<id>-original.jpg`` keys. The export also names a few
keys that are not in the bucket: our stage must fetch every present image, check it against its stored
checksum (or MD5 ETag), check it is a whole image, and report exactly the missing ones; ``aws s3 sync``
(awscli, installed into its own virtualenv under the scratch folder) copies what is there and reports nothing
missing. Both start from an empty destination on every run. Throughput counts the objects actually fetched.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from animl_retrain.formats import tables
from animl_retrain.stages import download
from animl_retrain.tools import services
from bench.frames import describe, distinct_frames
from bench.harness import measure_pair

STAGE = "download"
AWSCLI = "awscli==1.46.2"
BUCKET = "bench-images"
MISSING_SHARE = 0.01


def _keys(n: int) -> list[str]:
    return [f"original/bench:{i:06d}-original.jpg" for i in range(n)]


def _export(ctx, present: list[str], missing: list[str]):
    """An export folder whose ``images.csv`` lists the present and the missing keys."""
    rows = [
        {
            "image_id": key.removeprefix("original/").removesuffix("-original.jpg"),
            "file": f"cam{i % 20:02d}/{i:06d}.jpg",
            "key": key,
            "location": f"site {i % 20}",
            "datetime": "",
            "width": None,
            "height": None,
            "n_objects": 1,
            "animl_labels": "fox",
            "needs_detection": False,
        }
        for i, key in enumerate(present + missing)
    ]
    folder = ctx.work / "export"
    folder.mkdir(parents=True, exist_ok=True)
    tables.write_table(pd.DataFrame(rows), folder / "images.csv", tables.IMAGES)
    return folder


def _fill_bucket(frames, keys: list[str]) -> int:
    from animl_retrain.core.storage import s3_client

    client = s3_client(max_pool_connections=16)
    client.create_bucket(Bucket=BUCKET)
    sizes = [len(frames[i % len(frames)].data) for i in range(len(keys))]

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=keys[i], Body=frames[i % len(frames)].data)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(len(keys))))
    return sum(sizes)


def run(ctx):
    """2,000 objects (200 with --quick) plus 1 % missing keys."""
    n = 200 if ctx.quick else 2000
    frames, origin = distinct_frames(ctx.research_data, 8 if ctx.quick else 48)
    aws = ctx.venv("awscli", [AWSCLI]) / "aws"
    state = ctx.work / "state"
    shutil.rmtree(state, ignore_errors=True)  # a kept --work folder: start from an empty server
    saved_env = dict(os.environ)
    try:
        svc = services.start(state, mlflow=False)
        os.environ.update(services.client_env(svc))
        present, missing = _keys(n), _keys(n + max(1, int(n * MISSING_SHARE)))[n:]
        ctx.note(f"uploading {n} objects to SeaweedFS")
        total_bytes = _fill_bucket(frames, present)
        export = _export(ctx, present, missing)
        ours_out, theirs_out = ctx.work / "ours", ctx.work / "theirs"

        def clear():
            for folder in (ours_out, theirs_out):
                shutil.rmtree(folder, ignore_errors=True)

        def ours():
            cfg = download.DownloadConfig(export=export, images_uri=f"s3://{BUCKET}", out=ours_out)
            result = download.run(cfg)
            if result.downloaded != n or result.missing != len(missing):
                raise AssertionError(f"download: expected {n} fetched and {len(missing)} missing, got {result}")

        def theirs():
            ctx.run(
                str(aws),
                "s3",
                "sync",
                f"s3://{BUCKET}",
                str(theirs_out),
                "--endpoint-url",
                svc.s3_endpoint,
                "--only-show-errors",
                "--no-progress",
            )
            got = sum(len(files) for _, _, files in os.walk(theirs_out))
            if got != n:
                raise AssertionError(f"aws s3 sync: expected {n} files, got {got}")

        ours_t, theirs_t = measure_pair(ours, ctx.alternative(theirs), repeats=ctx.repeats, setup=clear)
        ours_s, theirs_s = ours_t.wall, theirs_t.wall
        clear()
    finally:
        services.stop(state)
        os.environ.clear()
        os.environ.update(saved_env)

    return [
        ctx.row(
            stage=STAGE,
            metric="images/s",
            unit="images/s",
            ours=n / ours_s,
            alternative="aws s3 sync (awscli 1.46, default 10 threads)",
            alternative_value=n / theirs_s,
            input=(
                f"{n} objects ({describe(frames)}, {total_bytes / 1e6:.0f} MB; {origin}) + {len(missing)} "
                "missing keys, SeaweedFS on loopback; ours also checks every object's checksum, every image whole "
                "and reports the missing keys"
            ),
        ),
        ctx.row(
            stage=STAGE,
            metric="MB/s",
            unit="MB/s",
            ours=total_bytes / 1e6 / ours_s,
            alternative="aws s3 sync (awscli 1.46, default 10 threads)",
            alternative_value=total_bytes / 1e6 / theirs_s,
            input=f"same {n} objects",
        ),
        ctx.row(
            stage=STAGE,
            metric="client CPU time per image",
            unit="ms",
            ours=1e3 * ours_t.cpu / n,
            alternative="aws s3 sync (awscli 1.46, default 10 threads)",
            alternative_value=1e3 * theirs_t.cpu / n,
            higher_is_better=False,
            input=f"same {n} objects; the S3 server's CPU not counted",
        ),
    ]
