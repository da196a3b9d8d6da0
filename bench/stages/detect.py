"""Detect: MegaDetector-sized inference at 1280 px, and the image decoding that must keep a GPU fed.

1. The detect stage end to end (JPEG files -> results file) on this machine's CPU with a YOLOv5x6-shaped network
   (MegaDetector v5's architecture, random weights, built in ``bench/yolo_shaped.py``), against the same network
   with the same weights run in PyTorch eager the way MegaDetector runs it, on the same JPEGs and cores; the
   published figures (one CPU core, an RTX 4090) are kept as context. The GPU row says "no GPU" unless one is
   present.
2. Decoding + letterboxing per core, ours (JPEG decoded at reduced DCT scale where the frame is at least twice the
   input size, then OpenCV INTER_LINEAR) against MegaDetector's (full decode, INTER_LINEAR), on the same images,
   with the mean difference of the network input in grey levels. At N images/s per core, 100 images/s need
   100/N decoding cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from animl_retrain.core.io import read_json
from animl_retrain.formats import mdformat, tables
from animl_retrain.formats.layout import IMAGES_DIR
from animl_retrain.modeling import detector
from animl_retrain.stages import detect
from animl_retrain.vision.images import open_image
from bench.harness import timed_pair

STAGE = "detect"
MD_CPU = 0.65  # MegaDetector's published CPU throughput: 0.5-0.8 images/s on one core (midpoint)
MD_RTX4090 = 17.6  # MegaDetector's published images/s on an RTX 4090


def _images(ctx) -> list[Path]:
    """Real camera-trap frames where given (MegaDetector's test images), else synthetic 2048x1536 JPEGs."""
    if ctx.research_data:
        folder = Path(ctx.research_data) / "CameraTraps" / "test_images"
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        if found:
            return found
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        path = ctx.work / "synthetic" / f"frame{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        from PIL import Image

        Image.fromarray(small).resize((2048, 1536), Image.BICUBIC).save(path, quality=90)
        out.append(path)
    return out


def _md_style_letterbox(path: Path, size: int = 1280) -> np.ndarray:
    """MegaDetector's classic preprocessing: full decode, cv2 INTER_LINEAR resize, grey padding to the stride."""
    import cv2

    img, (w, h) = open_image(path)
    g = detector.letterbox_geometry(w, h, size)
    arr = cv2.resize(np.asarray(img), (g.resized_width, g.resized_height), interpolation=cv2.INTER_LINEAR)
    bottom = g.input_height - g.resized_height - g.top
    right = g.input_width - g.resized_width - g.left
    return cv2.copyMakeBorder(arr, g.top, bottom, g.left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))


def _stage_layout(ctx, files: list[Path]) -> tuple[Path, Path]:
    """Lay ``files`` out as the download and cct-to-md stages would (no ground-truth boxes: all need detection)."""
    root = ctx.work / "stage"
    rows = []
    for i, src in enumerate(files):
        rel = f"cam/{i:03d}-{src.name}"
        dest = root / "images" / IMAGES_DIR / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
        rows.append(
            {
                "image_id": f"b:{i}",
                "file": rel,
                "key": rel,
                "location": "bench",
                "datetime": "",
                "width": None,
                "height": None,
                "n_objects": 1,
                "animl_labels": "animal",
                "needs_detection": True,
            }
        )
    tables.write_table(pd.DataFrame(rows), root / "images" / "images.csv", tables.IMAGES)
    mdformat.write_results(root / "gt.json", mdformat.new_results("none"))
    return root / "images", root / "gt.json"


def _megadetector_eager(files: list[Path], seed: int = 0) -> tuple[float, str]:
    """Images/s of the same network run the way MegaDetector v5 runs it: PyTorch eager, one image at a time.

    The same weights as the ONNX file (``export_onnx`` builds the network after ``torch.manual_seed(seed)`` too),
    MegaDetector's preprocessing (full decode, cv2 INTER_LINEAR letterbox), float input scaled to 0..1, fp16 on
    a GPU as MegaDetector does there, fp32 on the CPU; then its NMS (confidence >= 0.005, IoU 0.45).
    """
    import torch
    import torchvision

    from bench.yolo_shaped import YoloV5x6Shaped

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = YoloV5x6Shaped().eval().to(device)
    if device.type == "cuda":
        model = model.half()
    start = time.perf_counter()
    with torch.no_grad():
        for f in files:
            x = torch.from_numpy(_md_style_letterbox(f)).to(device).permute(2, 0, 1)[None]
            x = (x.half() if device.type == "cuda" else x.float()) / 255
            pred = model(x)[0].float()
            pred = pred[pred[:, 4] > 0.005]
            score, _ = (pred[:, 5:] * pred[:, 4:5]).max(1)
            xy, wh = pred[:, :2], pred[:, 2:4] / 2
            keep = torchvision.ops.nms(torch.cat([xy - wh, xy + wh], 1), score, 0.45)
            pred[keep].cpu()
    return len(files) / (time.perf_counter() - start), "fp16, " + str(device) if device.type == "cuda" else "fp32"


def _load_average() -> str:
    try:
        return f"load average {os.getloadavg()[0]:.1f}"
    except OSError:
        return "load average unknown"


def run(ctx):
    """Stage throughput at 1280 px with a YOLOv5x6-shaped network; decoding per core, ours against MD's."""
    files = _images(ctx)
    n_stage = 2 if ctx.quick else 4
    if ctx.smoke:  # the bench's tables through the stage's checks, without exporting and running the 140 M network
        images_dir, gt = _stage_layout(ctx, files[:1])
        detect.run(detect.DetectConfig(images=images_dir, ground_truth=gt, out=ctx.work / "out", weights=""))
        return [
            ctx.row(
                stage=STAGE,
                metric="--smoke: the stage read the bench's tables",
                unit="-",
                ours=None,
                alternative="-",
                alternative_value=None,
                input="no network run with --smoke",
            )
        ]
    weights = ctx.work / "yolov5x6_shaped.onnx"
    from bench.yolo_shaped import export_onnx

    params = export_onnx(weights)
    images_dir, gt = _stage_layout(ctx, files[:n_stage])
    load = _load_average()
    start = time.perf_counter()
    result = detect.run(
        detect.DetectConfig(
            images=images_dir,
            ground_truth=gt,
            out=ctx.work / "out",
            weights=str(weights),
            device="auto",
            batch_size=2,
            workers=1,
        )
    )
    total = time.perf_counter() - start
    report = read_json(ctx.work / "out" / "report.json")
    loop_rate = report["images_per_second"]
    gpu = ctx.machine["gpu"]
    what = f"{result.images} camera-trap JPEGs ({'real' if ctx.research_data else 'synthetic'}), 1280 px"
    rows = [
        ctx.row(
            stage=STAGE,
            metric=f"images/s, {'GPU' if gpu != 'no GPU' else 'CPU'}, JPEG to results file",
            unit="img/s",
            ours=loop_rate,
            alternative="MegaDetector published, one CPU core (0.5-0.8)",
            alternative_value=None if gpu != "no GPU" else MD_CPU,
            input=f"{what}; YOLOv5x6-shaped net, {params / 1e6:.0f} M params, random weights, ONNX Runtime "
            f"{report['provider']} {report['precision']}; {ctx.machine['cores']} shared cores, {load}; model "
            f"load + run {total:.0f} s",
        ),
        ctx.row(
            stage=STAGE,
            metric="images/s, GPU, JPEG to results file",
            unit="img/s",
            ours=loop_rate if gpu != "no GPU" else None,
            alternative="MegaDetector published, RTX 4090",
            alternative_value=MD_RTX4090,
            input=f"{gpu}" if gpu != "no GPU" else "no GPU on this machine",
        ),
    ]

    eager_rate, eager_precision = _megadetector_eager(files[:n_stage])
    rows.append(
        ctx.row(
            stage=STAGE,
            metric=f"images/s, {'GPU' if gpu != 'no GPU' else 'CPU'}, same network: ours against PyTorch eager",
            unit="img/s",
            ours=loop_rate,
            alternative=f"the same network and weights in PyTorch eager, as MegaDetector runs it ({eager_precision})",
            alternative_value=eager_rate,
            input=f"{what}; the same {result.images} JPEGs, the same cores, one after the other; theirs: "
            f"MegaDetector's letterbox, batch 1, NMS at 0.005/0.45; ours: the detect stage's loop ({_load_average()})",
        )
    )

    by_size = sorted(files, key=lambda f: os.path.getsize(f))
    sample = by_size[:: max(1, len(by_size) // 6)] if ctx.quick else by_size
    reduced = sum(_reduced(f) for f in sample)
    ours_s, theirs_s = timed_pair(
        lambda: [detector.load_letterboxed(f, 1280) for f in sample],
        lambda: [_md_style_letterbox(f) for f in sample],
        repeats=max(1, ctx.repeats // 2),
    )
    diffs = []
    for f in sample:
        theirs = _md_style_letterbox(f)
        if not np.array_equal(detector.load_letterboxed(f, 1280, reduced_decode=False)[0], theirs):
            raise AssertionError(f"{f}: full decoding should give MegaDetector's input exactly")
        diffs.append(np.abs(detector.load_letterboxed(f, 1280)[0].astype(np.float32) - theirs).mean())
    rows.append(
        ctx.row(
            stage=STAGE,
            metric="decode + letterbox to 1280 px, images/s on one core",
            unit="img/s",
            ours=len(sample) / ours_s,
            alternative="MegaDetector's (full decode, cv2 INTER_LINEAR)",
            alternative_value=len(sample) / theirs_s,
            input=f"{len(sample)} JPEGs, {_sizes(sample)}, {reduced} of them large enough to decode at reduced "
            f"scale; their network input differs by {np.mean(diffs):.2f} grey levels on average (identical with "
            f"--no-reduced-decode)",
        )
    )
    return rows


def _reduced(path: Path) -> bool:
    """Whether the frame is at least twice the letterboxed size, so the JPEG decoder can scale it down."""
    from PIL import Image

    w, h = Image.open(path).size
    return detector._draft_factor(w, h, detector.letterbox_geometry(w, h, 1280)) > 1


def _sizes(files: list[Path]) -> str:
    from PIL import Image

    sizes = sorted({Image.open(f).size for f in files}, key=lambda s: -s[0] * s[1])
    return f"{sizes[-1][0]}x{sizes[-1][1]} to {sizes[0][0]}x{sizes[0][1]}"
