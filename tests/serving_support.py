"""Helpers for the serving, deploy and predict tests: a tiny model, its registration, and moto on loopback."""

from __future__ import annotations

import contextlib
import socket
import struct
import urllib.request
from pathlib import Path

from animl_retrain.modeling.backbones import build_model
from animl_retrain.modeling.checkpoint import save_checkpoint
from animl_retrain.vision.preprocessing import Preprocessing

LABELS = ["bird", "fox", "lizard", "rodent", "skunk"]


def tiny_checkpoint(path: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A MobileNetV3-small checkpoint whose head is scaled up so that its probabilities are far from uniform."""
    import torch

    torch.manual_seed(seed)
    model = build_model("mobilenet_v3_small", len(LABELS))
    with torch.no_grad():
        head = model.classifier[-1]
        head.weight.normal_(0, 2.0)
        head.bias.normal_(0, 1.0)
    save_checkpoint(path, model, "mobilenet_v3_small", LABELS, Preprocessing(image_size=image_size))
    return path


def register_checkpoint(name: str, checkpoint: Path, aliases=("champion",), tags=None) -> str:
    """Log ``checkpoint`` as the project's pyfunc model in a new MLflow run and register it; returns the version."""
    import mlflow

    from animl_retrain.integrations.mlflow.pyfunc import log_model

    mlflow.set_experiment("serving-tests")
    with mlflow.start_run():
        info = log_model(checkpoint)
    version = mlflow.register_model(info.model_uri, name, tags=tags or {}).version
    for alias in aliases:
        mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
    return str(version)


def add_update_endpoint_to_moto() -> None:
    """moto 5.2.5 implements CreateEndpoint but not UpdateEndpoint; add it with SageMaker's semantics.

    The endpoint keeps its name and switches to the new configuration's variants; moto's endpoints are
    InService at once, as they are after a successful update.
    """
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow
    from moto.sagemaker.exceptions import ValidationError
    from moto.sagemaker.models import SageMakerModelBackend
    from moto.sagemaker.responses import SageMakerResponse

    if hasattr(SageMakerModelBackend, "update_endpoint"):
        return

    def update_endpoint(self, endpoint_name: str, endpoint_config_name: str):
        if endpoint_name not in self.endpoints:
            raise ValidationError(message=f"Could not find endpoint '{endpoint_name}'.")
        config = self.describe_endpoint_config(endpoint_config_name)
        endpoint = self.endpoints[endpoint_name]
        endpoint.endpoint_config_name = endpoint_config_name
        endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
        endpoint.last_modified_time = utcnow()
        return endpoint

    def respond(self):
        endpoint = self.sagemaker_backend.update_endpoint(
            self._get_param("EndpointName"), self._get_param("EndpointConfigName")
        )
        return ActionResult({"EndpointArn": endpoint.arn})

    SageMakerModelBackend.update_endpoint = update_endpoint
    SageMakerResponse.update_endpoint = respond


@contextlib.contextmanager
def moto_server():
    """moto in server mode on a free loopback port (SageMaker and SSM); stopped on exit."""
    from moto.server import ThreadedMotoServer

    add_update_endpoint_to_moto()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    # moto's backends live in this process and outlive a server: start every test from an empty account
    urllib.request.urlopen(urllib.request.Request(url + "/moto-api/reset", method="POST"), timeout=30).close()
    try:
        yield url
    finally:
        server.stop()


def read_torchserve_response(frame: bytes) -> list[tuple[int, str, bytes]]:
    """Decode TorchServe's predict response frame into ``(http status, phrase, body)`` per request."""
    pos = 0

    def integer() -> int:
        nonlocal pos
        (value,) = struct.unpack_from("!i", frame, pos)
        pos += 4
        return value

    def buffer() -> bytes:
        nonlocal pos
        size = integer()
        data = frame[pos : pos + max(size, 0)]
        pos += max(size, 0)
        return data

    integer()  # batch status code
    buffer()  # batch message
    answers = []
    while pos < len(frame):
        size = integer()
        if size == -1:  # end of the batch
            break
        pos += size  # request id
        buffer()  # content type
        status = integer()
        phrase = buffer().decode()
        for _ in range(integer()):  # response headers
            buffer()
            buffer()
        answers.append((status, phrase, buffer()))
    return answers
