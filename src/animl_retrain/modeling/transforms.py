"""The tensor side of preprocessing, built from a model's :class:`~animl_retrain.vision.preprocessing.Preprocessing`.

Step 3 (normalisation, on whole batches on the model's device), the resize of evaluation and serving, and the
training augmentation (on whole batches: :class:`BatchAugment`), as small callables (torchvision's
``presets.py``). The record they are built from travels with every checkpoint, so evaluation, export and
serving rebuild exactly what training used.
"""

from __future__ import annotations

from animl_retrain.vision.preprocessing import Preprocessing


def normalise(preprocessing: Preprocessing, batch):
    """Step 3 on a uint8 tensor batch ``(N, 3, H, W)``: float, scaled to 0..1, ImageNet-normalised.

    ``(x / 255 - mean) / std`` computed as one scale and one shift in place, a third of the memory passes.
    A float batch comes from :class:`BatchAugment`, which folds this step into its colour matrix: it is
    returned as it is.
    """
    import torch

    if batch.is_floating_point():
        return batch

    std = torch.tensor(preprocessing.std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).float().to(batch.device).view(1, 3, 1, 1)
    shift = (torch.tensor(preprocessing.mean, dtype=torch.float64) / std).float().to(batch.device).view(1, 3, 1, 1)
    return batch.float().mul_(scale).sub_(shift)


def eval_transform(preprocessing: Preprocessing):
    """Per-image transform for evaluation and serving: a uint8 ``(3, H, W)`` tensor at ``image_size``."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize((preprocessing.image_size, preprocessing.image_size), antialias=True)])


def train_transform(preprocessing: Preprocessing, augmentation: str = "camera-trap"):
    """Training transform on uint8 tensors; ``augmentation`` is 'camera-trap' (a :class:`BatchAugment`) or 'none'.

    Camera-trap augmentation: horizontal flips (animals face both ways), small rotations and scale changes
    (camera tilt, distance), brightness/contrast/saturation jitter (dawn, dusk, weather) and grayscale
    (night infrared frames). No hue shift: daylight does not turn a fox blue. No vertical flips: animals stand
    on the ground.
    """
    if augmentation == "none":
        return eval_transform(preprocessing)
    return BatchAugment(preprocessing.image_size, preprocessing.mean, preprocessing.std)


def _uniforms(seeds, k: int):
    """``(len(seeds), k)`` uniform draws in [0, 1), each a function of its item's seed alone (SplitMix64)."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.asarray(seeds, dtype=np.int64).astype(np.uint64)[:, None]
        z = z + np.arange(1, k + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


class BatchAugment:
    """The camera-trap augmentation of a whole uint8 batch ``(N, 3, H, W)`` at once, with no per-crop Python.

    Per item, as torchvision's ``RandomResizedCrop(scale=(0.75, 1), ratio=(0.9, 1.1))``, ``RandomHorizontalFlip``,
    ``RandomApply([RandomRotation(10)], p=0.3)``, :class:`ColourJitter` (brightness 0.3, contrast 0.3, saturation
    0.2) and ``RandomGrayscale(p=0.1)`` would draw them; but the crop, flip and rotation compose into one affine
    map per item, applied to the batch by one ``grid_sample`` (bilinear, zeros outside, as the rotation fills),
    and the colour steps into one 3x3 matrix plus an offset per item, applied by one ``einsum``. Each item's
    draws are a function of its own seed (``seeds``; the epoch sampler's), so a batch's augmentation does not
    depend on which items share it or which worker made it, and a resumed run repeats it exactly.
    """

    batched = True
    CHUNK = 2  # items per pass; one core, 64 crops, batch-wide parameters: 0.85 ms per crop in 2s, 1.0 in 8s

    def __init__(
        self,
        size: int,
        mean=None,
        std=None,
        scale=(0.75, 1.0),
        ratio=(0.9, 1.1),
        degrees=10.0,
        p_rotate=0.3,
        p_grey=0.1,
    ):
        import torch

        self.size, self.scale, self.ratio = size, scale, ratio
        self.degrees, self.p_rotate, self.p_grey = degrees, p_rotate, p_grey
        self.jitter = ColourJitter(brightness=0.3, contrast=0.3, saturation=0.2)
        # With mean and std, step 3 comes folded into the colour matrix: float batches out, normalised already
        # (:func:`normalise` passes them through), which saves a float pass over every batch.
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)

    def __call__(self, batch, seeds=None, out=None):
        """Augment ``batch`` (or one ``(3, H, W)`` image); without ``seeds``, they come from torch's generator.

        ``out``, if given, is an :meth:`empty` batch to write into (a DataLoader worker passes one in shared
        memory, so that handing the batch to the main process copies nothing).
        """
        import torch

        single = batch.dim() == 3
        x = batch[None] if single else batch
        if seeds is None:
            seeds = torch.randint(0, 2**62, (len(x),)).tolist()
        u = torch.from_numpy(_uniforms(seeds, 10)).float()
        # every item's affine map and colour matrix at once: the dozens of small tensor ops cost the same for
        # 1 item as for 64, ~0.15 ms of dispatch per crop when they ran per chunk
        theta, colour, const = self.affine(u[:, :6]), self.colour_matrix(u[:, 6:]), self.constants()
        if out is None:
            out = self.empty(len(x))
        for i in range(0, len(x), self.CHUNK):  # a few items at a time: the float intermediates stay in cache
            part = slice(i, i + self.CHUNK)
            y = self.geometry(x[part], theta[part], const)
            self.colour(y, [p[part] for p in colour], out=out[part], const=const)
        return out[0] if single else out

    def empty(self, n: int, shared: bool = False):
        """An uninitialised output batch for ``n`` items, in shared memory if ``shared``.

        Shared memory is allocated as torch's ``default_collate`` does inside a worker: a batch already there
        travels to the main process as a file descriptor; an ordinary one is first copied into a new segment.
        """
        import torch

        dtype = torch.uint8 if self.std is None else torch.float32
        shape = (n, 3, self.size, self.size)
        if not shared:
            return torch.empty(shape, dtype=dtype)
        storage = torch.UntypedStorage._new_shared(n * 3 * self.size * self.size * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def constants(self) -> dict:
        """The small tensors every chunk uses (grid axes, luma, step 3's scale, shift and bounds), made once."""
        import torch

        base = (torch.arange(self.size, dtype=torch.float32) * 2 + 1) / self.size - 1
        const = {"gx": base[None, None, :, None], "gy": base[None, :, None, None], "luma": torch.tensor(LUMA)}
        if self.std is not None:
            k, mean = 1 / (255 * self.std), self.mean / self.std
            const.update(
                k=k[:, None], shift=mean[:, None], low=-mean.view(3, 1, 1), high=(255 * k - mean).view(3, 1, 1)
            )
        return const

    def affine(self, u):
        """Per item ``(N, 2, 3)``: resized crop, flip and rotation as one affine map (``affine_grid``'s theta)."""
        import math

        import torch

        area = self.scale[0] + u[:, 0] * (self.scale[1] - self.scale[0])
        log_ratio = math.log(self.ratio[0]) + u[:, 1] * (math.log(self.ratio[1]) - math.log(self.ratio[0]))
        w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
        h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
        cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        angle = torch.where(u[:, 5] < self.p_rotate, (u[:, 5] / self.p_rotate * 2 - 1) * self.degrees, 0.0)
        cos, sin = torch.cos(torch.deg2rad(angle)), torch.sin(torch.deg2rad(angle))
        # input = S F R output + t: rotate in the output frame, flip, then scale and move onto the crop.
        return torch.stack(
            [
                torch.stack([w * flip * cos, -w * flip * sin, cx], dim=1),
                torch.stack([h * sin, h * cos, cy], dim=1),
            ],
            dim=1,
        )

    def geometry(self, x, theta, const=None):
        """The affine maps ``theta`` applied to uint8 ``x`` by one ``grid_sample`` at ``size``; returns float."""
        import torch
        import torch.nn.functional as F

        # affine_grid's result, as a broadcast sum (affine_grid's batched product costs twice as much),
        # summed as (row term + shift) + column term: one full-size pass, where (row + column) + shift takes two
        # (the same grid up to float rounding, one unit in the last place)
        const = const or self.constants()
        gx, gy = const["gx"], const["gy"]
        grid = torch.add(gx * theta[:, None, None, :, 0] + theta[:, None, None, :, 2], gy * theta[:, None, None, :, 1])
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def colour_matrix(self, u):
        """Per item: the 3x3 colour matrix and the factor of the mean grey in the offset (step 3 folded in)."""
        import torch

        j = self.jitter
        b, c, s = (1 + (2 * u[:, k] - 1) * f for k, f in enumerate((j.brightness, j.contrast, j.saturation)))
        grey_rows = torch.tensor(LUMA).expand(3, 3)
        matrix = (c * b)[:, None, None] * (s[:, None, None] * torch.eye(3) + (1 - s)[:, None, None] * grey_rows)
        grey = u[:, 3] < self.p_grey
        matrix = torch.where(grey[:, None, None], grey_rows @ matrix, matrix)  # offsets are grey already
        if self.std is not None:  # (y / 255 - mean) / std folded into the matrix
            matrix = (1 / (255 * self.std))[:, None] * matrix
        return matrix, (1 - c) * b

    def colour(self, x, colour, out=None, const=None):
        """Brightness, contrast, saturation, grayscale and step 3: :meth:`colour_matrix`'s ``colour`` on ``x``.

        The offset blends with each item's mean grey (contrast). With ``out`` (a contiguous batch of the output
        dtype) the result is written there.
        """
        import torch

        const = const or self.constants()
        matrix, lift = colour
        offset = (lift * (x.mean(dim=(2, 3)) @ const["luma"]))[:, None, None].expand(-1, 3, 1)
        if self.std is None:  # uint8 out; + 0.5 makes the truncating conversion round, without a pass of its own
            y = torch.baddbmm(offset + 0.5, matrix, x.flatten(2)).view_as(x).clamp_(0, 255)
            return y.to(torch.uint8) if out is None else out.copy_(y)
        # normalised float out: the offset scaled as the matrix, the clamp to 0..255 moved; the product is written
        # straight into the output batch (no intermediate, no copy pass)
        y = torch.empty_like(x) if out is None else out
        torch.baddbmm(const["k"] * offset - const["shift"], matrix, x.flatten(2), out=y.view(len(x), 3, -1))
        return y.clamp_(const["low"], const["high"])

    def __repr__(self) -> str:
        return f"BatchAugment(size={self.size}, scale={self.scale}, ratio={self.ratio}, degrees={self.degrees})"


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
