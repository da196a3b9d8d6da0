import json
import tarfile

import pytest

from animl_retrain.cli import main
from animl_retrain.core.errors import PipelineError
from animl_retrain.formats.layout import CROPS_DIR
from animl_retrain.integrations.animl import mlmodel
from animl_retrain.integrations.aws import sagemaker as aws_deploy
from animl_retrain.stages import deploy
from tests.serving_support import LABELS, moto_server, register_checkpoint, tiny_checkpoint

NAME = "deploy-tests"


@pytest.fixture(scope="module")
def registered(servers, tmp_path_factory):
    """Two versions of a tiny model: version 1 is the champion, version 2 a challenger."""
    root = tmp_path_factory.mktemp("registered")
    first = register_checkpoint(NAME, tiny_checkpoint(root / "a.pt", seed=0), aliases=("champion",))
    second = register_checkpoint(NAME, tiny_checkpoint(root / "b.pt", seed=1), aliases=("challenger",))
    return first, second


@pytest.fixture
def aws(servers, monkeypatch):
    """SageMaker and SSM from moto on loopback; S3 stays the SeaweedFS test server."""
    import boto3

    with moto_server() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", url)
        monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", url)
        monkeypatch.setenv("AWS_REGION", "us-west-2")
        kwargs = {"endpoint_url": url, "region_name": "us-west-2"}
        yield boto3.client("sagemaker", **kwargs), boto3.client("ssm", **kwargs)


def settings(stage_outputs, tmp_path, **changes) -> deploy.DeployConfig:
    values = {
        "out": tmp_path / "out",
        "parity_images": stage_outputs["crops"] / CROPS_DIR,
        "parity_samples": 12,
        "name": NAME,
        "animl_model_id": "island-classifier",
        "stage": "dev",
        "serving_image": "123456789012.dkr.ecr.us-west-2.amazonaws.com/animl-serving:0.1.0",
        "role_arn": "arn:aws:iam::123456789012:role/animl-sagemaker",
        "wait_minutes": 1,
    }
    return deploy.DeployConfig(**(values | changes))


PARAMETER = "/ml/island-classifier-realtime-endpoint-dev"


@pytest.mark.server
def test_dry_run_prints_the_plan_and_changes_nothing(registered, stage_outputs, aws, tmp_path, capsys):
    sm, ssm = aws
    out = tmp_path / "dry"
    code = main(
        [
            *("deploy", "--dry-run", "--name", NAME, "--animl-model-id", "island-classifier", "--out", str(out)),
            *("--parity-images", str(stage_outputs["crops"] / CROPS_DIR), "--parity-samples", "8"),
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dry_run"] and not printed["deployed"] and printed["version"] == registered[0]
    plan = "\n".join(printed["plan"])
    assert "create endpoint island-classifier-dev" in plan and f"set SSM parameter {PARAMETER}" in plan
    assert "6144 MB, max concurrency 5" in plan
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert ssm.describe_parameters()["Parameters"] == []

    record = json.loads((out / "mlmodel.json").read_text())
    assert record["_id"] == "island-classifier" and record["version"] == f"v{registered[0]}"
    assert [c["_id"] for c in record["categories"]] == LABELS == [c["name"] for c in record["categories"]]
    assert all(c["color"].startswith("#") for c in record["categories"])
    assert record["expectsCrops"] is True and record["defaultConfThreshold"] == mlmodel.DEFAULT_THRESHOLD
    assert (out / "island-classifier.mar").is_file() and (out / "model.tar.gz").is_file()
    assert json.loads((out / "report.json").read_text())["counts"] == {"deployed": 0}


@pytest.mark.server
def test_deploy_creates_then_updates_the_endpoint_without_downtime(
    registered, stage_outputs, aws, bucket, s3, tmp_path
):
    import mlflow

    sm, ssm = aws
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "operating_points.json").write_text(
        json.dumps({"default": 0.7, "per_class": {"rodent": {"threshold": 0.65, "precision": 0.95}}})
    )
    first = deploy.run(
        settings(
            stage_outputs,
            tmp_path / "1",
            model_bucket=f"s3://{bucket}/models",
            evaluation=evaluation,
            max_concurrency=9,
        )
    )
    assert first.deployed and first.version == registered[0] and "created" in first.reason
    described = sm.describe_endpoint(EndpointName="island-classifier-dev")
    assert described["EndpointStatus"] == "InService" and described["EndpointConfigName"] == first.endpoint_config
    config = sm.describe_endpoint_config(EndpointConfigName=first.endpoint_config)["ProductionVariants"][0]
    assert config["ServerlessConfig"] == {"MemorySizeInMB": 6144, "MaxConcurrency": 9}
    model = sm.describe_model(ModelName=first.endpoint_config)["PrimaryContainer"]
    assert model["ModelDataUrl"] == first.model_data and model["Image"].endswith("animl-serving:0.1.0")
    assert ssm.get_parameter(Name=PARAMETER)["Parameter"]["Value"] == "island-classifier-dev"

    key = first.model_data.split(f"s3://{bucket}/", 1)[1]
    local = tmp_path / "model.tar.gz"
    s3.download_file(bucket, key, str(local))
    with tarfile.open(local) as t:
        assert t.getnames() == ["island-classifier.mar"]
    uploaded = {o["Key"].rsplit("/", 1)[1] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert uploaded == {"model.tar.gz", "model.onnx", "mlmodel.json"}
    record = json.loads((tmp_path / "1" / "out" / "mlmodel.json").read_text())
    assert record["defaultConfThreshold"] == 0.7 and first.threshold_source.endswith("operating_points.json")
    categories = json.loads((tmp_path / "1" / "out" / "category_config.json").read_text())
    assert categories["rodent"]["confThreshold"] == 0.65 and categories["fox"]["confThreshold"] == 0.7

    client = mlflow.MlflowClient()
    assert client.get_model_version(NAME, first.version).tags["deployed_dev_endpoint"] == "island-classifier-dev"
    assert client.get_model_version_by_alias(NAME, "deployed-dev").version == first.version

    # version 2, named explicitly although it is not the champion: the same endpoint switches config
    second = deploy.run(settings(stage_outputs, tmp_path / "2", model_bucket=f"s3://{bucket}/models", version="2"))
    assert second.deployed and second.version == registered[1] and "updated" in second.reason
    assert second.endpoint_config != first.endpoint_config
    after = sm.describe_endpoint(EndpointName="island-classifier-dev")
    assert after["EndpointConfigName"] == second.endpoint_config and after["EndpointStatus"] == "InService"
    assert after["CreationTime"] == described["CreationTime"]  # updated in place, never deleted
    configs = {c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]}
    assert {first.endpoint_config, second.endpoint_config} <= configs  # the old one stays for a roll-back
    assert any("update endpoint island-classifier-dev (InService)" in line for line in second.plan)
    assert any(f"keep SSM parameter {PARAMETER}" in line for line in second.plan)
    assert client.get_model_version_by_alias(NAME, "deployed-dev").version == second.version


@pytest.mark.server
def test_a_run_whose_model_is_not_champion_deploys_nothing(registered, stage_outputs, aws, tmp_path):
    sm, _ = aws
    registration = tmp_path / "registration"
    registration.mkdir()
    (registration / "registration.json").write_text(json.dumps({"version": registered[1], "promoted": False}))
    result = deploy.run(settings(stage_outputs, tmp_path, model_bucket="s3://unused", registration=registration))
    assert not result.deployed and "does not hold 'champion'" in result.reason
    assert sm.list_models()["Models"] == []
    assert not (tmp_path / "out" / "model.tar.gz").exists()
    assert json.loads((tmp_path / "out" / "deployment.json").read_text())["deployed"] is False


@pytest.mark.server
def test_unknown_version_is_a_clear_error(registered, stage_outputs, tmp_path):
    with pytest.raises(PipelineError, match="has no version 99"):
        deploy.run(settings(stage_outputs, tmp_path, version="99", dry_run=True))


def test_missing_aws_settings_fail_before_any_work(tmp_path):
    cfg = deploy.DeployConfig(out=tmp_path, parity_images=tmp_path, role_arn="", model_bucket="")
    with pytest.raises(PipelineError, match="--model-bucket, --serving-image, --role-arn must be set"):
        deploy.run(cfg)
    cfg = deploy.DeployConfig(
        out=tmp_path, parity_images=tmp_path, role_arn="r", serving_image="i", model_bucket="/local/folder"
    )
    with pytest.raises(PipelineError, match="must be an s3:// URI"):
        deploy.run(cfg)
    with pytest.raises(PipelineError, match="--memory-mb"):
        deploy.DeployConfig.build(out=tmp_path, parity_images=tmp_path, memory_mb=7000)


def test_busy_or_failed_endpoints_are_not_touched():
    target = aws_deploy.Target.build(
        "m", "dev", "3", model_data="s3://b/k", image="i", role_arn="r", memory_mb=6144, max_concurrency=5, ssm_names=[]
    )
    for status, message in (("Updating", "deploy again once it is InService"), ("Failed", "delete it")):
        state = {"endpoint_status": status, "endpoint_config": "old", "ssm": {}}
        with pytest.raises(PipelineError, match=message):
            aws_deploy.apply(None, None, target, state, 0)


def test_names_follow_sagemaker_and_animl_rules():
    assert aws_deploy.sagemaker_name("Island_Classifier", "dev", "v12", "20260101-000000") == (
        "Island-Classifier-dev-v12-20260101-000000"
    )
    assert len(aws_deploy.sagemaker_name("x" * 80, "prod")) == 63
    assert aws_deploy.ssm_parameter("mirav3", "batch", "prod") == "/ml/mirav3-batch-endpoint-prod"


@pytest.mark.parametrize(
    ("content", "default", "per_class"),
    [
        ({"default": 0.7}, 0.7, {}),
        ({"defaultConfThreshold": 0.6, "invasive": {"rodent": 0.9}}, 0.6, {"rodent": 0.9}),
        (
            {"per_class": [{"label": "rodent", "threshold": 0.55}, {"label": "unknown", "threshold": 0.2}]},
            0.8,
            {"rodent": 0.55},
        ),
        ({"rodent": {"threshold": 0.5}, "skunk": 0.4}, 0.8, {"rodent": 0.5, "skunk": 0.4}),
        ({"default": 1.5, "thresholds": {"fox": -1}}, 0.8, {}),
        ([1, 2, 3], 0.8, {}),
        (
            {"thresholds": {"rodent": 0.62}, "per_class": {"rodent": {"threshold": 0.62, "met": True}}},
            0.8,
            {"rodent": 0.62},
        ),
        ({"per_class": {"rodent": {"threshold": 0.99, "met": False}}}, 0.8, {}),
    ],
)
def test_operating_points_are_read_tolerantly(tmp_path, content, default, per_class):
    (tmp_path / "operating_points.json").write_text(json.dumps(content))
    got_default, got_per_class, _ = mlmodel.read_operating_points(tmp_path, {}, LABELS)
    assert (got_default, got_per_class) == (default, per_class)


def test_operating_points_from_metrics_or_tags_else_the_default(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "complete", "operating_points": {"default": 0.66}}))
    assert mlmodel.read_operating_points(tmp_path, {}, LABELS)[0] == 0.66
    assert mlmodel.read_operating_points(None, {"default_conf_threshold": "0.75"}, LABELS)[0] == 0.75
    tags = {"operating_points": json.dumps({"per_class": {"fox": 0.9}})}
    assert mlmodel.read_operating_points(None, tags, LABELS)[:2] == (0.8, {"fox": 0.9})
    tags = {"invasive_thresholds": json.dumps({"rodent": 0.7})}
    assert mlmodel.read_operating_points(None, tags, LABELS)[:2] == (0.8, {"rodent": 0.7})
    (tmp_path / "metrics.json").write_text("{broken")
    default, per_class, source = mlmodel.read_operating_points(tmp_path, {"operating_points": "{broken"}, LABELS)
    assert (default, per_class) == (0.8, {}) and "default 0.8" in source


def test_deploy_credentials_have_their_own_names(monkeypatch):
    """ANIML_DEPLOY_AWS_* reach only the deploy step's clients; AWS_ACCESS_KEY_ID stays the pod's own identity."""
    from animl_retrain.integrations.aws import sagemaker

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPODIDENTITY00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "pod-secret")
    monkeypatch.delenv("ANIML_DEPLOY_AWS_ACCESS_KEY_ID", raising=False)
    assert sagemaker.session().get_credentials().access_key == "AKIAPODIDENTITY00000"  # IRSA or the pod's keys
    monkeypatch.setenv("ANIML_DEPLOY_AWS_ACCESS_KEY_ID", "AKIAANIMLDEPLOY00000")
    monkeypatch.setenv("ANIML_DEPLOY_AWS_SECRET_ACCESS_KEY", "deploy-secret")
    monkeypatch.setenv("ANIML_DEPLOY_AWS_REGION", "us-west-1")
    aws = sagemaker.session()
    assert aws.get_credentials().access_key == "AKIAANIMLDEPLOY00000" and aws.region_name == "us-west-1"
    sm, _ = sagemaker.clients()
    assert sm.meta.region_name == "us-west-1"
    assert sagemaker.model_bucket_client()._request_signer._credentials.access_key == "AKIAANIMLDEPLOY00000"
