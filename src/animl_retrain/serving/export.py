"""Export a trained classifier for serving, and prove the exported files compute what PyTorch computes.

* **TorchScript**, traced on CPU (a GPU-traced file failed on Animl's CPU-only serverless endpoints), for
  TorchServe.
* **ONNX** (opset :data:`ONNX_OPSET`, dynamic batch size) through ``torch.onnx.export``'s ``torch.export``
  path, run with ONNX Runtime on CPU. Memory-efficient swish (lukemelas' EfficientNet's custom autograd
  function, which neither tracer nor ONNX can export) is switched to the plain swish first; torchvision's
  EfficientNet uses ``nn.SiLU`` and exports as it is.

:func:`check_parity` runs the PyTorch model and each exported file through the same :class:`Classifier` code
path (same crop, resize and normalisation) on real images and compares the class probabilities: the largest
absolute difference must stay below the tolerance (default :data:`DEFAULT_TOLERANCE`), or nothing ships.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from pathlib import Path

import numpy as np

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import write_json
from animl_retrain.core.logging import log
from animl_retrain.formats.model_folder import LABELS_FILE, MODEL_FILES, PARITY_FILE, PREPROCESSING_FILE
from animl_retrain.modeling.inference import Classifier
from animl_retrain.serving.http import load_classifier

ONNX_OPSET = 18
# Float32 kernels differ in summation order between PyTorch and ONNX Runtime; real crops stay around 1e-6.
DEFAULT_TOLERANCE = 1e-4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def prepare_for_export(model):
    """The model on CPU, in eval mode, with export-friendly activations."""
    model = model.cpu().eval()
    for module in model.modules():
        if hasattr(module, "set_swish"):  # lukemelas' EfficientNet: MemoryEfficientSwish cannot be traced
            module.set_swish(memory_efficient=False)
    return model


def _example(image_size: int, batch: int = 2):
    import torch

    return torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def export_torchscript(model, image_size: int, path: Path) -> Path:
    """Trace ``model`` on CPU at ``image_size`` and save it as TorchScript."""
    import torch

    model = prepare_for_export(model)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        traced = torch.jit.trace(model, (_example(image_size),), check_trace=False)  # parity checks it instead
    traced.save(str(path))
    return path


def export_onnx(model, image_size: int, path: Path) -> Path:
    """Export ``model`` to ONNX with a dynamic batch dimension and check the graph."""
    import onnx
    import torch

    model = prepare_for_export(model)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (_example(image_size),),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=ONNX_OPSET,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path))
    return path


def parity_images(source: Path, samples: int) -> list[Path]:
    """Up to ``samples`` images from a folder (searched recursively), spread evenly over its sorted listing."""
    source = Path(source)
    if not source.is_dir():
        raise PipelineError(f"parity images: {source} is not a folder")
    found = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise PipelineError(f"parity images: no .jpg/.jpeg/.png under {source}; the exports cannot be checked")
    step = max(1, len(found) // samples)
    return found[::step][:samples]


def check_parity(reference: Classifier, candidate: Classifier, images: list[Path], tolerance: float) -> dict:
    """Compare two classifiers' probabilities on ``images``: max abs difference and top-1 agreement."""
    boxes = [None] * len(images)
    ref = reference.classify(images, boxes)
    got = candidate.classify(images, boxes)
    diff = float(np.abs(ref - got).max())
    return {
        "images": len(images),
        "max_abs_diff": diff,
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
        "tolerance": tolerance,
        "passed": bool(diff <= tolerance),
    }


def export_model_folder(
    checkpoint: Path, out: Path, images: list[Path], tolerance: float = DEFAULT_TOLERANCE
) -> dict[str, dict]:
    """Write a complete model folder (checkpoint, TorchScript, ONNX, labels, preprocessing) and check parity.

    Returns the parity results by backend (also written to ``parity.json``); raises PipelineError naming the
    backend and the difference when an export does not match PyTorch within ``tolerance``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reference = Classifier.from_checkpoint(checkpoint)
    preprocessing, labels = reference.preprocessing, reference.labels
    if Path(checkpoint).resolve() != (out / MODEL_FILES["pytorch"]).resolve():
        shutil.copyfile(checkpoint, out / MODEL_FILES["pytorch"])
    write_json(out / LABELS_FILE, {str(i): label for i, label in enumerate(labels)})
    write_json(out / PREPROCESSING_FILE, preprocessing.to_json())

    export_torchscript(reference.model, preprocessing.image_size, out / MODEL_FILES["torchscript"])
    export_onnx(reference.model, preprocessing.image_size, out / MODEL_FILES["onnx"])
    results = {}
    for backend in ("torchscript", "onnx"):
        results[backend] = check_parity(reference, load_classifier(out, backend), images, tolerance)
        log.info(
            "parity %s: max |p - p_torch| = %.2e on %d images (tolerance %.0e), top-1 agreement %.3f",
            backend,
            results[backend]["max_abs_diff"],
            len(images),
            tolerance,
            results[backend]["top1_agreement"],
        )
    write_json(out / PARITY_FILE, results)
    failed = {b: r["max_abs_diff"] for b, r in results.items() if not r["passed"]}
    if failed:
        raise PipelineError(
            "exported model does not match PyTorch: "
            + ", ".join(f"{b} max |Δp| = {d:.2e}" for b, d in failed.items())
            + f" (tolerance {tolerance:.0e}); nothing is shipped"
        )
    return results
