import base64
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from animl_retrain.core.errors import PipelineError
from animl_retrain.formats.layout import CROPS_DIR
from animl_retrain.integrations.aws import torchserve as packaging
from animl_retrain.modeling.inference import Classifier, animl_bbox_to_md
from animl_retrain.serving import export as model_export
from animl_retrain.serving import http as serving
from animl_retrain.serving import request as animl_request
from tests.conftest import jpeg_bytes
from tests.serving_support import LABELS, read_torchserve_response, tiny_checkpoint

CLI = [sys.executable, "-m", "animl_retrain.cli"]
BOX = [0.1, 0.2, 0.6, 0.7]  # Animl order: ymin, xmin, ymax, xmax


@pytest.fixture(scope="module")
def exported(tmp_path_factory, stage_outputs):
    """A tiny model exported to a model folder, checked on the demo project's crops."""
    root = tmp_path_factory.mktemp("exported")
    checkpoint = tiny_checkpoint(root / "ckpt.pt")
    images = model_export.parity_images(stage_outputs["crops"] / CROPS_DIR, 24)
    parity = model_export.export_model_folder(checkpoint, root / "model", images)
    return SimpleNamespace(folder=root / "model", checkpoint=checkpoint, parity=parity, images=images)


@pytest.fixture(scope="module")
def photo(small_demo):
    """A full-size demo camera-trap frame, as Animl would send it."""
    return next(Path(small_demo.images_uri).rglob("*.jpg")).read_bytes()


def request(image: bytes, bbox=BOX) -> bytes:
    body = {"image": base64.b64encode(image).decode()}
    if bbox is not None:
        body["bbox"] = bbox
    return json.dumps(body).encode()


def post(url: str, body: bytes, content_type: str = "application/json"):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_requests_in_every_shape_animl_sends():
    image = jpeg_bytes()
    for bbox in ([0.1, 0.2, 0.6, 0.7], "[0.1, 0.2, 0.6, 0.7]", "0.1,0.2,0.6,0.7", [0, 0, 1, 1]):
        data, box = animl_request.parse_request(request(image, bbox))
        assert data == image and len(box) == 4
    assert animl_request.parse_request(request(image, None))[1] == animl_request.FULL_FRAME
    assert animl_request.parse_request({"image": base64.b64encode(image).decode()})[1] == animl_request.FULL_FRAME
    wrapped = base64.encodebytes(image).decode()  # base64 with line breaks, as `base64` on Linux writes it
    assert animl_request.parse_request({"image": wrapped, "bbox": BOX})[0] == image


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"bbox": [0, 0, 1, 1]}', "no 'image'"),
        (b'{"image": ""}', "no 'image'"),
        (b'{"image": "not base64!"}', "not valid base64"),
        (b'{"image": 42}', "must be base64 text"),
        (b"{broken", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_bodies_are_400(body, message):
    with pytest.raises(animl_request.BadRequest, match=message) as e:
        animl_request.parse_request(body)
    assert e.value.status == 400


@pytest.mark.parametrize(
    ("bbox", "message"),
    [
        ([0.1, 0.2, 1.6, 0.7], "not normalised"),
        ([-0.1, 0.2, 0.6, 0.7], "not normalised"),
        ([0.6, 0.2, 0.1, 0.7], "inverted"),
        ([0.1, 0.7, 0.6, 0.7], "inverted"),
        ([0.1, 0.2, 0.6], "four numbers"),
        ("abc", "not four numbers"),
        ("[0.1, 0.2]", "four numbers"),
        ([True, 0, 1, 1], "finite numbers"),
        (["0.1", 0, 1, 1], "finite numbers"),
        ({"ymin": 0}, "four numbers"),
    ],
)
def test_bad_boxes_are_400(bbox, message):
    with pytest.raises(animl_request.BadRequest, match=message) as e:
        animl_request.parse_request(request(jpeg_bytes(), bbox))
    assert e.value.status == 400


def test_non_finite_boxes_are_400():
    with pytest.raises(animl_request.BadRequest, match="finite"):
        animl_request.parse_request(b'{"image": "' + base64.b64encode(jpeg_bytes()) + b'", "bbox": [NaN, 0, 1, 1]}')


def test_exports_match_pytorch_on_real_crops(exported):
    for backend in ("torchscript", "onnx"):
        result = exported.parity[backend]
        assert result["passed"] and result["max_abs_diff"] <= model_export.DEFAULT_TOLERANCE
        assert result["images"] == len(exported.images) >= 20 and result["top1_agreement"] == 1.0
    assert json.loads((exported.folder / "parity.json").read_text()) == exported.parity
    assert serving.read_labels(exported.folder) == LABELS


def test_a_mismatching_export_is_refused(exported, tmp_path):
    other = Classifier.from_checkpoint(tiny_checkpoint(tmp_path / "other.pt", seed=1))
    result = model_export.check_parity(other, serving.load_classifier(exported.folder, "onnx"), exported.images, 1e-4)
    assert not result["passed"] and result["max_abs_diff"] > 1e-2


@pytest.mark.slow
def test_efficientnet_exports_to_onnx(tmp_path, exported):
    """EfficientNet is the family users report ONNX export trouble with; about a minute on 2 cores."""
    import torch

    from animl_retrain.modeling.backbones import build_model
    from animl_retrain.modeling.checkpoint import save_checkpoint
    from animl_retrain.vision.preprocessing import Preprocessing

    torch.manual_seed(0)
    model = build_model("efficientnet_b0", 3)
    save_checkpoint(tmp_path / "b0.pt", model, "efficientnet_b0", ["a", "b", "c"], Preprocessing(image_size=32))
    parity = model_export.export_model_folder(tmp_path / "b0.pt", tmp_path / "out", exported.images[:4])
    assert parity["onnx"]["passed"] and parity["torchscript"]["passed"]


def test_memory_efficient_swish_is_switched_off_before_export():
    from torch import nn

    class LukemelasStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.memory_efficient = True

        def set_swish(self, memory_efficient=True):
            self.memory_efficient = memory_efficient

    model = nn.Sequential(LukemelasStyle())
    model_export.prepare_for_export(model)
    assert model[0].memory_efficient is False


def test_the_mlflow_model_decodes_rows_as_serving_decodes_requests(exported, photo):
    """One decoder: wrapped base64 is accepted, and a box outside 0..1 or inverted is refused, as serving refuses it."""
    import pandas as pd

    from animl_retrain.integrations.mlflow.pyfunc import AnimlClassifierModel

    pyfunc = AnimlClassifierModel()
    pyfunc.load_context(SimpleNamespace(artifacts={"checkpoint": str(exported.checkpoint)}))
    wrapped = base64.encodebytes(photo).decode()
    rows = pd.DataFrame({"image": [photo, wrapped], "bbox": [BOX, BOX]})
    first, second = pyfunc.predict(None, rows).to_numpy()
    assert first.tolist() == pytest.approx(second.tolist())
    for bbox, message in (([0.6, 0.2, 0.1, 0.7], "inverted"), ([0.1, 0.2, 1.5, 0.7], "normalised")):
        with pytest.raises(animl_request.BadRequest, match=message):
            pyfunc.predict(None, pd.DataFrame({"image": [photo], "bbox": [bbox]}))
        with pytest.raises(animl_request.BadRequest, match=message):
            serving.AnimlHandler(serving.load_classifier(exported.folder, "pytorch")).predict(request(photo, bbox))


# The code file of every version registered before the package had layers (MLflow keeps it with the version).
OLD_CODE_FILE = """
import mlflow

from animl_retrain.mlflow_model import AnimlClassifierModel

mlflow.models.set_model(AnimlClassifierModel())
"""


def test_models_registered_before_the_layers_still_load(exported, photo, tmp_path):
    """A champion logged with the old code file loads in this process (as evaluate loads it) and answers."""
    import mlflow
    import pandas as pd

    from animl_retrain import mlflow_model
    from animl_retrain.integrations.mlflow import pyfunc

    assert mlflow_model.AnimlClassifierModel is pyfunc.AnimlClassifierModel
    code = tmp_path / "mlflow_model_code.py"
    code.write_text(OLD_CODE_FILE)
    mlflow.pyfunc.save_model(
        tmp_path / "old", python_model=str(code), artifacts={"checkpoint": str(exported.checkpoint)}
    )
    answer = mlflow.pyfunc.load_model(str(tmp_path / "old")).predict(pd.DataFrame({"image": [photo], "bbox": [BOX]}))
    reference = Classifier.from_checkpoint(exported.checkpoint).classify([photo], [animl_bbox_to_md(BOX)])[0]
    assert answer.iloc[0].tolist() == pytest.approx(reference.tolist(), abs=1e-5)


@pytest.mark.parametrize("backend", ["pytorch", "torchscript", "onnx"])
def test_handler_answers_every_class_like_the_mlflow_model(exported, photo, backend):
    from animl_retrain.integrations.mlflow.pyfunc import AnimlClassifierModel

    handler = serving.AnimlHandler(serving.load_classifier(exported.folder, backend))
    answer = handler.predict(request(photo))
    assert set(answer) == set(LABELS) and sum(answer.values()) == pytest.approx(1.0, abs=1e-5)
    assert list(answer.values()) == sorted(answer.values(), reverse=True)

    pyfunc = AnimlClassifierModel()
    pyfunc.load_context(SimpleNamespace(artifacts={"checkpoint": str(exported.checkpoint)}))
    import pandas as pd

    expected = pyfunc.predict(None, pd.DataFrame({"image": [photo], "bbox": [BOX]})).iloc[0]
    for label in LABELS:
        assert answer[label] == pytest.approx(expected[label], abs=1e-4)
    reference = Classifier.from_checkpoint(exported.checkpoint).classify([photo], [animl_bbox_to_md(BOX)])[0]
    assert max(abs(answer[label] - reference[i]) for i, label in enumerate(LABELS)) < 1e-4


def test_http_server_contract_and_errors(exported, photo):
    handler = serving.AnimlHandler(serving.load_classifier(exported.folder, "onnx"))
    with serving.running_server(handler, max_request_bytes=200_000) as server:
        status, answer = post(server.url + "/invocations", request(photo, "[0.1, 0.2, 0.6, 0.7]"))
        assert status == 200 and set(answer) == set(LABELS)

        boundary = "animlboundary"
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="body"\r\n\r\n'.encode()
            + request(photo)
            + f"\r\n--{boundary}--\r\n".encode()
        )
        status, form_answer = post(server.url + "/predictions/animl", form, f"multipart/form-data; boundary={boundary}")
        assert status == 200 and form_answer == pytest.approx(answer)

        assert post(server.url + "/invocations", request(photo, [0.6, 0.2, 0.1, 0.7]))[0] == 400
        status, error = post(server.url + "/invocations", request(b"not an image at all"))
        assert status == 400 and "cannot be decoded" in error["error"]
        status, error = post(server.url + "/invocations", request(os.urandom(300_000)))
        assert status == 413 and "over the limit" in error["error"]
        assert post(server.url + "/elsewhere", request(photo))[0] == 404
        with urllib.request.urlopen(server.url + "/ping", timeout=10) as resp:
            assert json.loads(resp.read()) == {"status": "Healthy"}
        # still serving after every bad request
        assert post(server.url + "/invocations", request(photo))[0] == 200


def test_mar_follows_torch_model_archiver_format(exported, tmp_path):
    from model_archiver.manifest_components.manifest import Manifest
    from model_archiver.manifest_components.model import Model

    mar = packaging.build_mar(exported.folder, tmp_path / "animl.mar", "animl", "7")
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert json.loads(z.read("index_to_name.json")) == {str(i): label for i, label in enumerate(LABELS)}
    assert {"model.torchscript.pt", "animl_handler.py", "preprocessing.json"} <= names
    assert {f"animl_retrain/{m}" for m in packaging.SHIPPED_MODULES} <= names
    assert "model.onnx" not in names and "model.pt" not in names
    theirs = Manifest(
        "python", Model("animl", "model.torchscript.pt", "animl_handler.py", model_version="7")
    ).manifest_dict
    assert {k: v for k, v in manifest.items() if k != "createdOn"} == {
        k: v for k, v in theirs.items() if k != "createdOn"
    }
    tarball = packaging.build_model_tar(mar, tmp_path / "model.tar.gz")
    with tarfile.open(tarball) as t:
        assert t.getnames() == ["animl.mar"]


TORCHSERVE_SCRIPT = """
import json, os, sys
import ts
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import ModelLoaderFactory

model_dir, request_file = sys.argv[1], sys.argv[2]
cache = MetricsCacheYamlImpl(config_file_path=os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml"))
cache.initialize_cache()
cache.model_name = "animl"
loader = ModelLoaderFactory.get_model_loader()
service = loader.load("animl", model_dir, "animl_handler.py", None, 2, metrics_cache=cache)
service.set_cl_socket(None)
bodies = json.load(open(request_file))
batch = [
    {"requestId": b"json", "parameters": [{"name": "body", "contentType": "application/json", "value": bodies[0]}]},
    {"requestId": b"bytes", "parameters": [{"name": "body", "contentType": "application/octet-stream",
                                             "value": json.dumps(bodies[1]).encode()}]},
]
sys.stdout.buffer.write(service.predict(batch))
shipped = {n: m.__file__ for n, m in sys.modules.items() if n.startswith("animl_retrain")}
sys.stderr.write("SHIPPED " + json.dumps(shipped) + "\\n")
"""


def test_mar_runs_in_torchserve_python_backend(exported, photo, tmp_path):
    """Load the archive with TorchServe's own model loader, as its worker does, from the unpacked .mar only."""
    mar = packaging.build_mar(exported.folder, tmp_path / "animl.mar", "animl", "1")
    model_dir = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as z:
        z.extractall(model_dir)
    bodies = [json.loads(request(photo)), json.loads(request(photo, [0.6, 0.2, 0.1, 0.7]))]
    (tmp_path / "requests.json").write_text(json.dumps(bodies))
    (tmp_path / "ts_worker.py").write_text(TORCHSERVE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(model_dir)}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "ts_worker.py"), str(model_dir), str(tmp_path / "requests.json")],
        capture_output=True,
        cwd=model_dir,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    (ok, _, body), (bad, phrase, error) = read_torchserve_response(proc.stdout)
    assert ok == 200 and bad == 400 and "inverted" in phrase and "inverted" in json.loads(error)["error"]
    expected = serving.AnimlHandler(serving.load_classifier(exported.folder, "torchscript")).predict(bodies[0])
    assert json.loads(body) == pytest.approx(expected, abs=1e-6)
    shipped = json.loads(proc.stderr.decode().split("SHIPPED ", 1)[1].splitlines()[0])
    assert shipped and all(Path(f).is_relative_to(model_dir) for f in shipped.values()), shipped


def test_serve_command_on_a_free_port(exported, photo):
    proc = subprocess.Popen(
        [*CLI, "serve", "--model", str(exported.folder), "--backend", "onnx", "--port", "0", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read() if proc.poll() is not None else line
        base = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        status, answer = post(base + "/invocations", request(photo))
        assert status == 200 and set(answer) == set(LABELS)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 0


def test_serve_command_refuses_a_folder_without_the_model(tmp_path):
    proc = subprocess.run(
        [*CLI, "serve", "--model", str(tmp_path), "--backend", "onnx"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no model.onnx" in proc.stderr


def test_parity_images_must_exist(tmp_path):
    with pytest.raises(PipelineError, match=r"no \.jpg"):
        model_export.parity_images(tmp_path, 5)
    with pytest.raises(PipelineError, match="not a folder"):
        model_export.parity_images(tmp_path / "missing", 5)
