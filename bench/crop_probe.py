"""CPU-time probe of the crop stage's steps, one process: ``python -m bench.crop_probe RESEARCH_DATA``.

The bench's 32 distinct real frames and boxes (``bench.frames``), each step timed with ``time.process_time()``
(best of ``--repeats``), so that other load on a shared machine inflates the figures little. Not part of the
bench's results: it tells where a frame's time goes.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from animl_retrain.stages import crop
from animl_retrain.vision import images
from animl_retrain.vision.preprocessing import _pixel_square, crop_squares, draft_scale
from bench.frames import distinct_frames

SIZE = 224


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    """Print ms per frame and per crop of each step (files under a temporary folder, removed at the end)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("research_data", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crop-probe-") as work:
        _probe(args, Path(work))


def _probe(args: argparse.Namespace, work: Path) -> None:
    frames, origin = distinct_frames(args.research_data, 32)
    paths = []
    for k, frame in enumerate(frames):
        paths.append(work / f"{k}.jpg")
        paths[-1].write_bytes(frame.data)
    crops = sum(len(f.boxes) for f in frames)
    jobs = [
        (path, work / "out", [_det(k, j, b) for j, b in enumerate(f.boxes)], SIZE, 95, images.DEFAULT_MAX_PIXELS)
        for k, (path, f) in enumerate(zip(paths, frames, strict=True))
    ]
    squares = [crop_squares(p, f.boxes, SIZE, images.DEFAULT_MAX_PIXELS) for p, f in zip(paths, frames, strict=True)]

    def decode() -> None:
        for path, frame in zip(paths, frames, strict=True):
            images.open_region(
                path, images.DEFAULT_MAX_PIXELS, lambda w, h, b=frame.boxes: draft_scale(b, w, h, SIZE), _union(frame)
            )

    steps = {
        "decode the crops' region": decode,
        "decode + cut + resize (crop_squares)": lambda: [
            crop_squares(p, f.boxes, SIZE, images.DEFAULT_MAX_PIXELS) for p, f in zip(paths, frames, strict=True)
        ],
        "JPEG encode of the crops": lambda: [
            s.save(io.BytesIO(), format="JPEG", quality=95) for ss in squares for s in ss
        ],
        "all of it, files written (_crop_image)": lambda: [crop._crop_image(job) for job in jobs],
        "Pillow whole decode, full scale": lambda: [images.open_image(p) for p in paths],
    }
    print(f"{len(frames)} frames ({origin}), {crops} crops")
    for name, fn in steps.items():
        seconds = _best(fn, args.repeats)
        print(f"{name:42s} {1e3 * seconds / len(frames):6.2f} ms/frame {1e3 * seconds / crops:6.2f} ms/crop")


def _det(k: int, j: int, box: list[float]) -> dict:
    return {"label": "probe", "annotation_id": f"{k}#{j}", "x": box[0], "y": box[1], "w": box[2], "h": box[3]}


def _union(frame) -> Callable[[int, int], tuple[int, int, int, int]]:
    def region(width: int, height: int) -> tuple[int, int, int, int]:
        squares = [_pixel_square(b, width, height) for b in frame.boxes]
        x0, y0 = max(0, min(s[0] for s in squares)), max(0, min(s[1] for s in squares))
        x1, y1 = min(width, max(s[2] for s in squares)), min(height, max(s[3] for s in squares))
        return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)

    return region


if __name__ == "__main__":
    main()
