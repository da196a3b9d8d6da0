"""A YOLOv5x6-shaped network (MegaDetector v5's architecture, random weights) written from its published shape.

Only the shape matters here: it has YOLOv5 P6's layers, widths (x: 1.25 x the base widths), depths (1.33 x)
and output layout ``[batch, boxes, 5 + classes]`` over strides 8/16/32/64, so ONNX Runtime does the same work
per image as on MegaDetector v5a's ONNX export (about 140 M parameters; batch-norm folded into the convolutions
as an export does). The weights are random; objectness biases start low, as YOLOv5 initialises them, so only
a realistic handful of boxes pass the 0.005 output threshold and NMS is not flooded. No YOLOv5 code is used.
"""

from __future__ import annotations

import math

import torch
from torch import nn

WIDTH, DEPTH = 1.25, 1.33  # the "x" multipliers
ANCHORS = [  # P3/8, P4/16, P5/32, P6/64: (w, h) in input pixels, three per level
    [(19, 27), (44, 40), (38, 94)],
    [(96, 68), (86, 152), (180, 137)],
    [(140, 301), (303, 264), (238, 542)],
    [(436, 615), (739, 380), (925, 792)],
]
STRIDES = [8, 16, 32, 64]


def _w(c: int) -> int:
    return int(math.ceil(c * WIDTH / 8) * 8)


def _d(n: int) -> int:
    return max(round(n * DEPTH), 1)


class Conv(nn.Sequential):
    """Convolution (batch-norm folded in) + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None):
        super().__init__(nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=True), nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 1), Conv(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    def __init__(self, c1: int, c2: int, n: int, shortcut: bool = True):
        super().__init__()
        c = c2 // 2
        self.cv1, self.cv2, self.cv3 = Conv(c1, c, 1), Conv(c1, c, 1), Conv(2 * c, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c, shortcut) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c = c1 // 2
        self.cv1, self.cv2, self.pool = Conv(c1, c, 1), Conv(4 * c, c2, 1), nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y1 = self.cv1(x)
        y2 = self.pool(y1)
        y3 = self.pool(y2)
        return self.cv2(torch.cat([y1, y2, y3, self.pool(y3)], 1))


class Detect(nn.Module):
    """Per level: a 1x1 conv to 3 x (5 + classes), sigmoid, and YOLOv5's box decoding to input pixels."""

    def __init__(self, channels: list[int], classes: int):
        super().__init__()
        self.no = 5 + classes
        self.convs = nn.ModuleList(nn.Conv2d(c, 3 * self.no, 1) for c in channels)
        for conv, stride in zip(self.convs, STRIDES, strict=True):
            bias = conv.bias.detach().view(3, self.no)
            bias[:, 4] = math.log(8 / (640 / stride) ** 2) - 4  # rare objects: few boxes over 0.005
            bias[:, 5:] = math.log(0.6 / (classes - 0.99))
            conv.bias = nn.Parameter(bias.view(-1))
        self.register_buffer("anchors", torch.tensor(ANCHORS, dtype=torch.float32))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for i, (x, conv) in enumerate(zip(feats, self.convs, strict=True)):
            x = conv(x)
            b, _, ny, nx = x.shape
            x = x.view(b, 3, self.no, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            gy, gx = torch.meshgrid(
                torch.arange(ny, dtype=torch.float32), torch.arange(nx, dtype=torch.float32), indexing="ij"
            )
            grid = torch.stack((gx, gy), 2).view(1, 1, ny, nx, 2)
            xy = (x[..., :2] * 2 - 0.5 + grid) * STRIDES[i]
            wh = (x[..., 2:4] * 2) ** 2 * self.anchors[i].view(1, 3, 1, 1, 2)
            out.append(torch.cat((xy, wh, x[..., 4:]), -1).view(b, -1, self.no))
        return torch.cat(out, 1)


class YoloV5x6Shaped(nn.Module):
    """YOLOv5 P6 backbone, PAN head and detect layer at the x size; input float [B, 3, H, W] in 0..1."""

    def __init__(self, classes: int = 3):
        super().__init__()
        c64, c128, c256, c512, c768, c1024 = (_w(c) for c in (64, 128, 256, 512, 768, 1024))
        self.stem = nn.Sequential(Conv(3, c64, 6, 2, 2), Conv(c64, c128, 3, 2), C3(c128, c128, _d(3)))
        self.p3 = nn.Sequential(Conv(c128, c256, 3, 2), C3(c256, c256, _d(6)))
        self.p4 = nn.Sequential(Conv(c256, c512, 3, 2), C3(c512, c512, _d(9)))
        self.p5 = nn.Sequential(Conv(c512, c768, 3, 2), C3(c768, c768, _d(3)))
        self.p6 = nn.Sequential(Conv(c768, c1024, 3, 2), C3(c1024, c1024, _d(3)), SPPF(c1024, c1024))
        self.lat6, self.top5 = Conv(c1024, c768, 1), C3(2 * c768, c768, _d(3), False)
        self.lat5, self.top4 = Conv(c768, c512, 1), C3(2 * c512, c512, _d(3), False)
        self.lat4, self.out3 = Conv(c512, c256, 1), C3(2 * c256, c256, _d(3), False)
        self.down3, self.out4 = Conv(c256, c256, 3, 2), C3(2 * c256, c512, _d(3), False)
        self.down4, self.out5 = Conv(c512, c512, 3, 2), C3(2 * c512, c768, _d(3), False)
        self.down5, self.out6 = Conv(c768, c768, 3, 2), C3(2 * c768, c1024, _d(3), False)
        self.detect = Detect([c256, c512, c768, c1024], classes)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        p6 = self.p6(p5)
        l6 = self.lat6(p6)
        l5 = self.lat5(self.top5(torch.cat([self.up(l6), p5], 1)))
        l4 = self.lat4(self.top4(torch.cat([self.up(l5), p4], 1)))
        o3 = self.out3(torch.cat([self.up(l4), p3], 1))
        o4 = self.out4(torch.cat([self.down3(o3), l4], 1))
        o5 = self.out5(torch.cat([self.down4(o4), l5], 1))
        o6 = self.out6(torch.cat([self.down5(o5), l6], 1))
        return self.detect([o3, o4, o5, o6])


def export_onnx(path, seed: int = 0) -> int:
    """Export the network with random weights as YOLOv5's export.py would (dynamic batch and size, opset 17).

    Returns the number of parameters.
    """
    import warnings

    torch.manual_seed(seed)
    model = YoloV5x6Shaped().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 256, 320),),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "boxes"}},
            opset_version=17,
        )
    return sum(p.numel() for p in model.parameters())
