"""Animl's classifier request: the one decoder of its image and its bbox, for serving and the MLflow model.

Animl's API sends ``{"image": "<base64 of the full image>", "bbox": [ymin, xmin, ymax, xmax]}`` (normalised;
``[0, 0, 1, 1]`` when absent; also sent as a string such as ``"[0.1, 0.2, 0.5, 0.6]"``). The HTTP server, the
TorchServe handler and the registered MLflow model all decode requests here, so they accept and refuse the same
inputs: a box outside 0..1 or inverted is a :class:`BadRequest` everywhere.

Nothing beyond the standard library and core: this module ships inside the TorchServe archive.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from animl_retrain.core.checks import finite_number
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import decode_json

FULL_FRAME = (0.0, 0.0, 1.0, 1.0)


class BadRequest(PipelineError):
    """A request the handler refuses: ``status`` is the HTTP status to answer with, ``message`` says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def parse_bbox(value: Any) -> tuple[float, float, float, float]:
    """Animl's ``[ymin, xmin, ymax, xmax]`` from a list or a string; checked to lie in 0..1 and not be inverted."""
    if value is None:
        return FULL_FRAME
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",")]
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"bbox {value!r:.100} is not four numbers [ymin, xmin, ymax, xmax]") from e
    if hasattr(value, "tolist"):  # a numpy array, as the MLflow model's bbox column holds them
        value = value.tolist()
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise BadRequest(f"bbox must be four numbers [ymin, xmin, ymax, xmax], got {value!r:.100}")
    if not all(finite_number(v) for v in value):
        raise BadRequest(f"bbox must be four finite numbers, got {value!r:.100}")
    ymin, xmin, ymax, xmax = (float(v) for v in value)
    if not all(0.0 <= v <= 1.0 for v in (ymin, xmin, ymax, xmax)):
        raise BadRequest(f"bbox {list(value)} is not normalised: every value must lie in 0..1")
    if ymax <= ymin or xmax <= xmin:
        raise BadRequest(f"bbox {list(value)} is empty or inverted: need ymin < ymax and xmin < xmax")
    return ymin, xmin, ymax, xmax


def decode_image(value: Any) -> bytes:
    """The image bytes of a request's ``image``: base64 text (line breaks allowed), or bytes already decoded.

    JSON bodies carry text; the MLflow model's ``image`` column may hold the encoded image bytes themselves.
    """
    if value is None or value == "" or value == b"":
        raise BadRequest("request has no 'image': send the full image as base64 text")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise BadRequest(f"'image' must be base64 text or image bytes, got {type(value).__name__}")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"'image' is not valid base64: {e}") from e
    if not data:
        raise BadRequest("'image' decodes to zero bytes")
    return data


def parse_request(payload: Any) -> tuple[bytes, tuple[float, float, float, float]]:
    """The image bytes and Animl bbox of one request body (JSON bytes/text, or a dict TorchServe already parsed)."""
    if isinstance(payload, bytes | bytearray | str):
        try:
            payload = decode_json(payload, "request body")
        except PipelineError as e:
            raise BadRequest(str(e)) from e
    if not isinstance(payload, dict):
        raise BadRequest('request body must be a JSON object {"image": ..., "bbox": [ymin, xmin, ymax, xmax]}')
    return decode_image(payload.get("image")), parse_bbox(payload.get("bbox"))
