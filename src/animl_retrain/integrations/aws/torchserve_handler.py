"""TorchServe entry point of the packaged classifier: ``handle(data, context)``, shipped in the ``.mar``.

TorchServe imports this file from the extracted archive (the archive's folder is on its Python path, so the
``animl_retrain`` modules shipped beside it are the ones imported), calls ``handle(None, context)`` once to load
the model and then ``handle(batch, context)`` with one dict per request whose ``body`` (or form field
``data``/``body``) holds the request: bytes, text, or a dict when TorchServe already decoded
``application/json``. Each request gets its own answer: ``{label: probability}`` for every class, or
``{"error": ...}`` with its HTTP status set through ``context.set_response_status`` (4xx for a bad request),
so one bad request in a batch never fails the others.
"""

from __future__ import annotations

import logging
import os

from animl_retrain.serving.http import AnimlHandler, load_classifier
from animl_retrain.serving.request import BadRequest

log = logging.getLogger(__name__)
_handler: AnimlHandler | None = None


def _load(context) -> AnimlHandler:
    model_dir = context.system_properties.get("model_dir") or os.getcwd()
    threads = int(os.environ.get("ANIML_TORCH_THREADS", "0") or 0)
    return AnimlHandler(load_classifier(model_dir, backend="torchscript", threads=threads))


def handle(data, context):
    """TorchServe's function entry point (see the module docstring)."""
    global _handler
    if _handler is None:
        _handler = _load(context)
        log.info("loaded the classifier; labels %s", _handler.labels)
    if data is None:
        return None
    answers = []
    for idx, row in enumerate(data):
        payload = row.get("data") if row.get("data") is not None else row.get("body")
        try:
            answers.append(_handler.predict(payload))
        except BadRequest as e:
            context.set_response_status(e.status, e.message, idx)
            answers.append({"error": e.message})
        except Exception as e:  # one failing request must not fail the rest of the batch
            log.exception("inference failed")
            context.set_response_status(500, "inference failed", idx)
            answers.append({"error": f"inference failed: {type(e).__name__}: {e}"})
    return answers
