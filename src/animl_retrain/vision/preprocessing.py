"""The one definition of how a detection becomes model input, shared by crop, training, evaluation and serving.

1. **Square crop** around the box: side = max(w, h), centred on the box, shifted to stay inside the image
   where it fits, zero-padded where it cannot (the rule of MegaDetector's ``crop_detections`` with square crops
   and of Animl's MIRAv2 handler).
2. **Resize** the square to ``image_size`` with PIL's antialiased bilinear filter.
3. **Normalise** with the ImageNet mean and standard deviation.

The crop stage does steps 1-2 once and stores the result; training adds augmentation before step 3; serving
and ``mlflow`` models do 1-3 on the full image. A :class:`Preprocessing` travels with every checkpoint and
registered model, so evaluation, export and serving rebuild exactly the transform the model was trained with.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RULE = "square-centred-clamped-zero-pad"


def square_region(box: Sequence[float], width: int, height: int) -> tuple[float, float, float]:
    """The square to cut for a normalised ``[x, y, w, h]`` box in a ``width`` x ``height`` image.

    Returns ``(left, top, side)`` in pixels. The square is centred on the box and moved inside the image
    when it fits; when it is larger than the image along an axis it is centred on the image on that axis.
    """
    x, y, w, h = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    side = max(w, h, 1.0)

    def place(start: float, length: float, limit: int) -> float:
        if side >= limit:
            return (limit - side) / 2
        return min(max(start + length / 2 - side / 2, 0.0), limit - side)

    return place(x, w, width), place(y, h, height), side


def draft_scale(boxes: Sequence[Sequence[float]], width: int, height: int, size: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8) that still leaves every crop at least ``size`` pixels wide."""
    smallest = min(max(b[2] * width, b[3] * height) for b in boxes)
    scale = 1
    while scale < 8 and smallest / (scale * 2) >= size:
        scale *= 2
    return scale


def cut_square(img: Image.Image, box: Sequence[float], size: int) -> Image.Image:
    """Steps 1-2: cut the square around ``box`` (normalised to ``img``) and resize it to ``size``."""
    left, top, side = square_region(box, img.width, img.height)
    region = (round(left), round(top), round(left + side), round(top + side))
    square = img.crop(region)  # PIL fills the parts outside the image with zeros
    return square.resize((size, size), Image.BILINEAR)


@dataclass(frozen=True)
class Preprocessing:
    """Input size and normalisation of a model; stored with it and used by everything that feeds it."""

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop: str = CROP_RULE
    interpolation: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in checkpoints and MLflow."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`to_json`."""
        return cls(
            image_size=int(data["image_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            crop=data.get("crop", CROP_RULE),
            interpolation=data.get("interpolation", "bilinear"),
            extra=dict(data.get("extra", {})),
        )

    def crop_from_image(self, image: Image.Image | bytes | Path, box: Sequence[float] | None = None) -> Image.Image:
        """Steps 1-2 on a full image (a PIL image, encoded bytes or a path); ``box`` defaults to the frame."""
        from animl_retrain.vision.images import open_image

        box = list(box) if box is not None else [0.0, 0.0, 1.0, 1.0]
        if not isinstance(image, Image.Image):
            source = io.BytesIO(image) if isinstance(image, bytes | bytearray) else image
            image, _ = open_image(source, scale_for=lambda w, h: draft_scale([box], w, h, self.image_size))
        return cut_square(image.convert("RGB"), box, self.image_size)

    def normalise(self, batch):
        """Step 3 on a uint8 tensor batch ``(N, 3, H, W)``: float, scaled to 0..1, ImageNet-normalised.

        ``(x / 255 - mean) / std`` computed as one scale and one shift in place, a third of the memory passes.
        """
        import torch

        std = torch.tensor(self.std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std)).float().to(batch.device).view(1, 3, 1, 1)
        shift = (torch.tensor(self.mean, dtype=torch.float64) / std).float().to(batch.device).view(1, 3, 1, 1)
        return batch.float().mul_(scale).sub_(shift)

    def eval_transform(self):
        """Per-image transform for evaluation and serving: a uint8 ``(3, H, W)`` tensor at ``image_size``."""
        from torchvision.transforms import v2

        return v2.Compose([v2.Resize((self.image_size, self.image_size), antialias=True)])

    def train_transform(self, augmentation: str = "camera-trap"):
        """Per-image training transform on uint8 tensors; ``augmentation`` is 'camera-trap' or 'none'.

        Camera-trap augmentation: horizontal flips (animals face both ways), small rotations and scale changes
        (camera tilt, distance), brightness/contrast/saturation jitter (dawn, dusk, weather) and grayscale
        (night infrared frames). No hue shift: daylight does not turn a fox blue. No vertical flips: animals stand
        on the ground.
        """
        from torchvision.transforms import v2

        size = (self.image_size, self.image_size)
        if augmentation == "none":
            return self.eval_transform()
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.75, 1.0), ratio=(0.9, 1.1), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.RandomRotation(10)], p=0.3),
                ColourJitter(brightness=0.3, contrast=0.3, saturation=0.2),
                v2.RandomGrayscale(p=0.1),
            ]
        )


# ITU-R BT.601 luma weights (what torchvision's grayscale uses) and the RGB -> YIQ matrix.
LUMA = (0.299, 0.587, 0.114)
RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


class ColourJitter:
    """Random brightness, contrast, saturation and hue of a uint8 ``(3, H, W)`` tensor, in one pass.

    The parameters mean what they mean for torchvision's ``ColorJitter`` (factors drawn from ``1 ± brightness``,
    ``1 ± contrast``, ``1 ± saturation``, a hue shift drawn from ``± hue`` of a full turn), applied in that order.
    All four are linear in RGB (contrast blends with the image's mean grey, saturation with each pixel's grey,
    and the hue shift is a rotation about the grey axis in YIQ space, as in NVIDIA DALI: close to torchvision's
    HSV shift in direction and size, not equal to it), so they compose into one 3x3 matrix plus an offset:
    ~1 ms per 224 px crop on one core, where torchvision's ColorJitter (an HSV round trip) takes ~12 ms.
    Random numbers come from torch's generator, which the DataLoader seeds per worker.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0):
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def matrix(self, brightness: float, contrast: float, saturation: float, hue: float):
        """The colour matrix for given factors; the offset is ``(1 - contrast) * brightness * mean grey``."""
        import math

        import torch

        luma = torch.tensor(LUMA, dtype=torch.float64)
        sat = saturation * torch.eye(3, dtype=torch.float64) + (1 - saturation) * luma.expand(3, 3)
        yiq = torch.tensor(RGB_TO_YIQ, dtype=torch.float64)
        cos, sin = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
        turn = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, sin], [0.0, -sin, cos]], dtype=torch.float64)
        return contrast * brightness * (torch.linalg.inv(yiq) @ turn @ yiq @ sat)

    def __call__(self, img):
        """The jitter with factors drawn at random."""
        import torch

        draws = (torch.rand(4, dtype=torch.float64) * 2 - 1).tolist()
        return self.apply(
            img,
            brightness=1 + draws[0] * self.brightness,
            contrast=1 + draws[1] * self.contrast,
            saturation=1 + draws[2] * self.saturation,
            hue=draws[3] * self.hue,
        )

    def apply(self, img, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0, hue: float = 0.0):
        """The jitter with given factors (1 = unchanged) and hue shift (0 = unchanged) on a uint8 tensor."""
        import torch

        x = img.float()
        grey = torch.tensor(LUMA) @ x.mean(dim=(-2, -1))
        out = torch.einsum("ij,jhw->ihw", self.matrix(brightness, contrast, saturation, hue).float(), x)
        out.add_((1 - contrast) * brightness * grey)
        return out.clamp_(0, 255).round_().to(torch.uint8)

    def __repr__(self) -> str:
        return (
            f"ColourJitter(brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue})"
        )
