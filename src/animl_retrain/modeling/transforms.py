"""The tensor side of preprocessing, built from a model's :class:`~animl_retrain.vision.preprocessing.Preprocessing`.

Step 3 (normalisation, on whole batches on the model's device), the resize of evaluation and serving, and the
training augmentation, as small callables (torchvision's ``presets.py``). The record they are built from travels
with every checkpoint, so evaluation, export and serving rebuild exactly what training used.
"""

from __future__ import annotations

from animl_retrain.vision.preprocessing import Preprocessing


def normalise(preprocessing: Preprocessing, batch):
    """Step 3 on a uint8 tensor batch ``(N, 3, H, W)``: float, scaled to 0..1, ImageNet-normalised.

    ``(x / 255 - mean) / std`` computed as one scale and one shift in place, a third of the memory passes.
    """
    import torch

    std = torch.tensor(preprocessing.std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).float().to(batch.device).view(1, 3, 1, 1)
    shift = (torch.tensor(preprocessing.mean, dtype=torch.float64) / std).float().to(batch.device).view(1, 3, 1, 1)
    return batch.float().mul_(scale).sub_(shift)


def eval_transform(preprocessing: Preprocessing):
    """Per-image transform for evaluation and serving: a uint8 ``(3, H, W)`` tensor at ``image_size``."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize((preprocessing.image_size, preprocessing.image_size), antialias=True)])


def train_transform(preprocessing: Preprocessing, augmentation: str = "camera-trap"):
    """Per-image training transform on uint8 tensors; ``augmentation`` is 'camera-trap' or 'none'.

    Camera-trap augmentation: horizontal flips (animals face both ways), small rotations and scale changes
    (camera tilt, distance), brightness/contrast/saturation jitter (dawn, dusk, weather) and grayscale
    (night infrared frames). No hue shift: daylight does not turn a fox blue. No vertical flips: animals stand
    on the ground.
    """
    from torchvision.transforms import v2

    size = (preprocessing.image_size, preprocessing.image_size)
    if augmentation == "none":
        return eval_transform(preprocessing)
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
