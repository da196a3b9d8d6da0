"""Full-size camera-trap frames for the download and crop benchmarks, with boxes.

Synthetic by default: the demo project's locations and animals drawn at full camera resolution, with sensor
noise so that the JPEGs have the size of real ones (~0.5-1 MB at 2-5 MP, quality 85), not the few kB a flat
synthetic picture compresses to. With ``--research-data`` the real full-size photos found there (every JPEG of
at least 1.5 MP) are used instead, with synthetic boxes of the same size distribution. A few distinct frames
are repeated under different names to reach thousands of images: every copy costs the same to fetch, decode
and crop, and the frames stay in the page cache for both contenders alike.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZES = [(2048, 1536), (2592, 1944), (1920, 1080)]  # 3 MP, 5 MP, 1080p: common camera-trap settings
QUALITY = 85
MIN_REAL_PIXELS = 1_500_000


@dataclass
class Frame:
    """One encoded full-size frame and its normalised ``[x, y, w, h]`` boxes."""

    data: bytes
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)


def _boxes(rng: np.random.Generator, width: int, height: int) -> list[list[float]]:
    """1-3 animal boxes per frame, 18-42 % of the frame height tall, as in the demo project."""
    boxes = []
    for _ in range(int(rng.choice([1, 2, 3], p=[0.2, 0.5, 0.3]))):
        h = rng.uniform(0.18, 0.42) * height
        w = min(h * rng.uniform(1.0, 1.9), width * 0.8)
        x, y = rng.uniform(0, width - w), rng.uniform(height * 0.25, height - h)
        boxes.append([round(v, 6) for v in (x / width, y / height, w / width, h / height)])
    return boxes


def _synthetic(seed: int) -> Frame:
    from animl_retrain.tools import demo

    rng = np.random.default_rng(seed)
    width, height = SIZES[seed % len(SIZES)]
    img = demo._background(rng, (width, height), seed % 16, night=seed % 5 == 0)
    draw = ImageDraw.Draw(img)
    boxes = _boxes(rng, width, height)
    for box in boxes:
        species = demo.SPECIES[int(rng.integers(len(demo.SPECIES)))]
        px = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
        demo._draw_animal(draw, species, px, rng, 1 if rng.random() < 0.5 else -1)
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=QUALITY)
    return Frame(buf.getvalue(), width, height, boxes)


def _real(root: Path, limit: int) -> list[Frame]:
    frames = []
    rng = np.random.default_rng(0)
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg") or not path.is_file():
            continue
        try:
            with Image.open(path) as img:
                width, height = img.size
                if img.format != "JPEG" or width * height < MIN_REAL_PIXELS:
                    continue
        except OSError:
            continue
        frames.append(Frame(path.read_bytes(), width, height, _boxes(rng, width, height)))
        if len(frames) == limit:
            break
    return frames


def distinct_frames(research_data: Path | None, count: int) -> tuple[list[Frame], str]:
    """Up to ``count`` distinct full-size frames and a description of where they came from."""
    if research_data is not None:
        frames = _real(Path(research_data), count)
        if frames:
            return frames, f"{len(frames)} distinct real photos (≥1.5 MP) from --research-data"
    workers = min(count, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        frames = list(pool.map(_synthetic, range(count)))
    return frames, f"{count} distinct synthetic frames (2-5 MP, JPEG q{QUALITY})"


def describe(frames: list[Frame]) -> str:
    """Mean size and resolution of the frames."""
    kb = np.mean([len(f.data) for f in frames]) / 1e3
    mp = np.mean([f.width * f.height for f in frames]) / 1e6
    return f"mean {kb:.0f} kB, {mp:.1f} MP"
