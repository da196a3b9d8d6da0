"""A model folder: what predict, serve, export and the TorchServe archive read; what pull-model and deploy write.

It holds ``index_to_name.json`` (or ``label_index.json``), ``preprocessing.json`` and one or more of ``model.pt``
(a training checkpoint, backend ``pytorch``), ``model.torchscript.pt`` (``torchscript``) and ``model.onnx``
(``onnx``); ``model.json`` says where a pulled model came from, ``parity.json`` how close the exports are.

Standard library only: this module ships inside the TorchServe archive.
"""

from __future__ import annotations

import json
from pathlib import Path

BACKENDS = ("pytorch", "torchscript", "onnx")
MODEL_FILES = {"pytorch": "model.pt", "torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
LABELS_FILE = "index_to_name.json"  # TorchServe's name for the label index
LABEL_INDEX_FILE = "label_index.json"  # the pipeline's name for it (formats.layout)
PREPROCESSING_FILE = "preprocessing.json"
INFO_FILE = "model.json"
PARITY_FILE = "parity.json"


def read_labels(folder: Path) -> list[str]:
    """The label index of a model folder, in output order."""
    for name in (LABELS_FILE, LABEL_INDEX_FILE):
        path = Path(folder) / name
        if path.is_file():
            index = json.loads(path.read_text())
            return [index[str(i)] for i in range(len(index))]
    raise FileNotFoundError(f"{folder} has no {LABELS_FILE} or {LABEL_INDEX_FILE}")
