"""Serve a classifier the way Animl calls it, on a local HTTP server and inside TorchServe.

Animl's API invokes a classifier endpoint with a JSON body ``{"image": "<base64 of the full image>", "bbox":
[ymin, xmin, ymax, xmax]}`` (normalised; ``[0, 0, 1, 1]`` when absent; also sent as a string such as
``"[0.1, 0.2, 0.5, 0.6]"``) and reads back a flat ``{label: probability}`` object whose keys must be the
category ``_id`` values of the model's Animl ``MLModel`` record. :class:`AnimlHandler` implements that contract
on top of :class:`animl_retrain.modeling.inference.Classifier`, so serving runs the very crop, resize and normalisation
that training and evaluation run (one definition, in :mod:`animl_retrain.vision.preprocessing`). Bad requests raise
:class:`BadRequest` with an HTTP status (400, 413, 415) and a message; they never take the server down.

A *model folder* (:mod:`animl_retrain.formats.model_folder`) holds what a handler needs: the label index, the
preprocessing and the model files of one or more backends (``onnx`` runs with ONNX Runtime on CPU).

This module imports only the standard library, numpy and Pillow at load time (torch and onnxruntime are imported
when a model loads), because it also ships inside the TorchServe ``.mar``, next to the preprocessing code.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import logging
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from animl_retrain.formats.model_folder import BACKENDS, MODEL_FILES, PREPROCESSING_FILE, read_labels
from animl_retrain.modeling.inference import Classifier, animl_bbox_to_md
from animl_retrain.serving.request import BadRequest, parse_request
from animl_retrain.vision.images import BadImageError
from animl_retrain.vision.preprocessing import Preprocessing

log = logging.getLogger("animl_retrain.serving")

# Animl resizes originals over 2.8 MB before sending them; base64 adds a third. 16 MiB leaves room for both.
MAX_REQUEST_BYTES = 16 * 1024 * 1024


class OnnxRuntimeModel:
    """An ONNX model run by ONNX Runtime on CPU, callable like a torch module on a float tensor batch."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def to(self, device):
        """ONNX Runtime runs on CPU here; the device is ignored."""
        return self

    def eval(self):
        """Nothing to switch: an exported graph is always in inference mode."""
        return self

    def __call__(self, batch):
        """Logits for a float tensor batch, as a torch tensor."""
        import torch

        (logits,) = self.session.run(None, {self.input_name: batch.detach().cpu().numpy()})
        return torch.from_numpy(logits)


def load_classifier(folder: Path, backend: str = "torchscript", threads: int = 0) -> Classifier:
    """A :class:`Classifier` for a model folder with the chosen backend (see the module docstring)."""
    import torch

    folder = Path(folder)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    path = folder / MODEL_FILES[backend]
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MODEL_FILES[backend]} for the {backend} backend")
    if threads:
        torch.set_num_threads(threads)
    if backend == "pytorch":
        return Classifier.from_checkpoint(path)
    preprocessing = Preprocessing.from_json(json.loads((folder / PREPROCESSING_FILE).read_text()))
    if backend == "onnx":
        model = OnnxRuntimeModel(path, threads)
    else:
        with warnings.catch_warnings():  # torch.jit is deprecated upstream, and still what TorchServe loads
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    return Classifier(model, preprocessing, read_labels(folder))


class AnimlHandler:
    """Animl's classifier contract on top of a :class:`Classifier`: one request in, ``{label: probability}`` out."""

    def __init__(self, classifier: Classifier):
        self.classifier = classifier

    @property
    def labels(self) -> list[str]:
        """The response keys, in the model's output order."""
        return list(self.classifier.labels)

    def predict(self, payload: Any) -> dict[str, float]:
        """Every class's probability for one request, most likely first; raises :class:`BadRequest`."""
        image, bbox = parse_request(payload)
        try:
            (probs,) = self.classifier.classify([image], [animl_bbox_to_md(bbox)])
        except BadImageError as e:
            raise BadRequest(f"'image' cannot be decoded as an image: {e}") from e
        pairs = sorted(zip(self.labels, probs.tolist(), strict=True), key=lambda p: -p[1])
        return {label: float(p) for label, p in pairs}


def _multipart_field(body: bytes, content_type: str) -> bytes:
    """The ``body`` (or ``data``) field of a multipart/form-data request, as ``curl -F body=...`` sends it."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    if not message.is_multipart():
        raise BadRequest("multipart/form-data body cannot be parsed")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") in ("body", "data"):
            return part.get_payload(decode=True) or b""
    raise BadRequest("multipart/form-data request has no 'body' or 'data' field")


class _RequestHandler(BaseHTTPRequestHandler):
    """HTTP front of an :class:`AnimlHandler`: SageMaker's and TorchServe's paths."""

    server: AnimlHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may take to send its request

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, data: Any) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/ping", "/health"):
            self._reply(200, {"status": "Healthy"})
        else:
            self._reply(404, {"error": f"no such path {self.path}; POST /invocations or GET /ping"})

    def do_POST(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if not (parts == ["invocations"] or (parts[0] == "predictions" and 2 <= len(parts) <= 3)):
            self._reply(404, {"error": f"no such path {self.path}; POST /invocations"})
            return
        try:
            payload = self._read_body()
            self._reply(200, self.server.handler.predict(payload))
        except BadRequest as e:
            self._reply(e.status, {"error": e.message})
        except Exception as e:  # a bug or a model failure must not take the server down
            log.exception("inference failed")
            self._reply(500, {"error": f"inference failed: {type(e).__name__}: {e}"})

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("Content-Length is required", status=411)
        try:
            size = int(length)
        except ValueError as e:
            raise BadRequest(f"Content-Length {length!r} is not a number") from e
        if size > self.server.max_request_bytes:
            raise BadRequest(f"request body is {size} bytes, over the limit of {self.server.max_request_bytes}", 413)
        body = self.rfile.read(size)
        if len(body) != size:
            raise BadRequest(f"request body ended after {len(body)} of {size} bytes")
        content_type = self.headers.get("Content-Type", "application/json")
        if content_type.startswith("multipart/form-data"):
            return _multipart_field(body, content_type)
        return body


class AnimlHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server around one :class:`AnimlHandler` (``POST /invocations``, ``GET /ping``)."""

    daemon_threads = True

    def __init__(self, handler: AnimlHandler, host: str = "127.0.0.1", port: int = 0, max_request_bytes: int = 0):
        self.handler = handler
        self.max_request_bytes = max_request_bytes or MAX_REQUEST_BYTES
        super().__init__((host, port), _RequestHandler)

    @property
    def url(self) -> str:
        """Base URL of the server."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class running_server:
    """``with running_server(handler) as server:`` serves on a free loopback port in a thread, stopped on exit."""

    def __init__(self, handler: AnimlHandler, host: str = "127.0.0.1", port: int = 0, max_request_bytes: int = 0):
        self.server = AnimlHTTPServer(handler, host, port, max_request_bytes)
        self._thread = threading.Thread(target=self.server.serve_forever, name="animl-serving", daemon=True)

    def __enter__(self) -> AnimlHTTPServer:
        self._thread.start()
        return self.server

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
