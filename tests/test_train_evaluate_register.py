import json
import shutil
from types import SimpleNamespace

import pytest

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json
from animl_retrain.formats import layout
from animl_retrain.integrations.mlflow import registry
from animl_retrain.modeling.backbones import build_model
from animl_retrain.modeling.checkpoint import load_checkpoint
from animl_retrain.stages import evaluate, export, register, train
from tests.conftest import SPEC

pytestmark = pytest.mark.server
TINY = {"arch": "mobilenet_v3_small", "image_size": 32, "epochs": 2, "batch_size": 16, "workers": 0}


@pytest.fixture(scope="module")
def trained(servers, stage_outputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    result = train.run(
        train.TrainConfig(
            crops=stage_outputs["crops"], split=stage_outputs["split"], out=out, experiment="tests", **TINY
        )
    )
    return out, result


@pytest.fixture(scope="module")
def evaluated(trained, stage_outputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    result = evaluate.run(
        evaluate.EvaluateConfig(
            model=trained[0],
            crops=stage_outputs["crops"],
            split=stage_outputs["split"],
            export=stage_outputs["export"],
            out=out,
            registered_name="tests-model",
        )
    )
    return out, result


def test_checkpoint_describes_itself_and_mlflow_has_the_run(trained):
    import mlflow

    out, result = trained
    ckpt = load_checkpoint(out / layout.MODEL_FILE)
    assert ckpt["arch"] == "mobilenet_v3_small"
    assert ckpt["labels"] == ["bird", "deer_mouse", "fox", "lizard", "rat", "skunk"]
    assert ckpt["preprocessing"]["image_size"] == 32 and ckpt["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    run = mlflow.get_run(result.mlflow_run_id)
    assert run.data.params["arch"] == "mobilenet_v3_small"
    history = mlflow.MlflowClient().get_metric_history(result.mlflow_run_id, "val_macro_f1")
    assert [m.step for m in history] == list(range(1, result.epochs_run + 1))
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.mlflow_run_id)}
    assert {"label_index.json", "preprocessing.json"} <= artifacts


def test_evaluation_metrics(evaluated, trained):
    import mlflow

    out, result = evaluated
    metrics = read_json(out / layout.METRICS_FILE)
    assert metrics["status"] == "complete" and metrics["champion"] is None
    model = metrics["model"]
    assert set(model["per_class"]) == {"bird", "deer_mouse", "fox", "lizard", "rat", "skunk"}
    assert sum(map(sum, model["confusion_matrix"])) == model["n"] == result.test_crops
    assert 0 <= model["top1"] <= model["top3"] <= 1
    assert "| class | precision |" in (out / "summary.md").read_text()
    run = mlflow.get_run(trained[1].mlflow_run_id)
    assert run.data.metrics["test_macro_f1"] == pytest.approx(result.macro_f1)
    assert run.data.metrics["test_ece"] == pytest.approx(metrics["calibration"]["ece"])
    # the demo marks rat invasive (the deer mouse, its look-alike, native): its threshold goes as a tag and an artifact
    thresholds = read_json(out / layout.THRESHOLDS_FILE)
    assert thresholds["format"] == "animl-retrain-thresholds/1" and thresholds["invasive"] == ["rat"]
    assert set(thresholds["thresholds"]) == {"rat"} and 0 <= thresholds["thresholds"]["rat"] <= 1
    assert json.loads(run.data.tags["invasive_thresholds"]) == thresholds["thresholds"] == result.thresholds
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/thresholds.json", "evaluation/reliability.png"} <= artifacts
    page = (out / layout.HTML_REPORT_FILE).read_text()
    assert page.count("data:image/png;base64,") == 3 and "Operating points (target precision 0.95)" in page
    wrong = model["n"] - sum(model["confusion_matrix"][i][i] for i in range(len(model["labels"])))
    assert page.count("class='card'") == min(wrong, 24)  # the gallery of the most confident mistakes


def test_register_champion_then_challenger(trained, evaluated, stage_outputs, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    first = register.run(
        register.RegisterConfig(
            model=trained[0],
            evaluation=evaluated[0],
            export=stage_outputs["export"],
            out=tmp_path / "r1",
            name="tests-model",
            kfp_run_id="run-1",
        )
    )
    assert first.promoted and first.aliases == ["challenger", "champion"]
    version = client.get_model_version("tests-model", first.version)
    assert version.tags["kfp_run_id"] == "run-1"
    assert json.loads(version.tags["label_index"]) == read_json(trained[0] / "label_index.json")
    assert json.loads(version.tags["preprocessing"])["image_size"] == 32
    export_report = read_json(stage_outputs["export"] / "report.json")
    assert version.tags["export_fingerprint"] == export_report["fingerprint"]
    assert version.tags["validated_fingerprint"] == export_report["validated_fingerprint"]
    assert version.tags["validated_annotations"] == str(export_report["validated_annotations"])
    # The one champion lookup, through MLflow's client and through the REST API the CPU image uses: same answers.
    for lookup in (registry.champion, registry._champion_by_rest, registry._champion_by_client):
        found = lookup("tests-model", "champion")
        assert (found.version, found.run_id, found.tags) == (first.version, version.run_id, version.tags)
        assert lookup("tests-model", "nobody") is None and lookup("no-such-model", "champion") is None
    assert json.loads(version.tags["invasive_thresholds"]) == read_json(evaluated[0] / "thresholds.json")["thresholds"]
    assert version.tags["thresholds_artifact"].endswith("/evaluation/thresholds.json")

    # a second model, scored against the champion on the same test set, that does not beat it
    worse = tmp_path / "worse"
    shutil.copytree(evaluated[0], worse)
    metrics = read_json(worse / layout.METRICS_FILE)
    metrics["champion"] = {"version": first.version, "macro_f1": metrics["model"]["macro_f1"]}
    metrics["model"]["macro_f1"] -= 0.1
    (worse / layout.METRICS_FILE).write_text(json.dumps(metrics))
    second = register.run(
        register.RegisterConfig(
            model=trained[0], evaluation=worse, export=stage_outputs["export"], out=tmp_path / "r2", name="tests-model"
        )
    )
    assert not second.promoted and "does not beat" in second.reason
    assert client.get_model_version_by_alias("tests-model", "champion").version == first.version
    assert client.get_model_version_by_alias("tests-model", "challenger").version == second.version


def test_incremental_export_skips_until_new_labels_are_validated(trained, evaluated, small_demo, tmp_path):
    """Incremental mode: 'train' without a champion, 'skip' on the champion's labels, 'train' once one changes."""

    def run_export(source, name):
        cfg = export.ExportConfig(
            source=source, label_spec=SPEC, out=tmp_path / name, incremental=True, model_name="incremental-model"
        )
        return export.run(cfg)

    first = run_export(small_demo.export_uri, "first")
    assert first.decision == "train" and "has no champion yet" in first.decision_reason
    registered = register.run(
        register.RegisterConfig(
            model=trained[0],
            evaluation=evaluated[0],
            export=tmp_path / "first",
            out=tmp_path / "r",
            name="incremental-model",
        )
    )
    assert registered.promoted

    again = run_export(small_demo.export_uri, "again")
    assert again.decision == "skip" and f"champion v{registered.version}" in again.decision_reason
    assert "training skipped" in (tmp_path / "again" / "summary.md").read_text()
    assert read_json(tmp_path / "again" / "report.json")["decision"] == "skip"

    data = json.loads((tmp_path / "again" / "export.json").read_bytes())
    unvalidated = next(a for a in data["annotations"] if a.get("validated") is False)
    unvalidated["validated"] = True  # someone reviewed one more object
    (tmp_path / "newer.json").write_text(json.dumps(data))
    newer = run_export(str(tmp_path / "newer.json"), "newer")
    assert newer.decision == "train"
    assert f"{again.validated_annotations} then, {again.validated_annotations + 1} now" in newer.decision_reason


def test_incomplete_evaluation_never_registers(trained, evaluated, stage_outputs, tmp_path):
    import mlflow

    broken = tmp_path / "broken"
    shutil.copytree(evaluated[0], broken)
    metrics = read_json(broken / layout.METRICS_FILE)
    metrics["model"]["macro_f1"] = float("nan")
    (broken / layout.METRICS_FILE).write_text(json.dumps(metrics))
    before = len(mlflow.MlflowClient().search_model_versions("name='tests-model'"))
    with pytest.raises(PipelineError, match="did not complete"):
        register.run(
            register.RegisterConfig(
                model=trained[0],
                evaluation=broken,
                export=stage_outputs["export"],
                out=tmp_path / "r",
                name="tests-model",
            )
        )
    assert len(mlflow.MlflowClient().search_model_versions("name='tests-model'")) == before


def test_champion_evaluated_against_the_same_test_set(trained, stage_outputs, tmp_path):
    """Once a champion exists, evaluate scores it on this run's test crops too."""
    result = evaluate.run(
        evaluate.EvaluateConfig(
            model=trained[0],
            crops=stage_outputs["crops"],
            split=stage_outputs["split"],
            out=tmp_path,
            registered_name="tests-model",
        )
    )
    assert result.champion is not None
    assert result.champion["macro_f1"] == pytest.approx(result.macro_f1, abs=0.02)  # the same weights


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A stand-in for ImageNet weights: a 1000-class state dict of the tiny backbone (the recipe needs weights)."""
    import torch

    path = tmp_path_factory.mktemp("weights") / "imagenet.pt"
    torch.manual_seed(0)
    torch.save(build_model(TINY["arch"], 1000).state_dict(), path)
    return path


def _train_pretrained(stage_outputs, pretrained, out, **settings):
    """The tiny model from the pretrained test weights, on the demo's crops and split."""
    cfg = {**TINY, **settings}
    return train.run(
        train.TrainConfig(
            crops=stage_outputs["crops"],
            split=stage_outputs["split"],
            out=out,
            experiment="tests",
            weights=str(pretrained),
            **cfg,
        )
    )


def test_two_phase_recipe_fits_the_head_first_and_calibrates(servers, stage_outputs, pretrained, tmp_path):
    import mlflow

    out = tmp_path / "model"
    result = _train_pretrained(stage_outputs, pretrained, out)
    details = read_json(out / layout.STAGE_REPORT_FILE)
    assert details["recipe"] == "two-phase" and details["head"]["l2"] > 0 and len(details["history"]) == 2
    assert (
        details["temperature"] > 0 and load_checkpoint(out / layout.MODEL_FILE)["temperature"] == details["temperature"]
    )
    # the head-only model is epoch 0 of the val curve; fine-tuning has to beat it
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(result.mlflow_run_id, "val_macro_f1")]
    assert steps == [0, 1, 2]
    assert result.best["val_macro_f1"] >= details["head"]["val_macro_f1"]
    metrics = mlflow.get_run(result.mlflow_run_id).data.metrics
    assert metrics["temperature"] == pytest.approx(details["temperature"]) and "val_ece" in metrics


def test_fine_tuning_that_loses_to_the_head_is_kept_out(servers, stage_outputs, pretrained, tmp_path):
    """A learning rate that wrecks the network: the head-only model is what training returns, and it says so."""
    import torch

    out = tmp_path / "model"
    result = _train_pretrained(stage_outputs, pretrained, out, lr=5.0, backbone_lr_mult=1.0, calibrate=False)
    report = read_json(out / layout.STAGE_REPORT_FILE)
    assert result.best_epoch == 0 and "fine-tuning kept out" in [p["what"] for p in report["problems"]]
    # the backbone is the pretrained one, batch-norm statistics included: only the head changed
    state = load_checkpoint(out / layout.MODEL_FILE)["state_dict"]
    donor = torch.load(pretrained, weights_only=True)
    body = [k for k in state if not k.startswith("classifier.3.")]
    assert body and all(torch.equal(state[k], donor[k]) for k in body)


def test_decide():
    ev = {"model": {"macro_f1": 0.8}, "test_fingerprint": "t1", "champion": {"version": "3", "macro_f1": 0.7}}
    champ = SimpleNamespace(version="3", tags={})
    assert register.decide(ev, None) == (True, "no champion yet")
    assert register.decide(ev, champ)[0]
    assert not register.decide({**ev, "champion": {"version": "3", "macro_f1": 0.8}}, champ)[0]
    moved = SimpleNamespace(version="4", tags={"test_fingerprint": "t1", "test_macro_f1": "0.9"})
    assert not register.decide(ev, moved)[0]
    elsewhere = SimpleNamespace(version="4", tags={"test_fingerprint": "other", "test_macro_f1": "0.1"})
    assert "not scored on this test set" in register.decide(ev, elsewhere)[1]


def test_decide_promotes_only_beyond_the_noise():
    champ = SimpleNamespace(version="3", tags={})
    ev = {"model": {"macro_f1": 0.8}, "test_fingerprint": "t1", "champion": {"version": "3", "macro_f1": 0.75}}

    def compared(low, high, verdict):
        comparison = {"champion_version": "3", "interval": [low, high], "level": 0.95, "verdict": verdict}
        return register.decide({**ev, "comparison": comparison}, champ)

    promoted, reason = compared(0.01, 0.09, "better")
    assert promoted and "beyond the noise" in reason
    promoted, reason = compared(-0.03, 0.13, "tie")
    assert not promoted and "a tie with champion v3" in reason
    assert not compared(-0.2, -0.01, "worse")[0]
    # a champion that moved since the evaluation: our interval must clear its macro-F1
    moved = SimpleNamespace(version="4", tags={"test_fingerprint": "t1", "test_macro_f1": "0.76"})
    with_ci = {**ev, "model": {"macro_f1": 0.8, "ci": {"macro_f1": [0.74, 0.86]}}}
    assert not register.decide(with_ci, moved)[0]
    with_ci["model"]["ci"]["macro_f1"][0] = 0.77
    assert register.decide(with_ci, moved)[0]


def test_weights_from_a_file_and_bad_weights(tmp_path):
    import torch

    donor = build_model("resnet18", 1000)
    torch.save(donor.state_dict(), tmp_path / "imagenet.pt")
    model = build_model("resnet18", 5, str(tmp_path / "imagenet.pt"))
    assert torch.equal(model.conv1.weight, donor.conv1.weight) and model.fc.out_features == 5
    with pytest.raises(PipelineError, match="do not fit"):
        build_model("efficientnet_b0", 5, str(tmp_path / "imagenet.pt"))
    with pytest.raises(PipelineError, match="unknown architecture"):
        build_model("vgg99", 5)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(PipelineError, match="cannot read weights"):
        build_model("resnet18", 5, str(tmp_path / "junk.pt"))
