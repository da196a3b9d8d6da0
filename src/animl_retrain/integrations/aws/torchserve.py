"""Package a model folder the way Animl deploys classifiers: a TorchServe ``.mar`` inside ``model.tar.gz``.

The ``.mar`` is written here directly (no ``torch-model-archiver`` needed at run time), following the format
that torch-model-archiver 0.12 writes and TorchServe 0.12 reads: a zip archive holding

* ``MAR-INF/MANIFEST.json``: ``{"createdOn": "DD/MM/YYYY HH:MM:SS", "runtime": "python", "model":
  {"modelName", "serializedFile", "handler", "modelVersion"}, "archiverVersion": "0.12.0"}``;
* the serialized model (``model.torchscript.pt``, traced on CPU), named by ``serializedFile``;
* the handler module (``animl_handler.py``, a copy of :mod:`animl_retrain.integrations.aws.torchserve_handler`);
* ``index_to_name.json`` and ``preprocessing.json``;
* the ``animl_retrain`` modules the handler imports (:data:`SHIPPED_MODULES`), so the container runs the
  preprocessing code the model was trained and evaluated with, not a re-implementation.

TorchServe unpacks the archive into a folder that is on the handler's Python path. SageMaker unpacks
``model.tar.gz`` (the ``.mar`` at its root) into ``/opt/ml/model``, TorchServe's model store in the serving image
(``docker/serving/``).
"""

from __future__ import annotations

import datetime as dt
import json
import tarfile
import zipfile
from pathlib import Path

import animl_retrain
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import atomic_path
from animl_retrain.formats.model_folder import LABELS_FILE, MODEL_FILES, PREPROCESSING_FILE

ARCHIVER_VERSION = "0.12.0"
HANDLER_FILE = "animl_handler.py"
# Everything the handler and serving/http.py import (paths under animl_retrain/), and nothing that needs more than
# numpy, Pillow, torch and torchvision. tests/test_serving.py loads the archive in TorchServe from these alone.
SHIPPED_MODULES = (
    "__init__.py",
    "core/__init__.py",
    "core/checks.py",
    "core/errors.py",
    "core/io.py",
    "core/logging.py",
    "formats/__init__.py",
    "formats/model_folder.py",
    "vision/__init__.py",
    "vision/images.py",
    "vision/preprocessing.py",
    "modeling/__init__.py",
    "modeling/inference.py",
    "modeling/transforms.py",
    "serving/__init__.py",
    "serving/http.py",
    "serving/request.py",
)


def manifest(model_name: str, version: str) -> dict:
    """The ``MAR-INF/MANIFEST.json`` of our archive."""
    return {
        "createdOn": dt.datetime.now().strftime("%d/%m/%Y %H:%M:%S"),
        "runtime": "python",
        "model": {
            "modelName": model_name,
            "serializedFile": MODEL_FILES["torchscript"],
            "handler": HANDLER_FILE,
            "modelVersion": version,
        },
        "archiverVersion": ARCHIVER_VERSION,
    }


def build_mar(folder: Path, dest: Path, model_name: str, version: str) -> Path:
    """Write the TorchServe archive of a model folder (see the module docstring) to ``dest``."""
    folder = Path(folder)
    needed = [MODEL_FILES["torchscript"], LABELS_FILE, PREPROCESSING_FILE]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise PipelineError(f"cannot package {folder}: missing {', '.join(missing)} (export the model first)")
    package = Path(animl_retrain.__file__).parent
    with atomic_path(Path(dest)) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as mar:
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest(model_name, version), indent=2))
        for name in needed:
            mar.write(folder / name, name)
        mar.write(Path(__file__).with_name("torchserve_handler.py"), HANDLER_FILE)
        for module in SHIPPED_MODULES:
            mar.write(package / module, f"animl_retrain/{module}")
    return Path(dest)


def build_model_tar(mar: Path, dest: Path) -> Path:
    """``model.tar.gz`` for SageMaker: the ``.mar`` at the root of a gzipped tar."""
    with atomic_path(Path(dest)) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(mar, arcname=Path(mar).name)
    return Path(dest)
