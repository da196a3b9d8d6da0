"""A tiny detector with YOLOv5's ONNX layout and a known output, built and exported by the tests themselves.

It "detects" the white rectangle in an image: every output row is ``[cx, cy, w, h, objectness, animal, person,
vehicle]`` in input pixels, like a YOLOv5 export's, so the whole path (letterbox, inference, decoding, NMS and
mapping back to the original image) can be checked against boxes computed by hand:

- row 0: the rectangle, animal, confidence 0.9;
- row 1: the same box, animal, 0.6 (NMS must drop it);
- row 2: the same box, person, 0.5 (NMS is per class: it stays);
- row 3: the left quarter of the box, animal, 0.1 (overlaps row 0 by IoU 0.25: stays, but under 0.2);
- row 4: the same box, vehicle, 0.004 (under MegaDetector's output threshold of 0.005: never written).
"""

from __future__ import annotations

from pathlib import Path

import torch


class WhiteBoxDetector(torch.nn.Module):
    """Finds the bounding box of pixels whiter than 0.9 in every channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x.amin(1) > 0.9).float()
        cols, rows = mask.amax(1), mask.amax(2)
        iw = torch.arange(x.shape[3], dtype=torch.float32)
        ih = torch.arange(x.shape[2], dtype=torch.float32)
        x1 = (iw + (1 - cols) * 1e6).amin(1)
        x2 = (iw - (1 - cols) * 1e6).amax(1) + 1
        y1 = (ih + (1 - rows) * 1e6).amin(1)
        y2 = (ih - (1 - rows) * 1e6).amax(1) + 1
        found = cols.amax(1)
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        one, zero = torch.ones_like(cx), torch.zeros_like(cx)

        def row(cx, cy, w, h, obj, cls):
            scores = [one if i == cls else zero for i in range(3)]
            return torch.stack([cx, cy, w, h, obj * one * found, *scores], 1)

        return torch.stack(
            [
                row(cx, cy, w, h, 0.9, 0),
                row(cx, cy, w, h, 0.6, 0),
                row(cx, cy, w, h, 0.5, 1),
                row(x1 + w / 8, cy, w / 4, h, 0.1, 0),
                row(cx, cy, w, h, 0.004, 2),
            ],
            1,
        )


def export(path: Path, fixed: tuple[int, int, int] | None = None, module: torch.nn.Module | None = None) -> Path:
    """Export to ONNX as YOLOv5's export.py does: dynamic batch and size, or fixed ``(batch, height, width)``."""
    import warnings

    batch, height, width = fixed or (1, 128, 128)
    dynamic = None if fixed else {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module or WhiteBoxDetector(),
            (torch.zeros(batch, 3, height, width),),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes=dynamic,
            opset_version=17,
        )
    return Path(path)
