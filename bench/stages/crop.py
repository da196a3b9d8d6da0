"""Crop: our stage against MegaDetector's own ``crop_detections`` (square crops) on the same images and boxes.

``crop_detections`` comes from ``pip install --no-deps megadetector`` plus the three packages it imports, in its
own virtualenv under the scratch folder (its code never enters this repository). It decodes every image at full
scale and saves each square crop at native resolution, in threads; ours decodes each image once at the smallest
JPEG scale that keeps every crop at full resolution, resizes once to the training size and uses every core.
Both read one MegaDetector-format file and write every crop from scratch on every run.

Two more figures show how close the stage runs to its limit: the rate at which the same images can merely be
decoded on every core, at full scale and at the reduced scales our stage picks, expressed in crops/s.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor

import pandas as pd

from animl_retrain.formats import mdformat, tables
from animl_retrain.formats.layout import IMAGES_DIR
from animl_retrain.stages import crop
from animl_retrain.vision.images import open_image
from animl_retrain.vision.preprocessing import draft_scale
from bench.frames import describe, distinct_frames
from bench.harness import measure_pair, timed

STAGE = "crop"
MEGADETECTOR = ["megadetector==10.0.28"]
# What megadetector.classification.crop_detections imports (stack.md); pinned like the project's own packages.
MEGADETECTOR_NEEDS = ["pillow==13.0.0", "tqdm==4.70.1", "azure-storage-blob==12.31.1"]
SIZE = 224
LABELS = ["bird", "fox", "lizard", "rodent", "skunk"]


def _image_set(ctx, n_images: int):
    """``n_images`` full-size images (hard links to a few distinct frames), ``images.csv`` and the boxes file."""
    frames, origin = distinct_frames(ctx.research_data, 8 if ctx.quick else 32)
    root = ctx.work / "images"
    shutil.rmtree(root, ignore_errors=True)
    (root / IMAGES_DIR / "frames").mkdir(parents=True)
    for k, frame in enumerate(frames):
        (root / IMAGES_DIR / "frames" / f"{k}.jpg").write_bytes(frame.data)
    rows, md_images = [], []
    results = mdformat.new_results("ground truth", LABELS)
    boxes = 0
    for i in range(n_images):
        k = i % len(frames)
        file = f"cam{i % 20:02d}/{i:06d}.jpg"
        (root / IMAGES_DIR / file).parent.mkdir(exist_ok=True)
        os.link(root / IMAGES_DIR / "frames" / f"{k}.jpg", root / IMAGES_DIR / file)
        rows.append(
            {
                "image_id": f"bench:{i:06d}",
                "file": file,
                "key": file,
                "location": f"site {i % 20}",
                "datetime": "",
                "width": frames[k].width,
                "height": frames[k].height,
                "n_objects": len(frames[k].boxes),
                "animl_labels": "",
                "needs_detection": False,
            }
        )
        detections = [
            {
                "category": mdformat.ANIMAL,
                "conf": 1.0,
                "bbox": box,
                "classifications": [[str((i + j) % len(LABELS)), 1.0]],
                "annotation_id": f"bench:{i:06d}#{j}",
            }
            for j, box in enumerate(frames[k].boxes)
        ]
        boxes += len(detections)
        md_images.append({"file": file, "detections": detections})
    results["images"] = md_images
    tables.write_table(pd.DataFrame(rows), root / "images.csv", tables.IMAGES)
    md_file = ctx.work / "boxes.json"
    md_file.write_text(json.dumps(results))
    return root, md_file, frames, boxes, origin


def _decode(job: tuple[str, int]) -> None:
    path, scale = job
    open_image(path, scale_for=lambda w, h: scale)


def _decode_all(jobs: list[tuple[str, int]], workers: int) -> None:
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode, jobs, chunksize=16))


def run(ctx):
    """600 full-size images with ~1,300 boxes (100 with --quick): a full run in about three minutes, quiet."""
    n_images = 100 if ctx.quick else 600
    root, md_file, frames, boxes, origin = _image_set(ctx, n_images)
    if not ctx.quick and boxes < 1200:
        raise AssertionError(f"crop bench: only {boxes} boxes")
    python = ctx.venv("megadetector", MEGADETECTOR_NEEDS, no_deps=MEGADETECTOR) / "python"
    cores = os.cpu_count() or 1
    threads = 2 * cores
    ours_out, theirs_out = ctx.work / "ours", ctx.work / "theirs"

    def clear():
        for folder in (ours_out, theirs_out):
            shutil.rmtree(folder, ignore_errors=True)

    def ours():
        result = crop.run(crop.CropConfig(images=root, ground_truth=md_file, out=ours_out, crop_size=SIZE))
        if result.crops != boxes:
            raise AssertionError(f"crop: {result.crops} crops from {boxes} boxes")

    def theirs():
        ctx.run(
            str(python),
            "-m",
            "megadetector.classification.crop_detections",
            str(md_file),
            str(theirs_out / "crops"),
            "--images-dir",
            str(root / IMAGES_DIR),
            "--square-crops",
            "--threads",
            str(threads),
            "--logdir",
            str(theirs_out),
        )
        made = sum(1 for p in (theirs_out / "crops").rglob("*.jpg"))
        if made != boxes:
            raise AssertionError(f"crop_detections: {made} crops from {boxes} boxes")

    ctx.note(f"{n_images} images, {boxes} boxes")
    ours_t, theirs_t = measure_pair(ours, ctx.alternative(theirs), repeats=ctx.repeats, setup=clear)
    ours_s, theirs_s = ours_t.wall, theirs_t.wall
    clear()

    by_file = {im["file"]: im for im in json.loads(md_file.read_text())["images"]}
    table = tables.read_table(root / "images.csv", tables.IMAGES)
    full_jobs, draft_jobs = [], []
    for row in table.itertuples():
        path = str(root / IMAGES_DIR / row.file)
        scale = draft_scale([d["bbox"] for d in by_file[row.file]["detections"]], row.width, row.height, SIZE)
        full_jobs.append((path, 1))
        draft_jobs.append((path, scale))
    # context rows: half the repeats, to keep the stage's full run within about three minutes
    full_s = timed(lambda: _decode_all(full_jobs, cores), repeats=max(1, ctx.repeats // 2))
    draft_s = timed(lambda: _decode_all(draft_jobs, cores), repeats=max(1, ctx.repeats // 2))

    what = f"{n_images} images ({describe(frames)}; {origin}), {boxes} boxes"
    return [
        ctx.row(
            stage=STAGE,
            metric="crops/s",
            unit="crops/s",
            ours=boxes / ours_s,
            alternative=f"MegaDetector crop_detections --square-crops --threads {threads}",
            alternative_value=boxes / theirs_s,
            input=f"{what}; ours resized to {SIZE} px, theirs at native size",
        ),
        ctx.row(
            stage=STAGE,
            metric="CPU time per crop",
            unit="ms",
            ours=1e3 * ours_t.cpu / boxes,
            alternative=f"MegaDetector crop_detections --square-crops --threads {threads}",
            alternative_value=1e3 * theirs_t.cpu / boxes,
            higher_is_better=False,
            input=f"same {boxes} crops; all processes' CPU, unaffected by other load on the machine",
        ),
        ctx.row(
            stage=STAGE,
            metric="crops/s against decoding alone (reduced scale)",
            unit="crops/s",
            ours=boxes / ours_s,
            alternative="decoding the same images at our reduced scales, every core, nothing else",
            alternative_value=boxes / draft_s,
            input=f"{what}; ratio = share of the decode-only rate the stage reaches",
        ),
        ctx.row(
            stage=STAGE,
            metric="crops/s against decoding alone (full scale)",
            unit="crops/s",
            ours=boxes / ours_s,
            alternative="decoding the same images at full scale, every core, nothing else",
            alternative_value=boxes / full_s,
            input=what,
        ),
    ]
