import json
import shutil

import pytest
from megadetector.postprocessing.validate_batch_results import ValidateBatchResultsOptions, validate_batch_results

from animl_retrain.cli import main
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json
from animl_retrain.formats import layout
from animl_retrain.formats.layout import IMAGES_DIR
from animl_retrain.integrations.mlflow import registry
from animl_retrain.modeling.inference import Classifier
from animl_retrain.tools import predict
from tests.serving_support import LABELS, register_checkpoint, tiny_checkpoint

NAME = "predict-tests"


@pytest.fixture(scope="module")
def pulled(servers, tmp_path_factory):
    """A registered champion, pulled into a folder with the CLI."""
    root = tmp_path_factory.mktemp("pulled")
    version = register_checkpoint(NAME, tiny_checkpoint(root / "ckpt.pt"), aliases=("champion",))
    assert main(["pull-model", "--name", NAME, "--alias", "champion", "--out", str(root / "model")]) == 0
    return root / "model", version, root / "ckpt.pt"


def validate(path):
    options = ValidateBatchResultsOptions()
    options.raise_errors = True
    options.check_image_existence = False
    result = validate_batch_results(str(path), options)["validation_results"]
    assert result["errors"] == [] and result["warnings"] == []


@pytest.mark.server
def test_pull_model_fetches_model_labels_and_preprocessing(pulled):
    folder, version, checkpoint = pulled
    assert read_json(folder / "label_index.json") == {str(i): label for i, label in enumerate(LABELS)}
    assert read_json(folder / "preprocessing.json")["image_size"] == 32
    info = read_json(folder / "model.json")
    assert info["name"] == NAME and info["version"] == version and "champion" in info["aliases"]
    assert (folder / "model.pt").read_bytes() == checkpoint.read_bytes()
    assert main(["pull-model", "--name", NAME, "--alias", "nope", "--out", str(folder.parent / "x")]) == 2
    with pytest.raises(PipelineError, match="has no alias 'nope'"):
        registry.pull(NAME, folder.parent / "x", alias="nope")


@pytest.mark.server
def test_predict_writes_a_valid_megadetector_file(pulled, stage_outputs, tmp_path, capsys):
    folder = pulled[0]
    detections = stage_outputs["ground_truth"] / layout.GROUND_TRUTH_FILE
    images = stage_outputs["images"] / IMAGES_DIR
    args = ["predict", "--model", str(folder), "--images", str(images), "--detections", str(detections)]
    assert main([*args, "--out", str(tmp_path / "out"), "--detection-threshold", "0.0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tmp_path / "out" / predict.RESULTS_FILE
    validate(out)
    results = read_json(out)
    assert results["classification_categories"] == {str(i): label for i, label in enumerate(LABELS)}
    assert results["info"]["classifier"] == f"{NAME} v{pulled[1]}"
    dets = [d for im in results["images"] for d in im["detections"]]
    assert summary["classified"] == len(dets) > 0
    for det in dets:
        confs = [c for _, c in det["classifications"]]
        assert len(confs) == len(LABELS) and confs == sorted(confs, reverse=True)
        assert sum(confs) == pytest.approx(1.0, abs=1e-4)

    # the same probabilities as the classifier on the same box of the same image
    im = results["images"][0]
    det = im["detections"][0]
    expected = Classifier.from_checkpoint(folder / "model.pt").classify([images / im["file"]], [det["bbox"]])[0]
    got = {int(i): c for i, c in det["classifications"]}
    assert max(abs(got[i] - expected[i]) for i in range(len(LABELS))) < 1e-3


@pytest.mark.server
def test_predict_with_onnx_and_missing_images(pulled, stage_outputs, tmp_path):
    from animl_retrain.serving import export as model_export

    folder = tmp_path / "model"
    shutil.copytree(pulled[0], folder)
    crops = model_export.parity_images(stage_outputs["crops"], 4)
    model_export.export_model_folder(folder / "model.pt", folder, crops)
    detections = read_json(stage_outputs["ground_truth"] / layout.GROUND_TRUTH_FILE)
    detections["images"][0]["file"] = "missing/frame.jpg"
    detections["images"][1]["detections"][0]["conf"] = 0.05  # below the threshold: left unclassified
    (tmp_path / "md.json").write_text(json.dumps(detections))
    result = predict.run(
        predict.PredictConfig(
            model=folder,
            images=stage_outputs["images"] / IMAGES_DIR,
            detections=tmp_path / "md.json",
            out=tmp_path / "out",
            backend="onnx",
        )
    )
    assert result.skipped_images == 1 and result.classified > 0
    validate(tmp_path / "out" / predict.RESULTS_FILE)
    written = read_json(tmp_path / "out" / predict.RESULTS_FILE)
    assert all("classifications" not in d for d in written["images"][0]["detections"])  # stale ones removed
    assert "classifications" not in written["images"][1]["detections"][0]
    report = read_json(tmp_path / "out" / "report.json")
    assert report["problems"][0]["where"] == "missing/frame.jpg"
    assert report["counts"]["replaced_classifications"] >= 1
