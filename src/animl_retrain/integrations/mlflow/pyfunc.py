"""The registered MLflow model: a pyfunc that takes Animl-style requests and returns every class's probability.

Input: a DataFrame with an ``image`` column (encoded image bytes, or base64 text) and an optional ``bbox``
column in Animl's order ``[ymin, xmin, ymax, xmax]``, normalised (missing means the whole frame). Output: a
DataFrame with one column per label. The checkpoint, label index and preprocessing are the model's artifacts,
and this package travels in the model's ``code/`` folder, so ``mlflow.pyfunc.load_model("models:/NAME@champion")``
works in a fresh environment with torch, torchvision and pillow.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

import animl_retrain
from animl_retrain.serving.request import decode_image, parse_bbox

ARTIFACT_PATH = "model"


class AnimlClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`animl_retrain.modeling.inference.Classifier`.

    Rows are decoded by :mod:`animl_retrain.serving.request`, as serving decodes requests: a bad image or box
    raises :class:`~animl_retrain.serving.request.BadRequest` (a PipelineError) naming the problem.
    """

    def load_context(self, context):
        """Rebuild the model from the logged checkpoint."""
        from animl_retrain.modeling.inference import Classifier

        self.classifier = Classifier.from_checkpoint(Path(context.artifacts["checkpoint"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Probabilities for each row's image and box."""
        from animl_retrain.modeling.inference import animl_bbox_to_md

        images = [decode_image(v) for v in model_input["image"]]
        column = model_input["bbox"] if "bbox" in model_input.columns else [None] * len(images)
        # A missing box (None, or NaN where pandas filled a gap) is the whole frame, as in a request without one.
        missing = [b is None or (isinstance(b, float) and pd.isna(b)) for b in column]
        boxes = [animl_bbox_to_md(parse_bbox(None if gone else b)) for b, gone in zip(column, missing, strict=True)]
        probs = self.classifier.classify(images, boxes)
        return pd.DataFrame(probs, columns=self.classifier.labels)


def example_input() -> pd.DataFrame:
    """A one-row request (a small grey JPEG, no box) that documents the input format in the registry."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (128, 128, 128)).save(buf, format="JPEG")
    return pd.DataFrame({"image": [buf.getvalue()], "bbox": [[0.0, 0.0, 1.0, 1.0]]})


def log_model(checkpoint: Path):
    """Log the checkpoint as a pyfunc model in the active MLflow run; returns MLflow's ModelInfo."""
    import numpy
    import PIL
    import pydantic
    import torch
    import torchvision
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec(Array("double"), "bbox", required=False)]),
    )
    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"pillow=={PIL.__version__}",
        f"numpy=={numpy.__version__}",
        f"pandas=={pd.__version__}",
        f"pydantic=={pydantic.__version__}",
    ]
    return mlflow.pyfunc.log_model(
        name=ARTIFACT_PATH,
        python_model=str(Path(__file__).with_name("pyfunc_code.py")),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(animl_retrain.__file__).parent)],
        pip_requirements=requirements,
        signature=signature,
        input_example=example_input(),
    )
