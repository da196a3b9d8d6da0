"""Stage 9, deploy: serve the champion to Animl: export, check, package, SageMaker endpoint, SSM, MLModel record.

Only a model version holding the ``champion`` alias (or one named explicitly) is deployed; given the register
stage's output, a run whose model did not become champion deploys nothing and says why. Steps:

1. fetch the checkpoint from the MLflow registry and export TorchScript (traced on CPU) and ONNX, each checked
   against PyTorch on real crops (max abs difference of the probabilities below ``parity_tolerance``);
2. package the TorchServe ``.mar`` (TorchScript, handler, ``index_to_name.json`` and the project's preprocessing
   code) into ``model.tar.gz`` and upload it, with the ONNX file, to the model bucket;
3. create a versioned SageMaker model and serverless endpoint configuration and create or update the endpoint
   (``UpdateEndpoint``: no downtime), then write the endpoint name to the SSM parameter(s) Animl reads;
4. write Animl's ``MLModel`` record (categories = labels, ``defaultConfThreshold`` from the evaluation's
   operating points or 0.8, ``expectsCrops: true``) and a suggested automation-rule ``categoryConfig``.

``dry_run`` does steps 1, 2 (without the upload) and 4, reads the current AWS state where it can, and prints the
changes it would make instead of making them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from animl_retrain.config import MODEL_NAME, StageConfig
from animl_retrain.core import storage
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json, write_json
from animl_retrain.core.logging import log
from animl_retrain.core.report import Report
from animl_retrain.formats import layout
from animl_retrain.formats.model_folder import MODEL_FILES, read_labels
from animl_retrain.integrations.animl import mlmodel
from animl_retrain.integrations.aws import sagemaker, torchserve
from animl_retrain.integrations.mlflow import registry
from animl_retrain.serving.export import DEFAULT_TOLERANCE, export_model_folder, parity_images


class DeployConfig(StageConfig):
    """Settings of the deploy stage."""

    out: Path = Field(description="output folder")
    parity_images: Path = Field(description="folder of real images or crops to check the exports on (crop stage)")
    name: str = Field(MODEL_NAME, min_length=1, description="registered model name in MLflow")
    version: str = Field("", description="deploy this model version (default: the one holding --alias)")
    alias: str = Field("champion", min_length=1, description="alias whose version is deployed")
    registration: Path | None = Field(
        None, description="register stage output: deploy only if this run's version holds the alias"
    )
    evaluation: Path | None = Field(None, description="evaluate stage output, for the operating points")
    animl_model_id: str = Field(
        "", pattern=r"^$|^[a-z0-9][a-z0-9-]*$", description="the model's _id in Animl (default: --name)"
    )
    description: str = Field("", description="MLModel description shown in Animl (default: model name/version)")
    stage: str = Field("dev", pattern=r"^[a-z0-9-]+$", description="Animl deployment stage, as in its SSM names")
    model_bucket: str = Field("", description="s3://bucket[/prefix] for model.tar.gz (required unless --dry-run)")
    serving_image: str = Field("", description="TorchServe CPU image URI whose torch matches (unless --dry-run)")
    role_arn: str = Field("", description="SageMaker execution role ARN (required unless --dry-run)")
    memory_mb: int = Field(6144, ge=1024, le=6144, multiple_of=1024, description="serverless memory in MB")
    max_concurrency: int = Field(5, ge=1, le=200, description="serverless max concurrent invocations")
    batch_parameter: bool = Field(False, description="also point Animl's batch-endpoint SSM parameter here")
    parity_samples: int = Field(64, ge=1, le=5000, description="images to check the exports on")
    parity_tolerance: float = Field(DEFAULT_TOLERANCE, gt=0, lt=0.5, description="max |Δ probability| allowed")
    wait_minutes: float = Field(20.0, ge=0, le=120, description="wait this long for InService (0: do not wait)")
    dry_run: bool = Field(False, description="print what would change in AWS instead of changing it")


class DeployResult(BaseModel):
    """What the deploy stage did (or, in a dry run, would do)."""

    deployed: bool
    dry_run: bool
    reason: str
    name: str
    version: str = ""
    endpoint: str = ""
    endpoint_config: str = ""
    model_data: str = ""
    ssm_parameters: list[str] = []
    default_threshold: float | None = None
    threshold_source: str = ""
    parity_max_abs_diff: dict[str, float] = {}
    plan: list[str] = []


def _check_settings(cfg: DeployConfig) -> None:
    if cfg.dry_run:
        return
    missing = [f"--{k.replace('_', '-')}" for k in ("model_bucket", "serving_image", "role_arn") if not getattr(cfg, k)]
    if missing:
        raise PipelineError(f"deploy: {', '.join(missing)} must be set (or use --dry-run)")
    if not storage.is_s3(cfg.model_bucket):
        raise PipelineError(f"deploy: --model-bucket must be an s3:// URI, got {cfg.model_bucket!r}")


def _target_version(cfg: DeployConfig):
    """The model version to deploy, or (None, reason) when this run has nothing to deploy."""
    mv = registry.resolve_version(cfg.name, cfg.alias, cfg.version)
    if cfg.version or cfg.registration is None:
        return mv, f"version {mv.version} " + ("named explicitly" if cfg.version else f"holds '{cfg.alias}'")
    ours = str(read_json(Path(cfg.registration) / layout.REGISTRATION_FILE, "registration")["version"])
    if ours != str(mv.version):
        return None, f"this run's version {ours} does not hold '{cfg.alias}' (version {mv.version} does)"
    return mv, f"this run's version {ours} holds '{cfg.alias}'"


def _markdown(result: DeployResult) -> str:
    lines = [f"# Deployment of `{result.name}` version {result.version or '-'}", "", result.reason + ".", ""]
    if result.parity_max_abs_diff:
        lines += ["| export | max abs difference of probabilities vs PyTorch |", "|---|---|"]
        lines += [f"| {b} | {d:.2e} |" for b, d in result.parity_max_abs_diff.items()]
        lines.append("")
    if result.plan:
        lines += ["Dry run: would" if result.dry_run else "Done:", ""] + [f"- {line}" for line in result.plan]
    if result.default_threshold is not None:
        lines += ["", f"defaultConfThreshold {result.default_threshold} ({result.threshold_source})."]
    return "\n".join(lines) + "\n"


def _finish(cfg: DeployConfig, report: Report, result: DeployResult) -> DeployResult:
    out = Path(cfg.out)
    write_json(out / layout.DEPLOYMENT_FILE, result.model_dump())
    (out / layout.DEPLOYMENT_SUMMARY_FILE).write_text(_markdown(result))
    report.counts = {"deployed": int(result.deployed)}
    report.details.update(result.model_dump(exclude={"plan"}))
    report.finish(out)
    for line in result.plan:
        log.info("deploy%s: %s", " (dry run, not done)" if result.dry_run else "", line)
    log.info("deploy: %s", result.reason)
    return result


def run(cfg: DeployConfig) -> DeployResult:
    """Deploy (or dry-run) the chosen model version; write the package, MLModel record and a report."""
    _check_settings(cfg)
    report = Report("deploy")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mv, reason = _target_version(cfg)
    if mv is None:
        return _finish(cfg, report, DeployResult(deployed=False, dry_run=cfg.dry_run, reason=reason, name=cfg.name))
    version = str(mv.version)
    model_id = cfg.animl_model_id or sagemaker.sagemaker_name(cfg.name.lower())
    package, tarball, parity = _package(cfg, version, model_id, out)
    default, source = _write_records(cfg, mv, model_id, package, out)
    target = _aws_target(cfg, model_id, version)
    result = DeployResult(
        deployed=False,
        dry_run=cfg.dry_run,
        reason=reason,
        name=cfg.name,
        version=version,
        endpoint=target.endpoint,
        endpoint_config=target.versioned_name,
        model_data=target.model_data,
        ssm_parameters=target.ssm_names,
        default_threshold=default,
        threshold_source=source,
        parity_max_abs_diff={b: r["max_abs_diff"] for b, r in parity.items()},
    )
    if cfg.dry_run:
        _plan_dry_run(target, tarball, result, report)
    else:
        _deploy(cfg, target, tarball, package, result)
    return _finish(cfg, report, result)


def _package(cfg: DeployConfig, version: str, model_id: str, out: Path) -> tuple[Path, Path, dict]:
    """Step 1-2: fetch the checkpoint, export and check TorchScript and ONNX, and build the archive."""
    package = out / layout.PACKAGE_DIR
    checkpoint = registry.download_checkpoint(cfg.name, version, package / MODEL_FILES["pytorch"])
    parity = export_model_folder(
        checkpoint, package, parity_images(cfg.parity_images, cfg.parity_samples), cfg.parity_tolerance
    )
    mar = torchserve.build_mar(package, out / f"{model_id}.mar", model_id, version)
    return package, torchserve.build_model_tar(mar, out / layout.MODEL_TARBALL), parity


def _write_records(cfg: DeployConfig, mv, model_id: str, package: Path, out: Path) -> tuple[float, str]:
    """Step 4: Animl's MLModel record and the suggested categoryConfig; returns the default threshold and source."""
    version = str(mv.version)
    labels = read_labels(package)
    default, per_class, source = mlmodel.read_operating_points(cfg.evaluation, registry.tags_with_run(mv), labels)
    description = cfg.description or f"{cfg.name} version {version}, retrained from validated Animl labels"
    record = mlmodel.record(model_id, f"v{version}", description, labels, default)
    write_json(out / layout.MLMODEL_FILE, record)
    write_json(out / layout.CATEGORY_CONFIG_FILE, mlmodel.category_config(labels, default, per_class))
    return default, source


def _aws_target(cfg: DeployConfig, model_id: str, version: str) -> sagemaker.Target:
    """What step 3 creates or updates: the versioned SageMaker model and config, the endpoint, the SSM names."""
    kinds = ["realtime"] + (["batch"] if cfg.batch_parameter else [])
    target = sagemaker.Target.build(
        model_id,
        cfg.stage,
        version,
        model_data="",
        image=cfg.serving_image or "<serving image>",
        role_arn=cfg.role_arn or "<role arn>",
        memory_mb=cfg.memory_mb,
        max_concurrency=cfg.max_concurrency,
        ssm_names=[sagemaker.ssm_parameter(model_id, kind, cfg.stage) for kind in kinds],
        tags={"animl-model": model_id, "mlflow-model": cfg.name, "mlflow-version": version},
    )
    prefix = (cfg.model_bucket or "s3://<model bucket>").rstrip("/")
    target.model_data = f"{prefix}/{model_id}/{cfg.stage}/{target.versioned_name}/{layout.MODEL_TARBALL}"
    return target


def _plan_dry_run(target: sagemaker.Target, tarball: Path, result: DeployResult, report: Report) -> None:
    """What a deployment would change, from the current AWS state where it can be read."""
    sm, ssm = sagemaker.clients()
    try:
        state = sagemaker.current_state(sm, ssm, target)
    except Exception as e:  # a dry run works without AWS access; it just cannot say create or update
        report.problem("AWS state unreadable", target.endpoint, str(e))
        state = None
    result.plan = [f"upload {tarball.name} and model.onnx to {target.model_data.rsplit('/', 1)[0]}/"]
    result.plan += sagemaker.plan(target, state)


def _deploy(cfg: DeployConfig, target: sagemaker.Target, tarball: Path, package: Path, result: DeployResult) -> None:
    """Step 3: upload the package, create or update the endpoint, point SSM at it, and record it on the version."""
    sm, ssm = sagemaker.clients()
    try:
        state = sagemaker.current_state(sm, ssm, target)
    except Exception as e:
        raise PipelineError(f"deploy: cannot read SageMaker/SSM state: {e}") from e
    result.plan = [f"uploaded {tarball.name} and model.onnx to {target.model_data.rsplit('/', 1)[0]}/"]
    result.plan += sagemaker.plan(target, state)
    s3 = sagemaker.model_bucket_client()
    storage.upload_file(tarball, target.model_data, s3)
    onnx = target.model_data.replace(layout.MODEL_TARBALL, "model.onnx")
    storage.upload_file(package / MODEL_FILES["onnx"], onnx, s3)
    record = Path(cfg.out) / layout.MLMODEL_FILE
    storage.upload_file(record, target.model_data.replace(layout.MODEL_TARBALL, layout.MLMODEL_FILE), s3)
    try:
        applied = sagemaker.apply(sm, ssm, target, state, cfg.wait_minutes * 60)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"deploy: SageMaker/SSM refused a change: {e}") from e
    result.deployed = True
    result.reason = f"{result.reason}; endpoint {target.endpoint} {applied['action']} ({applied['status']})"
    details = {"endpoint": target.endpoint, "config": target.versioned_name, "model_data": target.model_data}
    registry.record_deployment(cfg.name, result.version, cfg.stage, details)
