"""Classify detections with a trained model: the one code path behind evaluation, MLflow models and serving."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from animl_retrain.core.errors import PipelineError
from animl_retrain.modeling import transforms
from animl_retrain.vision.preprocessing import Preprocessing


def animl_bbox_to_md(bbox: Sequence[float]) -> list[float]:
    """Animl's ``[ymin, xmin, ymax, xmax]`` (normalised) to MegaDetector's ``[x, y, w, h]``."""
    ymin, xmin, ymax, xmax = (float(v) for v in bbox)
    return [xmin, ymin, xmax - xmin, ymax - ymin]


class Classifier:
    """A model with its preprocessing and labels, ready to classify crops or boxes on full images."""

    def __init__(self, model, preprocessing: Preprocessing, labels: list[str], device: str = "cpu"):
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocessing = preprocessing
        self.labels = labels
        self._resize = transforms.eval_transform(preprocessing)

    @classmethod
    def from_checkpoint(cls, path: Path, device: str = "cpu") -> Classifier:
        """Load a checkpoint written by the train stage."""
        from animl_retrain.modeling.checkpoint import load_checkpoint, model_from_checkpoint

        model, preprocessing, labels = model_from_checkpoint(load_checkpoint(path))
        return cls(model, preprocessing, labels, device)

    def probabilities(self, crops: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``(N, classes)`` for square crops (any size; resized to the model's input)."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(crops), batch_size):
                batch = torch.stack(
                    [
                        self._resize(
                            torch.from_numpy(np.asarray(c.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
                        )
                        for c in crops[start : start + batch_size]
                    ]
                )
                logits = self.model(transforms.normalise(self.preprocessing, batch.to(self.device)))
                out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def classify(
        self, images: Sequence[bytes | Path | Image.Image], boxes: Sequence[Sequence[float] | None]
    ) -> np.ndarray:
        """Probabilities for one box per full image (MegaDetector ``[x, y, w, h]``; None means the whole frame)."""
        if len(images) != len(boxes):
            raise PipelineError(f"{len(images)} images but {len(boxes)} boxes")
        crops = [self.preprocessing.crop_from_image(img, box) for img, box in zip(images, boxes, strict=True)]
        return self.probabilities(crops)


def pick_device(name: str):
    """Resolve 'auto' to CUDA when present."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def predict_logits(model, loader, preprocessing, device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and targets for every item of ``loader``."""
    import torch

    model.eval()
    logits, targets = [], []
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        for x, y in loader:
            out = model(transforms.normalise(preprocessing, x.to(device, non_blocking=True)))
            logits.append(out.float().cpu().numpy())
            targets.append(y.numpy())
    return np.concatenate(logits), np.concatenate(targets)


def predict(model, loader, preprocessing, device) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and targets for every item of ``loader``."""
    from animl_retrain.modeling.metrics import softmax

    logits, targets = predict_logits(model, loader, preprocessing, device)
    return softmax(logits), targets
